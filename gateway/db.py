"""Database engines and schema: SQLAlchemy async engines, Alembic migrations to every
branch head (audit, gateway, auth), and the start-up check that the schema is current."""

from __future__ import annotations

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from migrations import MIGRATIONS_DIR

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0


class SchemaNotCurrent(RuntimeError):
    """The database is not at the migrations' heads: run ``kzg-gateway init``."""


def make_engine(
    url: str, busy_timeout: float = SQLITE_BUSY_TIMEOUT_SECONDS, *, pre_ping: bool = True
) -> AsyncEngine:
    """Return an async engine; SQLite runs in WAL mode with a busy timeout so several
    connections (and processes) wait for the write lock instead of failing. ``pre_ping``
    (PostgreSQL) tests each pooled connection before use: a round trip that the audit
    writer, which fails a batch on a dead connection and retries with a new one, skips."""
    if not url.startswith("sqlite"):
        return create_async_engine(url, pool_pre_ping=pre_ping)
    engine = create_async_engine(url, connect_args={"timeout": busy_timeout})

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # Every commit reaches the disk: the audit log answers only after durable commits.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def alembic_config(
    connection: Connection | None = None, app_role: str | None = None
) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    config.attributes["app_role"] = app_role
    return config


def _upgrade(connection: Connection, app_role: str | None, target: str) -> None:
    command.upgrade(alembic_config(connection, app_role), target)
    if app_role and connection.dialect.name == "postgresql":
        # The running gateway checks at start that the schema is current.
        connection.exec_driver_sql(f'GRANT SELECT ON alembic_version TO "{app_role}"')


async def migrate(owner_url: str, app_role: str | None = None, target: str = "heads") -> None:
    """Upgrade every branch to its head (or to ``target``, e.g. ``audit@head``) as the
    schema owner; on PostgreSQL the migrations grant ``app_role`` only what the running
    gateway needs."""
    engine = make_engine(owner_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade, app_role, target)
    finally:
        await engine.dispose()


def _missing_heads(connection: Connection) -> set[str]:
    heads = set(ScriptDirectory.from_config(alembic_config()).get_heads())
    current = set(MigrationContext.configure(connection).get_current_heads())
    return heads - current


async def check_schema(engine: AsyncEngine) -> None:
    """Raise SchemaNotCurrent unless every migration branch is at its head."""
    async with engine.connect() as conn:
        missing = await conn.run_sync(_missing_heads)
    if missing:
        raise SchemaNotCurrent(
            f"database schema is not current (missing {', '.join(sorted(missing))}): "
            "run 'kzg-gateway init'"
        )
