"""Audit fixtures: a migrated audit store on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.signing import NoteLogSigner
from audit.writer import AuditWriter
from gateway.db import make_engine, migrate
from migrations import AUDIT_TARGETS
from tests.conftest import PgDatabase

__all__ = ["make_engine", "migrate_audit"]  # the audit tests import both from here


async def migrate_audit(owner_url: str, app_role: str | None = None) -> None:
    """Run the audit branch of the migrations as the owner role."""
    await migrate(owner_url, app_role, target=AUDIT_TARGETS)


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


TEST_ORIGIN = "test.example/audit"


@pytest.fixture
def log_signer() -> NoteLogSigner:
    """A fresh log key (the gateway keeps its own sealed in the database)."""
    return NoteLogSigner.generate(TEST_ORIGIN)


@pytest.fixture
async def writer(app_engine: AsyncEngine, log_signer: NoteLogSigner) -> AsyncIterator[AuditWriter]:
    writer = AuditWriter(app_engine, log_signer, commit_timeout=3.0)
    await writer.start()
    yield writer
    await writer.stop()
