"""Shared pieces of the benchmarks: the loopback PostgreSQL described by the KZG_TEST_PG_*
variables (``source .pg-test-env``), scratch databases on it, machine facts and
percentiles."""

from __future__ import annotations

import asyncio
import math
import os
import platform
import socket
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import URL, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class PgRole:
    user: str
    password: str


@dataclass(frozen=True)
class PgDatabase:
    """A database on the benchmark server: the owner migrates, the app role runs."""

    host: str
    port: int
    name: str
    owner: PgRole
    app: PgRole

    def url(self, role: PgRole, driver: str = "postgresql+asyncpg") -> str:
        return URL.create(
            driver, role.user, role.password, self.host, self.port, self.name
        ).render_as_string(hide_password=False)

    @property
    def owner_url(self) -> str:
        return self.url(self.owner)

    @property
    def app_url(self) -> str:
        return self.url(self.app)

    def connect_kwargs(self, role: PgRole) -> dict[str, Any]:
        """Keyword arguments of asyncpg.connect for ``role``."""
        return {
            "host": self.host,
            "port": self.port,
            "user": role.user,
            "password": role.password,
            "database": self.name,
        }


class PgServer:
    """The loopback server of KZG_TEST_PG_*; raises LookupError when it is not configured."""

    def __init__(self) -> None:
        keys = ("HOST", "PORT", "OWNER", "OWNER_PASSWORD", "APP", "APP_PASSWORD")
        env = {k: os.environ.get(f"KZG_TEST_PG_{k}", "") for k in keys}
        if not all(env.values()):
            raise LookupError("KZG_TEST_PG_* not set (source .pg-test-env)")
        if env["HOST"] not in _LOOPBACK:
            raise LookupError("the benchmarks only use a loopback PostgreSQL")
        self.host = env["HOST"]
        self.port = int(env["PORT"])
        self.owner = PgRole(env["OWNER"], env["OWNER_PASSWORD"])
        self.app = PgRole(env["APP"], env["APP_PASSWORD"])

    def database(self, name: str) -> PgDatabase:
        return PgDatabase(self.host, self.port, name, self.owner, self.app)

    def _admin(self) -> AsyncEngine:
        return create_async_engine(
            self.database("postgres").owner_url, isolation_level="AUTOCOMMIT"
        )

    async def exists(self, name: str) -> bool:
        admin = self._admin()
        try:
            async with admin.connect() as conn:
                found = await conn.execute(
                    text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
                )
                return found.first() is not None
        finally:
            await admin.dispose()

    async def create(self, name: str) -> PgDatabase:
        """Create database ``name`` (an identifier chosen by the benchmark) for the app role."""
        admin = self._admin()
        try:
            async with admin.connect() as conn:
                await conn.execute(text(f'CREATE DATABASE "{name}"'))
                await conn.execute(text(f'GRANT CONNECT ON DATABASE "{name}" TO "{self.app.user}"'))
        finally:
            await admin.dispose()
        return self.database(name)

    async def drop(self, name: str, patience: float = 30.0) -> None:
        """Drop database ``name``. The owner may not terminate the app role's sessions, and
        a closed asyncpg connection's backend exits a moment later: wait for it."""
        admin = self._admin()
        deadline = time.monotonic() + patience
        try:
            while True:
                try:
                    async with admin.connect() as conn:
                        await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    return
                except DBAPIError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
        finally:
            await admin.dispose()

    async def settings(self) -> dict[str, str]:
        """The server's version and the settings that decide durable-commit speed."""
        admin = self._admin()
        names = ("server_version", "synchronous_commit", "fsync", "wal_sync_method",
                 "shared_buffers", "wal_level", "max_wal_size")  # fmt: skip
        try:
            async with admin.connect() as conn:
                return {n: (await conn.execute(text(f"SHOW {n}"))).scalar_one() for n in names}
        finally:
            await admin.dispose()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(pg: dict[str, str] | None = None) -> list[str]:
    """Lines naming the machine and software a figure was measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    lines = [
        f"date        {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"machine     nproc {usable}, CPU {cpu_model()}, load average {load}",
        f"software    Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{platform.system()} {platform.release()}",
    ]
    if pg:
        lines.append(
            f"postgresql  {pg['server_version']} (synchronous_commit {pg['synchronous_commit']}, "
            f"fsync {pg['fsync']}, wal_sync_method {pg['wal_sync_method']}, "
            f"shared_buffers {pg['shared_buffers']}, wal_level {pg['wal_level']})"
        )
    return lines


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank percentile ``p`` (0..100) of an already sorted sequence."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"
