"""Tampering is found at the right seq, in the database (online) and in an export (offline)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import chain_hash, record_for
from audit.checkpoints import issue_checkpoint
from audit.events import EVENT_FIELDS
from audit.export import export_lines
from audit.verify import verify_database, verify_export_lines
from audit.writer import AuditWriter
from tests.audit.conftest import AuditStore
from tests.audit.helpers import BlsSigner, make_event, tamper

NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture
async def ten_records(writer: AuditWriter) -> None:
    for n in range(1, 11):
        await writer.append(make_event(n))


async def _export(engine: AsyncEngine, keys: dict[str, bytes] | None = None) -> list[str]:
    return [line async for line in export_lines(engine, NOW, public_keys=keys)]


@pytest.mark.usefixtures("ten_records")
@pytest.mark.parametrize(
    ("statements", "first_bad"),
    [
        (["UPDATE audit_events SET actor = 'mallory' WHERE seq = 4"], 4),
        (["UPDATE audit_events SET http_status = 403 WHERE seq = 1"], 1),
        (["UPDATE audit_events SET detail = '{\"n\":7}' WHERE seq = 7"], 7),
        (["DELETE FROM audit_events WHERE seq = 5"], 5),
        (["DELETE FROM audit_events WHERE seq = 10"], 10),
        (["DELETE FROM audit_events WHERE seq >= 8"], 8),
        (
            [
                "UPDATE audit_events SET seq = -3 WHERE seq = 3",
                "UPDATE audit_events SET seq = 3 WHERE seq = 4",
                "UPDATE audit_events SET seq = 4 WHERE seq = -3",
            ],
            3,
        ),
        (
            [
                "INSERT INTO audit_events (seq, prev_hash, hash, request_id, occurred_at, "
                "action, outcome, input_digests, detail) SELECT 11, hash, hash, 'forged', "
                "occurred_at, action, 'success', '{}', '{}' FROM audit_events WHERE seq = 10"
            ],
            11,
        ),
        (["UPDATE audit_events SET prev_hash = hash WHERE seq = 6"], 6),
    ],
    ids=[
        "edit-actor",
        "edit-status",
        "edit-detail",
        "delete-middle",
        "delete-last",
        "delete-tail",
        "reorder",
        "insert-after-head",
        "relink",
    ],
)
async def test_tampering_is_found_at_its_seq_online(
    audit_store: AuditStore, app_engine: AsyncEngine, statements: list[str], first_bad: int
) -> None:
    assert (await verify_database(app_engine, public_keys={})).valid

    await tamper(audit_store, *statements)

    report = await verify_database(app_engine, public_keys={})
    assert not report.valid
    assert report.first_bad_seq == first_bad, report.reason
    assert report.checked == first_bad - 1


def _events(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines]


def _dump(items: list[dict]) -> list[str]:
    return [json.dumps(item) for item in items]


def _edit(items: list[dict], seq: int, **changes: object) -> list[dict]:
    return [
        {**item, **changes} if item["type"] == "event" and item["seq"] == seq else item
        for item in items
    ]


def _drop(items: list[dict], seq: int) -> list[dict]:
    return [item for item in items if not (item["type"] == "event" and item["seq"] == seq)]


def _swap(items: list[dict], a: int, b: int) -> list[dict]:
    index = {item["seq"]: i for i, item in enumerate(items) if item["type"] == "event"}
    items = list(items)
    items[index[a]], items[index[b]] = items[index[b]], items[index[a]]
    return items


def _duplicate(items: list[dict], seq: int) -> list[dict]:
    out: list[dict] = []
    for item in items:
        if item["type"] == "event" and item["seq"] == seq:
            out.append({**item, "request_id": "forged"})
        out.append(item)
    return out


@pytest.mark.usefixtures("ten_records")
@pytest.mark.parametrize(
    ("mutate", "first_bad"),
    [
        (lambda items: _edit(items, 4, actor="mallory"), 4),
        (lambda items: _edit(items, 9, input_digests={"blob": "00" * 32}), 9),
        (lambda items: _drop(items, 5), 5),
        (lambda items: _swap(items, 3, 4), 3),
        (lambda items: _duplicate(items, 6), 6),
        (lambda items: [item for item in items if item["type"] != "head"], 11),
        (lambda items: [i for i in items if not (i["type"] == "event" and i["seq"] > 7)], 8),
    ],
    ids=["edit", "edit-digest", "delete", "reorder", "insert", "no-head", "truncated"],
)
async def test_tampering_is_found_at_its_seq_offline(
    app_engine: AsyncEngine, mutate, first_bad: int
) -> None:
    items = _events(await _export(app_engine, keys={}))
    assert verify_export_lines(_dump(items)).valid

    report = verify_export_lines(_dump(mutate(items)))

    assert not report.valid
    assert report.first_bad_seq == first_bad, report.reason


async def test_rewritten_history_with_fresh_hashes_breaks_the_signed_checkpoint(
    audit_store: AuditStore, app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    for n in range(1, 6):
        await writer.append(make_event(n))
    checkpoint = await issue_checkpoint(app_engine, signer, NOW)
    assert checkpoint is not None and checkpoint.seq == 5
    items = _events(await _export(app_engine, keys=signer.keys))

    # A forger who knows the hash formula rewrites seq 3 and re-chains everything after it.
    prev = None
    for item in items:
        if item["type"] != "event":
            continue
        if item["seq"] == 3:
            item["outcome"] = "denied"
        if item["seq"] >= 3:
            item["prev_hash"] = prev
            fields = {name: item[name] for name in EVENT_FIELDS}
            item["hash"] = chain_hash(prev, record_for(item["seq"], fields))
        prev = item["hash"]
    for item in items:
        if item["type"] == "head":
            item["hash"] = prev

    report = verify_export_lines(_dump(items))
    assert not report.valid
    assert report.first_bad_seq == 5
    assert "checkpoint" in (report.reason or "")


async def test_checkpoint_with_a_bad_signature_or_unknown_key_fails(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    await writer.append(make_event(1))
    await issue_checkpoint(app_engine, signer, NOW)
    assert (await verify_database(app_engine, public_keys=signer.keys)).valid

    other = BlsSigner()
    report = await verify_database(app_engine, public_keys=other.keys)
    assert not report.valid and report.first_bad_seq == 1

    lines = await _export(app_engine, keys=signer.keys)
    assert verify_export_lines(lines).valid
    pinned = verify_export_lines(lines, trusted_keys={signer.key_id: other.public_key})
    assert not pinned.valid and "signature" in (pinned.reason or "")


async def test_an_empty_chain_verifies(app_engine: AsyncEngine) -> None:
    report = await verify_database(app_engine, public_keys={})
    assert report.valid and report.checked == 0 and report.head_seq == 0
    assert verify_export_lines(await _export(app_engine, keys={})).valid


@pytest.mark.usefixtures("ten_records")
async def test_an_event_line_without_its_hashes_breaks_the_chain_there(
    app_engine: AsyncEngine,
) -> None:
    items = _events(await _export(app_engine, keys={}))
    broken = [
        {k: v for k, v in item.items() if k != "hash"}
        if item["type"] == "event" and item["seq"] == 6
        else item
        for item in items
    ]
    report = verify_export_lines(_dump(broken))
    assert not report.valid and report.first_bad_seq == 6


def test_a_line_that_is_not_an_export_item_is_refused() -> None:
    with pytest.raises(ValueError, match="line 2"):
        verify_export_lines(['{"type": "header"}', "not json"])
