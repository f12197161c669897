"""Auditor queries (filters, cursor) and the JSON Lines export."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import issue_checkpoint
from audit.export import EXPORT_FORMAT, export_lines
from audit.query import EventQuery, query_events
from audit.writer import AuditWriter
from tests.audit.helpers import BlsSigner, make_event

DAY0 = datetime(2026, 4, 1, tzinfo=UTC)


@pytest.fixture
async def week_of_records(writer: AuditWriter) -> None:
    for n in range(21):
        await writer.append(
            make_event(
                n,
                occurred_at=DAY0 + timedelta(days=n // 3),
                outcome="denied" if n % 4 == 0 else "success",
                http_status=403 if n % 4 == 0 else 200,
            )
        )


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


@pytest.mark.usefixtures("week_of_records")
async def test_export_carries_keys_checkpoints_events_and_head(app_engine: AsyncEngine) -> None:
    signer = BlsSigner()
    checkpoint = await issue_checkpoint(app_engine, signer, DAY0)
    lines = [line async for line in export_lines(app_engine, DAY0, signer.keys)]

    assert all(line.endswith("\n") and "\n" not in line[:-1] for line in lines)
    items = [json.loads(line) for line in lines]
    assert items[0] == {
        "type": "header",
        "format": EXPORT_FORMAT,
        "version": 1,
        "exported_at": "2026-04-01T00:00:00.000000Z",
    }
    assert items[1] == {
        "type": "key",
        "key_id": signer.key_id,
        "public_key": signer.public_key.hex(),
    }
    assert checkpoint is not None
    assert items[2] == {"type": "checkpoint", **checkpoint.to_dict()}
    events = [i for i in items if i["type"] == "event"]
    assert [e["seq"] for e in events] == list(range(1, 22))
    assert all(events[i]["prev_hash"] == events[i - 1]["hash"] for i in range(1, 21))
    assert items[-1] == {"type": "head", "seq": 21, "hash": events[-1]["hash"]}
