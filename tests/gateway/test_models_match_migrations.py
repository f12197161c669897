"""The tables the code queries (its SQLAlchemy models) are the tables the migrations
build: Alembic's autogenerate compares every model with a database migrated by
``gateway.db.migrate``, on SQLite and PostgreSQL, and must find nothing to change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import MetaData
from sqlalchemy.engine import Connection

from audit.models import metadata as audit_metadata
from auth.models import metadata as auth_metadata
from gateway.db import make_engine, migrate
from gateway.db import metadata as schema_metadata
from gateway.receipts import metadata as keys_metadata

# Every MetaData of the product: the audit log's, the identity service's, the gateway's
# signing keys and its schema record.
MODELS: list[MetaData] = [audit_metadata, auth_metadata, keys_metadata, schema_metadata]


def _differences(connection: Connection) -> list[Any]:
    # Strict: column types and server defaults are compared too, on both dialects. Not
    # compared, because Alembic cannot: CHECK constraints, triggers (the append-only
    # guards) and grants, which the migrations alone define and their own tests check.
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return compare_metadata(context, MODELS)


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str | None]:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}", None
    pg = request.getfixturevalue("pg_database")
    return pg.owner_url, pg.app_role


async def test_the_models_are_the_migrated_schema(migrated_url: tuple[str, str | None]) -> None:
    """Given a database migrated to every head, then autogenerate finds no table, column,
    type, default, index or unique constraint that differs from the models."""
    url, app_role = migrated_url
    await migrate(url, app_role)
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(_differences)
    finally:
        await engine.dispose()
    assert differences == []


def test_every_table_has_one_model() -> None:
    """No table is modelled twice (two MetaData naming one table would hide a drift)."""
    names = [name for metadata in MODELS for name in metadata.tables]
    assert len(names) == len(set(names)), names
