"""Database engines and schema: SQLAlchemy async engines, Alembic migrations to every
branch head (audit, gateway, auth), and the start-up check that the schema is one this
code can run on: at its heads, or ahead of them by backward-compatible migrations only."""

from __future__ import annotations

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import to_tuple
from sqlalchemy import (
    Boolean,
    Column,
    MetaData,
    String,
    Table,
    Text,
    event,
    insert,
    inspect,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from audit.models import metadata as audit_metadata
from migrations import MIGRATIONS_DIR, PREVIOUS_RELEASE_HEADS

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
# The embedded SQLite database, in the data directory.
DEFAULT_DATABASE_FILE = "gateway.db"
# What an auditor may read beside the audit tables: the public half of the log and
# receipt keys (export and verify list them), never a sealed private key.
AUDITOR_COLUMNS = {
    "log_keys": "key_id, vkey, not_before, not_after, status",
    "receipt_keys": "key_id, public_key, not_before, not_after, status",
}
# The async driver the gateway uses for each dialect a configuration may name.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
}


metadata = MetaData()
# Every applied migration (migration gateway_0004, branch "schema"), so that an older
# release can tell whether it may run on a newer schema.
schema_revisions = Table(
    "schema_revisions",
    metadata,
    Column("revision", String(64), primary_key=True),
    # Comma-separated; empty for the first revision of a branch.
    Column("down_revisions", Text, nullable=False),
    Column("backward_compatible", Boolean, nullable=False),
)


class SchemaNotCurrent(RuntimeError):
    """The database schema is one this code cannot run on (behind it, or ahead of it by a
    migration that is not backward compatible)."""


def async_url(url: str) -> str:
    """Return ``url`` with the async driver the gateway uses for its dialect."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    return f"{_ASYNC_DRIVERS.get(scheme, scheme)}://{rest}"


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


def _record_revisions(connection: Connection) -> None:
    """Add every applied migration this code knows to ``schema_revisions``, so that an
    older release can tell whether it may run on this schema."""
    if not inspect(connection).has_table("schema_revisions"):
        return
    script = ScriptDirectory.from_config(alembic_config())
    current = MigrationContext.configure(connection).get_current_heads()
    recorded = set(connection.execute(select(schema_revisions.c.revision)).scalars())
    for rev in script.revision_map.iterate_revisions(current, "base", inclusive=True):
        if rev is None or rev.revision in recorded:
            continue
        connection.execute(
            insert(schema_revisions).values(
                revision=rev.revision,
                down_revisions=",".join(to_tuple(rev.down_revision, default=())),
                # A module without the flag is taken as incompatible: never guess it safe.
                backward_compatible=bool(getattr(rev.module, "backward_compatible", False)),
            )
        )


def _grant_auditor(connection: Connection, role: str) -> None:
    """SELECT on the audit tables and the public key columns, nothing else. Granted after
    every upgrade, so tables a later migration adds are readable too."""
    tables = [t for t in audit_metadata.tables if inspect(connection).has_table(t)]
    connection.exec_driver_sql(f'GRANT SELECT ON {", ".join(tables)} TO "{role}"')
    for table, columns in AUDITOR_COLUMNS.items():
        if inspect(connection).has_table(table):
            connection.exec_driver_sql(f'GRANT SELECT ({columns}) ON {table} TO "{role}"')


def _upgrade(
    connection: Connection,
    app_role: str | None,
    auditor_role: str | None,
    target: str | tuple[str, ...],
) -> None:
    config = alembic_config(connection, app_role)
    targets = (target,) if isinstance(target, str) else target
    if target == "heads":
        # The lines after the previous release rely on its tables without depending on
        # them (see PREVIOUS_RELEASE_HEADS): Alembic alone could run them first.
        targets = (*PREVIOUS_RELEASE_HEADS, "heads")
    for each in targets:
        command.upgrade(config, each)
    _record_revisions(connection)
    if connection.dialect.name != "postgresql":
        return
    if app_role:
        # The running gateway checks at start that it can run on the schema.
        connection.exec_driver_sql(f'GRANT SELECT ON alembic_version TO "{app_role}"')
    if auditor_role:
        _grant_auditor(connection, auditor_role)


async def migrate(
    owner_url: str,
    app_role: str | None = None,
    target: str | tuple[str, ...] = "heads",
    auditor_role: str | None = None,
) -> None:
    """Upgrade every branch to its head (or to ``target``, one revision or several in
    order, e.g. ``migrations.AUDIT_TARGETS``) as the
    schema owner; on PostgreSQL the migrations grant ``app_role`` only what the running
    gateway needs, and ``auditor_role`` SELECT on the audit tables only."""
    engine = make_engine(owner_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade, app_role, auditor_role, target)
    finally:
        await engine.dispose()


def _schema_refusal(connection: Connection) -> str | None:
    """Why this code cannot run on the connected schema, or None when it can: every
    branch head of the code is applied, and every applied migration the code does not
    know is recorded as backward compatible."""
    script = ScriptDirectory.from_config(alembic_config())
    heads = set(script.get_heads())
    current = set(MigrationContext.configure(connection).get_current_heads())
    known = {rev.revision for rev in script.walk_revisions()}
    unknown = current - known
    recorded: dict[str, tuple[list[str], bool]] = {}
    if unknown and inspect(connection).has_table("schema_revisions"):
        rows = connection.execute(select(schema_revisions))
        recorded = {r[0]: ([d for d in r[1].split(",") if d], bool(r[2])) for r in rows}
    # Walk down from each head this code does not know to the revisions it does know.
    reached: set[str] = set()
    pending = list(unknown)
    seen: set[str] = set()
    while pending:
        revision = pending.pop()
        if revision in seen:
            continue
        seen.add(revision)
        if revision in known:
            reached.add(revision)
            continue
        if revision not in recorded:
            return (
                f"database schema has migration {revision}, which this release does not "
                "know and which has no compatibility record: run the release that added it"
            )
        downs, compatible = recorded[revision]
        if not compatible:
            return (
                f"database schema is ahead of this release by {revision}, which is not "
                "backward compatible (backward_compatible = False): run a release that "
                "includes it"
            )
        pending.extend(downs)
    missing = heads - current - reached
    if missing:
        return (
            f"database schema is behind this release (missing {', '.join(sorted(missing))}): "
            "run 'kzg-gateway init' with the owner URL"
        )
    return None


def _heads(connection: Connection) -> list[str]:
    return sorted(MigrationContext.configure(connection).get_current_heads())


async def current_heads(url: str) -> list[str]:
    """The migration heads applied to the database at ``url`` (empty when none)."""
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_heads)
    finally:
        await engine.dispose()


async def check_schema(engine: AsyncEngine) -> None:
    """Raise SchemaNotCurrent unless this code can run on the schema: at every branch's
    head, or ahead of it by backward-compatible migrations only."""
    async with engine.connect() as conn:
        refusal = await conn.run_sync(_schema_refusal)
    if refusal is not None:
        raise SchemaNotCurrent(refusal)
