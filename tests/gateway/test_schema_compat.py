"""``serve``'s schema check: at the code's heads, or ahead of them by migrations recorded
as backward compatible; behind, or ahead by an incompatible or unrecorded migration, is
refused with a message naming the revision. On SQLite and PostgreSQL."""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from gateway.db import SchemaNotCurrent, alembic_config, check_schema, make_engine, migrate
from migrations import MIGRATIONS_DIR
from tests.conftest import PgDatabase


def test_every_migration_declares_whether_it_is_backward_compatible() -> None:
    for path in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert isinstance(getattr(module, "backward_compatible", None), bool), path.name
        # The reason is given beside the flag.
        source = path.read_text().splitlines()
        flag = next(i for i, line in enumerate(source) if line.startswith("backward_compatible"))
        assert source[flag - 1].startswith("# "), path.name


@pytest.fixture(params=["sqlite", "postgresql"])
async def urls(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(owner URL, app URL) of a database migrated to this release's heads."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        await migrate(url)
        yield url, url
        return
    pg: PgDatabase = request.getfixturevalue("pg_database")
    await migrate(pg.owner_url, pg.app_role)
    yield pg.owner_url, pg.app_url


async def _owner_sql(url: str, *statements: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement))
    finally:
        await engine.dispose()


async def _check(url: str) -> None:
    engine = make_engine(url)
    try:
        await check_schema(engine)
    finally:
        await engine.dispose()


def _ahead(revision: str, compatible: bool, down: str = "gateway_0003") -> tuple[str, ...]:
    """What a later release's migration leaves: its head in place of ``down``, recorded."""
    return (
        f"UPDATE alembic_version SET version_num = '{revision}' WHERE version_num = '{down}'",
        "INSERT INTO schema_revisions (revision, down_revisions, backward_compatible) "
        f"VALUES ('{revision}', '{down}', {'TRUE' if compatible else 'FALSE'})",
    )


async def test_the_code_runs_on_its_own_heads(urls: tuple[str, str]) -> None:
    _, app = urls
    await _check(app)
    engine = make_engine(app)
    try:
        async with engine.connect() as conn:
            rows = dict(
                (
                    await conn.execute(
                        text("SELECT revision, backward_compatible FROM schema_revisions")
                    )
                ).all()
            )
    finally:
        await engine.dispose()
    # Every applied migration is recorded with its module's flag (SQLite answers 0/1).
    assert not rows["audit_0003"] and rows["auth_0002"]
    revisions = ScriptDirectory.from_config(alembic_config()).walk_revisions()
    assert set(rows) == {rev.revision for rev in revisions}


async def test_a_schema_ahead_by_compatible_migrations_is_served(urls: tuple[str, str]) -> None:
    owner, app = urls
    await _owner_sql(
        owner, *_ahead("gateway_0005", True), *_ahead("gateway_0006", True, "gateway_0005")
    )
    await _check(app)


async def test_a_schema_ahead_by_an_incompatible_migration_is_refused(
    urls: tuple[str, str],
) -> None:
    owner, app = urls
    await _owner_sql(
        owner, *_ahead("gateway_0005", True), *_ahead("gateway_0006", False, "gateway_0005")
    )
    with pytest.raises(SchemaNotCurrent, match=r"ahead of this release by gateway_0006, which"):
        await _check(app)


async def test_an_unrecorded_migration_is_refused(urls: tuple[str, str]) -> None:
    owner, app = urls
    await _owner_sql(
        owner,
        "UPDATE alembic_version SET version_num = 'auth_0009' WHERE version_num = 'auth_0003'",
    )
    with pytest.raises(SchemaNotCurrent, match="auth_0009, which this release does not know"):
        await _check(app)


async def test_a_schema_behind_the_code_is_refused(urls: tuple[str, str]) -> None:
    owner, app = urls
    await _owner_sql(
        owner,
        "UPDATE alembic_version SET version_num = 'auth_0002' WHERE version_num = 'auth_0003'",
    )
    with pytest.raises(SchemaNotCurrent, match=r"behind this release \(missing auth_0003\)"):
        await _check(app)
