"""Auditor queries (filters, cursor) and the JSON Lines export (format version 2)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import canonical_json
from audit.export import EXPORT_FORMAT, export_lines
from audit.models import audit_anchors
from audit.query import EventQuery, query_events
from audit.retention import RetentionPolicy, run_retention
from audit.signing import NoteLogSigner
from audit.verify import verify_export_lines
from audit.writer import AppendResult, AuditWriter
from tests.audit.conftest import TEST_ORIGIN, AuditStore
from tests.audit.helpers import BlsSigner, make_event
from tests.audit.test_verify import append_events, store_log_keys

DAY0 = datetime(2026, 4, 1, tzinfo=UTC)
OLD = datetime(2018, 5, 1, tzinfo=UTC)


@pytest.fixture
async def week_of_records(writer: AuditWriter) -> list[AppendResult]:
    return [
        await writer.append(
            make_event(
                n,
                occurred_at=DAY0 + timedelta(days=n // 3),
                outcome="denied" if n % 4 == 0 else "success",
                http_status=403 if n % 4 == 0 else 200,
            )
        )
        for n in range(21)
    ]


@pytest.mark.usefixtures("week_of_records")
async def test_filters_combine(app_engine: AsyncEngine) -> None:
    page = await query_events(
        app_engine,
        EventQuery(
            since=DAY0 + timedelta(days=2),
            until=DAY0 + timedelta(days=5),
            actor="apikey:0",
            outcome="success",
        ),
    )
    # Days 2-4 hold n = 6..14; actor apikey:0 is n % 3 == 0; denied is n % 4 == 0.
    expected = [n + 1 for n in range(6, 15) if n % 3 == 0 and n % 4 != 0]
    assert expected and [e["seq"] for e in page.events] == expected
    assert all(e["outcome"] == "success" and e["actor"] == "apikey:0" for e in page.events)
    assert page.next_after_seq is None
    none = await query_events(app_engine, EventQuery(action="login"))
    assert none.events == []


@pytest.mark.usefixtures("week_of_records")
async def test_cursor_pages_through_everything_once(app_engine: AsyncEngine) -> None:
    seen: list[int] = []
    after = 0
    pages = 0
    while True:
        page = await query_events(app_engine, EventQuery(after_seq=after, limit=8))
        pages += 1
        seen.extend(e["seq"] for e in page.events)
        if page.next_after_seq is None:
            break
        after = page.next_after_seq
    assert seen == list(range(1, 22))
    assert pages == 3
    first = (await query_events(app_engine, EventQuery(limit=1))).events[0]
    assert first["input_digests"] == {"commitment": "0" * 64}
    assert first["detail"] == {"note": "ünïcode ok", "n": 0}
    assert first["occurred_at"] == "2026-04-01T00:00:00.000000Z"


def test_limits_are_bounded() -> None:
    with pytest.raises(ValueError, match="limit"):
        EventQuery(limit=0)
    with pytest.raises(ValueError, match="limit"):
        EventQuery(limit=1001)
    with pytest.raises(ValueError, match="after_seq"):
        EventQuery(after_seq=-1)


async def test_export_carries_keys_entries_and_the_signed_checkpoint(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    week_of_records: list[AppendResult],
) -> None:
    await store_log_keys(audit_store, [log_signer.vkey])
    bls = BlsSigner()
    lines = [line async for line in export_lines(app_engine, DAY0, bls.keys)]

    assert all(line.endswith("\n") and "\n" not in line[:-1] for line in lines)
    items = [json.loads(line) for line in lines]
    assert all(canonical_json(item) + "\n" == line for item, line in zip(items, lines, strict=True))
    assert items[0] == {
        "type": "header",
        "format": EXPORT_FORMAT,
        "version": 2,
        "exported_at": "2026-04-01T00:00:00.000000Z",
        "origin": TEST_ORIGIN,
    }
    assert items[1] == {
        "type": "log_key",
        "key_id": "log-0",
        "vkey": log_signer.vkey,
        "status": "current",
        "not_before": "2026-01-01T00:00:00.000000Z",
        "not_after": None,
    }
    assert items[2] == {"type": "key", "key_id": bls.key_id, "public_key": bls.public_key.hex()}
    events = items[3:-1]
    # Each entry is the logged entry itself: the bytes the tree hashed.
    assert events == [{"type": "event", "seq": r.seq, "entry": r.entry} for r in week_of_records]
    assert isinstance(items[-1].pop("issued_at"), str)
    assert items[-1] == {
        "type": "checkpoint",
        "size": 21,
        "note": week_of_records[-1].batch.checkpoint,
    }
    report = verify_export_lines(lines)
    assert report.valid and report.keys_source == "export" and report.checked == 21


async def test_an_export_is_one_snapshot(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, writer: AuditWriter
) -> None:
    await append_events(writer, range(5))
    lines = export_lines(app_engine, DAY0, log_keys=[log_signer.vkey])
    header = await anext(lines)
    # Records committed while the export runs belong to the next one.
    await append_events(writer, range(5, 9))
    rest = [line async for line in lines]
    exported = [header, *rest]

    assert json.loads(exported[-1])["size"] == 5
    assert [json.loads(line).get("seq") for line in exported if '"event"' in line] == [
        1,
        2,
        3,
        4,
        5,
    ]
    report = verify_export_lines(exported)
    assert report.valid and report.head_size == 5
    later = [line async for line in export_lines(app_engine, DAY0, log_keys=[log_signer.vkey])]
    assert verify_export_lines(later).head_size == 9


async def test_an_export_after_retention_starts_at_its_anchor(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, writer: AuditWriter
) -> None:
    await append_events(writer, range(3), occurred_at=OLD)
    await append_events(writer, range(3, 5), occurred_at=DAY0)
    result = await run_retention(app_engine, log_signer, RetentionPolicy(), DAY0)
    assert result.through_seq == 3

    items = [
        json.loads(line)
        async for line in export_lines(app_engine, DAY0, log_keys=[log_signer.vkey])
    ]
    async with app_engine.connect() as conn:
        anchor = dict((await conn.execute(select(audit_anchors))).mappings().one())
    assert [i for i in items if i["type"] == "anchor"] == [{"type": "anchor", **anchor}]
    assert len(anchor["compact"].split(" ")) == 2  # 3 = 2 + 1: two perfect subtrees
    assert [i["seq"] for i in items if i["type"] == "event"] == [4, 5]
    assert verify_export_lines([json.dumps(i) for i in items]).valid
