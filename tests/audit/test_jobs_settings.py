"""Audit jobs record themselves; the [audit] config section parses strictly."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.jobs import JOB_ACTOR, checkpoint_job, retention_job
from audit.query import EventQuery, query_events
from audit.retention import RetentionPolicy, RetentionRefused
from audit.settings import AuditSettings
from audit.verify import verify_database
from audit.writer import AuditWriter
from tests.audit.conftest import AuditStore
from tests.audit.helpers import BlsSigner, make_event, tamper

NOW = datetime(2026, 6, 1, tzinfo=UTC)
OLD = datetime(2010, 1, 1, tzinfo=UTC)


async def test_checkpoint_job_signs_and_audits_itself(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    head = await writer.append(make_event(1))

    summary = await checkpoint_job(app_engine, writer, signer, NOW)

    assert summary == {"seq": head.seq, "hash": head.hash, "key_id": signer.key_id}
    page = await query_events(app_engine, EventQuery(actor=JOB_ACTOR))
    assert [(e["action"], e["outcome"], e["detail"]) for e in page.events] == [
        ("job:checkpoint", "success", summary)
    ]


async def test_retention_job_prunes_and_audits_itself(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    for n in range(3):
        await writer.append(make_event(n, occurred_at=OLD))
    await writer.append(make_event(3, occurred_at=NOW))

    summary = await retention_job(app_engine, writer, signer, RetentionPolicy(), NOW)

    assert (summary["pruned"], summary["through_seq"], summary["keep_years"]) == (3, 3, 7)
    page = await query_events(app_engine, EventQuery(action="job:retention"))
    assert len(page.events) == 1 and page.events[0]["detail"]["pruned"] == 3
    report = await verify_database(app_engine, public_keys=signer.keys)
    assert report.valid and report.checked == 2  # the recent record and the job's own


async def test_refused_retention_is_audited_as_a_failure(
    audit_store: AuditStore, app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    for n in range(3):
        await writer.append(make_event(n, occurred_at=OLD))
    await tamper(audit_store, "UPDATE audit_events SET outcome = 'x' WHERE seq = 1")

    with pytest.raises(RetentionRefused):
        await retention_job(app_engine, writer, BlsSigner(), RetentionPolicy(), NOW)

    page = await query_events(app_engine, EventQuery(action="job:retention"))
    assert [e["outcome"] for e in page.events] == ["failure"]


def test_settings_parse_and_refuse_nonsense() -> None:
    settings = AuditSettings.from_mapping(
        {"checkpoint_interval_seconds": "60", "retention_policy": "/etc/r.toml", "max_batch": 10}
    )
    assert settings.checkpoint_interval_seconds == 60.0
    assert settings.retention_policy == Path("/etc/r.toml")
    assert settings.max_batch == 10
    assert AuditSettings.from_mapping({}) == AuditSettings()
    with pytest.raises(ValueError, match="checkpoint_intervall"):
        AuditSettings.from_mapping({"checkpoint_intervall": 5})
    with pytest.raises(ValueError, match="commit_timeout"):
        AuditSettings.from_mapping({"commit_timeout_seconds": 0})
