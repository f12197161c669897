"""Audit jobs record themselves (the checkpoint job's record is what gets a quiet log a
fresh signed tree head); the [audit] config section parses strictly."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import canonical_json, record_for
from audit.jobs import JOB_ACTOR, checkpoint_job, retention_job
from audit.query import EventQuery, query_events
from audit.retention import RetentionPolicy, RetentionRefused
from audit.settings import DEFAULT_ORIGIN, AuditSettings
from audit.signing import NoteLogSigner
from audit.writer import AuditWriter
from tests.audit import reference_tlog as ref
from tests.audit.conftest import TEST_ORIGIN, AuditStore
from tests.audit.helpers import make_event, tamper
from tests.audit.test_writer import assert_one_tree, read_entries, read_tree_heads

NOW = datetime(2026, 6, 1, tzinfo=UTC)
OLD = datetime(2010, 1, 1, tzinfo=UTC)


async def test_checkpoint_job_appends_its_record_under_a_fresh_signed_head(
    app_engine: AsyncEngine, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    first = await checkpoint_job(writer, NOW)  # an empty log gets its first head too
    await writer.append(make_event(1))

    summary = await checkpoint_job(writer, NOW)

    heads = {h.size: h for h in await read_tree_heads(app_engine)}
    assert first["size"] == 1 and summary["size"] == 3
    for result in (first, summary):
        head = heads[result["size"]]
        assert result == {
            "size": head.size,
            "root": base64.b64encode(head.root).decode(),
            "key_id": log_signer.key_id,
        }
        assert ref.open_checkpoint(head.note, [log_signer.vkey]) == (
            TEST_ORIGIN,
            head.size,
            head.root,
        )
    page = await query_events(app_engine, EventQuery(actor=JOB_ACTOR))
    assert [(e["seq"], e["action"], e["outcome"], e["detail"]) for e in page.events] == [
        (1, "job:checkpoint", "success", {"key_id": log_signer.key_id}),
        (3, "job:checkpoint", "success", {"key_id": log_signer.key_id}),
    ]
    # The record is the head's newest leaf: the signed head proves the job ran.
    job_entry = (await read_entries(app_engine))[2]
    fields = {k: v for k, v in page.events[1].items() if k != "seq"}
    assert job_entry == canonical_json(record_for(3, fields))
    assert fields["occurred_at"] == "2026-06-01T00:00:00.000000Z"
    await assert_one_tree(app_engine, [log_signer.vkey])


async def test_retention_job_prunes_and_audits_itself(
    app_engine: AsyncEngine, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    for n in range(3):
        await writer.append(make_event(n, occurred_at=OLD))
    await writer.append(make_event(3, occurred_at=NOW))
    entries = await read_entries(app_engine)

    summary = await retention_job(app_engine, writer, RetentionPolicy(), NOW)

    assert (summary["pruned"], summary["through_seq"], summary["keep_years"]) == (3, 3, 7)
    assert summary["reason"] == "pruned"
    page = await query_events(app_engine, EventQuery(action="job:retention"))
    assert [(e["seq"], e["outcome"], e["detail"]) for e in page.events] == [(5, "success", summary)]
    # The recent record and the job's own remain; the tree still holds all five.
    retained = await read_entries(app_engine, first=4)
    assert retained[0] == entries[3] and len(retained) == 2
    entries.append(retained[1])
    await assert_one_tree(app_engine, [log_signer.vkey], entries=entries)


async def test_refused_retention_is_audited_as_a_failure(
    audit_store: AuditStore, app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    for n in range(3):
        await writer.append(make_event(n, occurred_at=OLD))
    await tamper(audit_store, "UPDATE audit_events SET outcome = 'x' WHERE seq = 1")

    with pytest.raises(RetentionRefused, match="record 1 does not match"):
        await retention_job(app_engine, writer, RetentionPolicy(), NOW)

    page = await query_events(app_engine, EventQuery(action="job:retention"))
    assert [(e["outcome"], e["actor"]) for e in page.events] == [("failure", JOB_ACTOR)]
    assert "record 1 does not match" in page.events[0]["detail"]["error"]
    assert [e["seq"] for e in (await query_events(app_engine, EventQuery())).events] == [
        1,
        2,
        3,
        4,
    ]


def test_settings_parse_and_refuse_nonsense(tmp_path: Path) -> None:
    policy = tmp_path / "r.toml"
    policy.write_text("[audit]\nkeep_years = 9\n")
    settings = AuditSettings.from_mapping(
        {
            "origin": "audit.example.com/kzg-gateway",
            "checkpoint_interval_seconds": 60,
            "retention_policy": str(policy),
            "max_batch": 10,
        }
    )
    assert settings.origin == "audit.example.com/kzg-gateway"
    assert settings.checkpoint_interval_seconds == 60.0
    assert settings.retention_policy == policy
    assert settings.retention() == RetentionPolicy(keep_years=9)
    assert settings.max_batch == 10
    assert AuditSettings.from_mapping({}) == AuditSettings()
    assert AuditSettings().origin == DEFAULT_ORIGIN == "kzg-gateway.localhost/audit"
    refusals = [
        ({"checkpoint_intervall": 5}, "checkpoint_intervall"),
        ({"commit_timeout_seconds": 0}, "commit_timeout"),
        ({"commit_timeout_seconds": 61}, "commit_timeout"),
        ({"retention_interval_seconds": -1}, "retention_interval_seconds"),
        ({"max_batch": 0}, "max_batch"),
        # A value of the wrong kind is refused, not converted.
        ({"checkpoint_interval_seconds": "60"}, r"checkpoint_interval_seconds must be a number"),
        ({"max_batch": 10.5}, r"max_batch must be an integer"),
        ({"record_probes": 1}, r"record_probes must be true or false"),
        ({"origin": 7}, r"origin must be a string"),
    ]
    for section, message in refusals:
        with pytest.raises(ValueError, match=message):
            AuditSettings.from_mapping(section)


@pytest.mark.parametrize(
    "origin",
    ["", "audit example.com", "audit.example.com/kzg+gateway", "tab\there", "new\nline", "\u00a0"],
)
def test_an_origin_that_cannot_name_a_note_key_is_refused(origin: str) -> None:
    # The origin is the log key's name in every signature line, where a space ends the
    # name and '+' separates a verifier key's fields.
    with pytest.raises(ValueError, match="origin"):
        AuditSettings.from_mapping({"origin": origin})
    with pytest.raises(AssertionError):
        ref.check_key_name(origin, "origin")


@pytest.mark.parametrize("origin", ["kzg-gateway.localhost/audit", "a.example/ü/log", "x"])
def test_an_origin_that_names_a_note_key_is_accepted(origin: str) -> None:
    assert AuditSettings.from_mapping({"origin": origin}).origin == origin
    signer = NoteLogSigner.generate(origin)
    assert ref.parse_vkey(signer.vkey)[0] == origin
