"""The identity jobs on a real data directory (SQLite and PostgreSQL), with the clock of
the job context moved forward: ``rotate-keys`` replaces keys past their policy age and
expires API keys, ``access-review`` flags what needs attention; each run is audited."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from audit.models import audit_events, audit_tree_heads
from audit.writer import AuditWriter
from auth.crypto import MasterKey
from gateway.cli.serve import initialise
from gateway.db import make_engine
from gateway.identity_jobs import service_for
from gateway.jobs import JobContext, run_job
from gateway.receipts import list_log_keys, load_log_signer
from tests.audit import reference_tlog
from tests.auth.conftest import CHEAP_ARGON2
from tests.gateway.conftest import gateway_config
from tests.gateway.helpers import ORIGIN


@pytest.fixture(params=["sqlite", "postgresql"])
async def job_context(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobContext]:
    sections: dict[str, object] = {"auth": CHEAP_ARGON2}
    if request.param == "postgresql":
        pg = request.getfixturevalue("pg_database")
        sections.update(
            database_url=pg.app_url, database_owner_url=pg.owner_url, database_app_role=pg.app_role
        )
    config = gateway_config(tmp_path / "d", **sections)
    await initialise(config)
    master_key = MasterKey.from_text((config.data_dir / "master.key").read_text())
    engine = make_engine(config.database_url)
    signer = await load_log_signer(engine, master_key, ORIGIN)
    writer = AuditWriter(engine, signer)
    await writer.start()
    yield JobContext(config, engine, writer, master_key, signer)
    await writer.stop()
    await engine.dispose()


async def _job_records(ctx: JobContext, name: str) -> list[dict[str, object]]:
    async with ctx.engine.connect() as conn:
        rows = await conn.execute(
            select(audit_events).where(audit_events.c.action == f"job:{name}")
        )
        return [dict(r._mapping) for r in rows]


async def _latest_head(ctx: JobContext) -> dict[str, object]:
    async with ctx.engine.connect() as conn:
        row = (
            await conn.execute(
                select(audit_tree_heads).order_by(audit_tree_heads.c.size.desc()).limit(1)
            )
        ).one()
        return dict(row._mapping)


async def test_rotate_keys_acts_on_policy_age_only(job_context: JobContext) -> None:
    ctx = job_context
    service = service_for(ctx)
    key = await service.create_api_key("short-lived", "client", "test", expires_in_days=5)
    first_jwt = (await service.jwks())["keys"][0]["kid"]

    fresh = await run_job("rotate-keys", ctx)
    assert (fresh["jwt_rotated"], fresh["log_key_rotated"], fresh["api_keys_expired"]) == (
        None,
        None,
        [],
    )
    [first_log_key] = await list_log_keys(ctx.engine)

    later = datetime.now(UTC) + timedelta(days=91)
    ctx.now = lambda: later
    aged = await run_job("rotate-keys", ctx)
    assert aged["jwt_rotated"] not in (None, first_jwt)
    assert aged["log_key_rotated"] not in (None, first_log_key.key_id)
    assert aged["api_keys_expired"] == [key["id"]]
    log_keys = {k.key_id: k for k in await list_log_keys(ctx.engine)}
    assert log_keys[aged["log_key_rotated"]].status == "current"
    assert log_keys[first_log_key.key_id].status == "retired", "the old key stays, retired"
    assert log_keys[first_log_key.key_id].not_after is not None
    assert ctx.signer.key_id == aged["log_key_rotated"]
    # The writer signs with the new key from the next commit on: the job's own record
    # is in a tree head signed by it, which the old key does not verify.
    new_vkey = log_keys[aged["log_key_rotated"]].vkey
    head = await _latest_head(ctx)
    assert head["key_id"] == aged["log_key_rotated"]
    assert reference_tlog.open_checkpoint(head["note"], [new_vkey])[0] == ORIGIN
    with pytest.raises(AssertionError, match="no verified signature"):
        reference_tlog.open_checkpoint(head["note"], [first_log_key.vkey])

    again = await run_job("rotate-keys", ctx)
    assert (again["jwt_rotated"], again["log_key_rotated"], again["api_keys_expired"]) == (
        None,
        None,
        [],
    )
    records = await _job_records(ctx, "rotate-keys")
    assert len(records) == 3 and {r["outcome"] for r in records} == {"success"}
    assert key["api_key"] not in json.dumps(records, default=str)


async def test_access_review_job_flags_and_audits(job_context: JobContext) -> None:
    ctx = job_context
    service = service_for(ctx)
    idle = await service.create_api_key("idle", "auditor", "test", expires_in_days=30)
    later = datetime.now(UTC) + timedelta(days=20)
    ctx.now = lambda: later
    result = await run_job("access-review", ctx)
    by_name = {p["name"]: p for p in result["review"]["principals"]}
    assert {"expiring", "never_used"} <= set(by_name["idle"]["flags"])
    assert by_name["admin"]["roles"] == ["admin"] and "never_used" in by_name["admin"]["flags"]
    flagged = {f["principal"] for f in result["flagged"]}
    assert idle["id"] in flagged
    assert by_name["admin"]["principal"] in flagged, "a never-used account is flagged too"
    (record,) = await _job_records(ctx, "access-review")
    assert record["outcome"] == "success" and idle["id"] in str(record["detail"])
