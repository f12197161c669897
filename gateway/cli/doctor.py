"""``kzg-gateway doctor``: check what an instance needs before (or while) it serves.

Each check prints one JSON object per line: ``{"check", "status", "detail", ...}`` with
status ``ok``, ``warn`` (works, but act soon) or ``fail``. The exit status is 1 when a
check failed, else 0. The checks read the same configuration as ``serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from auth.crypto import MasterKey, load_master_key
from gateway.cli import common_options
from gateway.config import Config, ConfigError, load_config
from gateway.db import check_schema, make_engine
from gateway.pool import pool_settings
from gateway.state import ProbeSettings, free_bytes
from gateway.tls import certificate_not_after, tls_files

DATABASE_TIMEOUT_SECONDS = 5.0
CERT_WARN_DAYS = 14
# Below this the engine workers and the audit writer's batches may not fit.
MIN_AVAILABLE_MEMORY_MIB = 256
# The commitment to the zero blob is the point at infinity (compressed G1).
_INFINITY = bytes([0xC0]) + bytes(47)


@dataclass
class Check:
    check: str
    status: str = "ok"
    detail: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return json.dumps(
            {"check": self.check, "status": self.status, "detail": self.detail, **self.values}
        )


class Doctor:
    """Runs the checks in order; later ones skip what an earlier failure makes moot."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.results: list[Check] = []

    async def run(self, emit: Callable[[Check], None]) -> list[Check]:
        steps: list[tuple[str, Callable[[Check], Awaitable[None]]]] = [
            ("config", self._config),
            ("database", self._database),
            ("schema", self._schema),
            ("master_key", self._master_key),
            ("tls", self._tls),
            ("disk", self._disk),
            ("memory", self._memory),
            ("engine", self._engine),
        ]
        for name, step in steps:
            result = Check(name)
            try:
                await step(result)
            except Exception as exc:  # each failure is reported, never a traceback
                result.status, result.detail = "fail", f"{type(exc).__name__}: {exc}"
            self.results.append(result)
            emit(result)
        return self.results

    def _failed(self, name: str) -> bool:
        return any(r.check == name and r.status == "fail" for r in self.results)

    async def _config(self, result: Check) -> None:
        from gateway.identity import policies_for

        config = self.config
        config.audit.retention()
        ProbeSettings.from_settings(config.server)
        pool_settings(config)
        policies_for(config)
        dialect = config.database_url.partition(":")[0].partition("+")[0]
        result.detail = f"configuration, policies and retention policy read ({dialect})"
        result.values = {"data_dir": str(config.data_dir.resolve()), "url": config.url}

    async def _with_engine(self, work: Callable[[Any], Awaitable[Any]]) -> Any:
        engine = make_engine(self.config.database_url, busy_timeout=DATABASE_TIMEOUT_SECONDS)
        try:
            async with asyncio.timeout(DATABASE_TIMEOUT_SECONDS):
                return await work(engine)
        finally:
            await engine.dispose()

    async def _database(self, result: Check) -> None:
        async def ping(engine: Any) -> float:
            started = time.perf_counter()
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return time.perf_counter() - started

        seconds = await self._with_engine(ping)
        result.detail = "the database answers"
        result.values = {"latency_ms": round(seconds * 1000, 1)}

    async def _schema(self, result: Check) -> None:
        if self._failed("database"):
            result.status, result.detail = "fail", "skipped: the database does not answer"
            return
        await self._with_engine(check_schema)
        result.detail = "every migration branch is at its head"

    async def _master_key(self, result: Check) -> None:
        from auth.service import master_key_is_current

        key: MasterKey = load_master_key(self.config.data_dir)
        if self._failed("schema") or self._failed("database"):
            result.status = "warn"
            result.detail = "master key loaded; not compared (the database is not usable)"
            return

        async def current(engine: Any) -> bool:
            return await master_key_is_current(engine, key)

        if await self._with_engine(current):
            result.detail = "the master key is the one the database records"
        else:
            result.status = "fail"
            result.detail = "the database records another master key (rotated?)"

    async def _tls(self, result: Check) -> None:
        cert_file, key_file = tls_files(self.config.tls, self.config.data_dir)
        for path in (cert_file, key_file):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing")
        days = (certificate_not_after(cert_file) - time.time()) / 86400
        result.values = {"certificate": str(cert_file), "days_left": round(days, 1)}
        if days <= 0:
            result.status, result.detail = "fail", "the certificate has expired"
        elif days < CERT_WARN_DAYS:
            result.status, result.detail = "warn", f"expires in less than {CERT_WARN_DAYS} days"
        else:
            result.detail = "certificate and key present"

    async def _disk(self, result: Check) -> None:
        url = self.config.database_url
        if not url.startswith("sqlite"):
            # The database server's disk is not visible from here (its own monitoring
            # watches it); nothing of the gateway's needs local space.
            result.detail = "PostgreSQL: no local data to store"
            return
        directory = Path(url.partition(":///")[2]).parent
        settings = ProbeSettings.from_settings(self.config.server)
        free_mib = free_bytes(directory) / 2**20
        result.values = {"path": str(directory), "free_mib": round(free_mib)}
        if free_mib < settings.min_free_disk_mib:
            result.status = "fail"
            result.detail = f"less than server.min_free_disk_mib ({settings.min_free_disk_mib})"
        else:
            result.detail = "enough free space for the SQLite database"

    async def _memory(self, result: Check) -> None:
        available = _meminfo_mib("MemAvailable")
        # In a container the cgroup's limit binds first; /proc/meminfo shows the host.
        cgroup = _cgroup_available_mib()
        if cgroup is not None:
            available = cgroup if available is None else min(available, cgroup)
        result.values = {"available_mib": available}
        if available is None:
            result.status, result.detail = "warn", "/proc/meminfo has no MemAvailable"
        elif available < MIN_AVAILABLE_MEMORY_MIB:
            result.status = "fail"
            result.detail = f"less than {MIN_AVAILABLE_MEMORY_MIB} MiB available"
        else:
            result.detail = "enough memory available"

    async def _engine(self, result: Check) -> None:
        from kzg import load_engine

        settings = pool_settings(self.config)
        names = [settings.engine, *([settings.cross_check] if settings.cross_check else [])]
        timings: dict[str, float] = {}
        for name in names:
            started = time.perf_counter()
            # Loading builds or reads the engine's tables; the zero blob checks they serve.
            engine = await asyncio.to_thread(load_engine, name)
            commitment = await asyncio.to_thread(engine.blob_to_kzg_commitment, bytes(131072))
            if commitment != _INFINITY:
                raise ValueError(f"engine {name} computes a wrong commitment")
            timings[name] = round(time.perf_counter() - started, 2)
        result.detail = "engine tables load and compute a known commitment"
        result.values = {"load_seconds": timings}


def _meminfo_mib(key: str) -> int | None:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0]) // 1024
    return None


def _cgroup_available_mib(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """memory.max - memory.current of this process's cgroup (v2); None without a limit."""
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    return max(0, int(limit) - used) // 2**20


def run_doctor(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.data_dir)
    except ConfigError as exc:
        print(Check("config", "fail", str(exc)).line())
        return 1
    results = asyncio.run(Doctor(config).run(lambda check: print(check.line(), flush=True)))
    return 1 if any(r.status == "fail" for r in results) else 0


def register(commands: Any) -> None:
    doctor = commands.add_parser(
        "doctor", help="check config, database, master key, TLS, disk, memory, engine"
    )
    common_options(doctor)
    doctor.set_defaults(func=run_doctor)
