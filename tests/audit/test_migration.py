"""The audit branch migrates up and down cleanly on both databases."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from migrations import MIGRATIONS_DIR
from tests.audit.conftest import AuditStore, make_engine

AUDIT_TABLES = {"audit_events", "audit_chain_head", "audit_checkpoints", "audit_anchors"}


def _downgrade(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.downgrade(config, "audit@base")


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_upgrade_creates_and_downgrade_removes_the_audit_tables(
    audit_store: AuditStore,
) -> None:
    engine = make_engine(audit_store.owner_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) >= AUDIT_TABLES
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade)
        async with engine.connect() as conn:
            assert not AUDIT_TABLES & await conn.run_sync(_tables)
    finally:
        await engine.dispose()
