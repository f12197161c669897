"""Audit fixtures: a migrated audit store on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit.writer import AuditWriter
from migrations import MIGRATIONS_DIR
from tests.conftest import PgDatabase


def make_engine(url: str, busy_timeout: float = 30.0) -> AsyncEngine:
    """An async engine; SQLite in WAL mode with a busy timeout, as the gateway runs it."""
    if not url.startswith("sqlite"):
        return create_async_engine(url)
    engine = create_async_engine(url, connect_args={"timeout": busy_timeout})

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    return engine


def _upgrade(connection: Connection, app_role: str | None) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    config.attributes["app_role"] = app_role
    command.upgrade(config, "audit@head")


async def migrate_audit(owner_url: str, app_role: str | None = None) -> None:
    """Run the audit branch of the migrations as the owner role."""
    engine = make_engine(owner_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade, app_role)
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class AuditStore:
    kind: str
    owner_url: str
    app_url: str


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AuditStore:
    url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
    await migrate_audit(url)
    return AuditStore("sqlite", url, url)


@pytest.fixture
async def pg_store(pg_database: PgDatabase) -> AuditStore:
    await migrate_audit(pg_database.owner_url, pg_database.app_role)
    return AuditStore("postgresql", pg_database.owner_url, pg_database.app_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def audit_store(request: pytest.FixtureRequest) -> AuditStore:
    name = "sqlite_store" if request.param == "sqlite" else "pg_store"
    return request.getfixturevalue(name)


@pytest.fixture
async def app_engine(audit_store: AuditStore) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(audit_store.app_url)
    yield engine
    await engine.dispose()


@pytest.fixture
async def writer(app_engine: AsyncEngine) -> AsyncIterator[AuditWriter]:
    writer = AuditWriter(app_engine, commit_timeout=3.0)
    await writer.start()
    yield writer
    await writer.stop()
