"""Fixtures shared by the whole suite: the spec vectors and a real PostgreSQL."""

from __future__ import annotations

import os
import pwd
import random
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kzg import Engine, load_engine

REPO = Path(__file__).resolve().parent.parent
# The audit actor of a command run by hand in these tests: the real OS account.
OS_ACTOR = f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
SPEC_TESTS = Path(os.environ.get("KZG_SPEC_TESTS", REPO.parent / "shared" / "kzg-spec-tests"))


def missing(what: str) -> None:
    """Fail the test: every part the product needs is required, never skipped
    (``bash scripts/test.sh`` installs them all)."""
    pytest.fail(f"required but missing: {what}")


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a server a test
    starts later (or restarts): a port from that range could meanwhile be handed to any
    outgoing connection, such as one to PostgreSQL, and the server would fail to bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


@pytest.fixture(scope="session")
def spec_tests_dir() -> Path:
    if not SPEC_TESTS.is_dir():
        missing(f"consensus-spec KZG vectors at {SPEC_TESTS}")
    return SPEC_TESTS


@dataclass(frozen=True)
class PgDatabase:
    """A fresh PostgreSQL database: the owner runs migrations, the app role runs the
    gateway, the auditor role may only read the audit tables (once migrations grant it)."""

    name: str
    owner_url: str
    app_url: str
    app_role: str
    auditor_url: str = ""
    auditor_role: str = ""


# The auditor role scripts/postgres.sh creates, for an environment file written before it.
_AUDITOR_DEFAULTS = {"AUDITOR": "kzg_auditor", "AUDITOR_PASSWORD": "kzg_auditor_test_pw"}


def _pg_env() -> dict[str, str] | None:
    keys = ("HOST", "PORT", "OWNER", "OWNER_PASSWORD", "APP", "APP_PASSWORD")
    env = {k: os.environ.get(f"KZG_TEST_PG_{k}", "") for k in keys}
    if not all(env.values()):
        return None
    for key, default in _AUDITOR_DEFAULTS.items():
        env[key] = os.environ.get(f"KZG_TEST_PG_{key}") or default
    return env


def _pg_url(user: str, password: str, env: dict[str, str], db: str) -> str:
    return f"postgresql+asyncpg://{user}:{password}@{env['HOST']}:{env['PORT']}/{db}"


def _psql(env: dict[str, str], sql: str) -> None:
    subprocess.run(
        [
            "psql",
            "-h",
            env["HOST"],
            "-p",
            env["PORT"],
            "-U",
            env["OWNER"],
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ],
        env={**os.environ, "PGPASSWORD": env["OWNER_PASSWORD"]},
        check=True,
        capture_output=True,
    )


@pytest.fixture
def pg_database() -> Iterator[PgDatabase]:
    """A new, empty database on the PostgreSQL server started by scripts/postgres.sh."""
    env = _pg_env()
    if env is None:
        missing("PostgreSQL (run scripts/postgres.sh and source .pg-test-env)")
    name = f"kzg_test_{secrets.token_hex(6)}"
    _psql(env, f"CREATE DATABASE {name} OWNER {env['OWNER']}")
    _psql(
        env,
        f"REVOKE ALL ON DATABASE {name} FROM PUBLIC; "
        f"GRANT CONNECT ON DATABASE {name} TO {env['APP']}, {env['AUDITOR']}",
    )
    try:
        yield PgDatabase(
            name=name,
            owner_url=_pg_url(env["OWNER"], env["OWNER_PASSWORD"], env, name),
            app_url=_pg_url(env["APP"], env["APP_PASSWORD"], env, name),
            app_role=env["APP"],
            auditor_url=_pg_url(env["AUDITOR"], env["AUDITOR_PASSWORD"], env, name),
            auditor_role=env["AUDITOR"],
        )
    finally:
        # A backend of a just-closed runtime-role connection may still be exiting, and
        # the owner may not terminate it: wait a little for it rather than fail.
        for attempt in range(40):
            try:
                _psql(env, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                break
            except subprocess.CalledProcessError:
                if attempt == 39:
                    raise
                time.sleep(0.25)


# KZG engines, each loaded once per session; the blspy engine's tables are built into a
# session directory, so its cold start (setup validation, table builds) runs on every
# fresh machine.
@pytest.fixture(scope="session")
def kzg_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kzg-cache")


@pytest.fixture(scope="session")
def blspy_engine(kzg_cache_dir: Path) -> Engine:
    return load_engine("blspy", cache_dir=kzg_cache_dir)


@pytest.fixture(scope="session")
def ckzg_engine() -> Engine:
    try:
        import ckzg  # noqa: F401
    except ImportError:
        missing("ckzg (pip install 'kzg-gateway[ckzg]')")
    return load_engine("ckzg")


@pytest.fixture(scope="session", params=["blspy", "ckzg"])
def engine(request: pytest.FixtureRequest) -> Engine:
    return request.getfixturevalue(f"{request.param}_engine")
