"""Offline verification of the Merkle tree log: tampering is found at the right seq in
the database (full walk, sample) and in an export; held checkpoints are proven extended;
anchors and the first release's hash chain keep verifying."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Column, LargeBinary, MetaData, Table, Text, insert, text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import GENESIS_HASH, canonical_json, chain_hash, record_for
from audit.checkpoints import sign_head
from audit.export import export_lines
from audit.merkle import CompactRange, leaf_hash
from audit.models import columns_for
from audit.retention import RetentionPolicy, run_retention
from audit.signing import NoteLogSigner, legacy_checkpoint_message
from audit.tlog import Checkpoint
from audit.verify import load_log_keys, verify_database, verify_export_lines
from audit.writer import AppendResult, AuditWriter
from gateway.db import migrate
from tests.audit.conftest import TEST_ORIGIN, AuditStore, make_engine, migrate_audit
from tests.audit.helpers import BlsSigner, Statement, make_event, tamper
from tests.conftest import PgDatabase

NOW = datetime(2026, 6, 1, tzinfo=UTC)
OLD = datetime(2018, 5, 1, tzinfo=UTC)
# -- helpers shared by the audit verification tests -------------------------------------


async def store_log_keys(store: AuditStore, vkeys: Sequence[str]) -> None:
    """Create the gateway's ``log_keys`` table (as its migration will) holding ``vkeys``."""
    table = Table(
        "log_keys",
        MetaData(),
        Column("key_id", Text, primary_key=True),
        Column("vkey", Text, nullable=False, unique=True),
        Column("sealed_private_key", LargeBinary, nullable=False),
        Column("not_before", Text, nullable=False),
        Column("not_after", Text),
        Column("status", Text, nullable=False),
    )
    engine = make_engine(store.owner_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(table.metadata.create_all)
            if store.kind == "postgresql":
                role = store.app_url.split("://", 1)[1].split(":", 1)[0]
                await conn.execute(text(f'GRANT SELECT ON log_keys TO "{role}"'))
            for n, vkey in enumerate(vkeys):
                await conn.execute(
                    insert(table).values(
                        key_id=f"log-{n}",
                        vkey=vkey,
                        sealed_private_key=b"sealed",
                        not_before=f"2026-01-0{n + 1}T00:00:00.000000Z",
                        not_after=None if n == len(vkeys) - 1 else "2026-02-01T00:00:00.000000Z",
                        status="current" if n == len(vkeys) - 1 else "retired",
                    )
                )
    finally:
        await engine.dispose()


async def export_of(
    engine: AsyncEngine, log_signer: NoteLogSigner | None = None, **kw: Any
) -> list[str]:
    log_keys = [log_signer.vkey] if log_signer is not None else None
    return [line async for line in export_lines(engine, NOW, log_keys=log_keys, **kw)]


def items_of(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines]


def lines_of(items: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(item, ensure_ascii=False) + "\n" for item in items]


async def append_events(
    writer: AuditWriter, numbers: range, **overrides: Any
) -> list[AppendResult]:
    """One group commit (and signed tree head) per record, so every size is checkpointed."""
    return [await writer.append(make_event(n, **overrides)) for n in numbers]


@pytest.fixture
async def ten(writer: AuditWriter) -> list[AppendResult]:
    return await append_events(writer, range(1, 11))


# -- full verification in the database ---------------------------------------------------


async def test_full_verification_of_a_valid_log(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, ten: list[AppendResult]
) -> None:
    report = await verify_database(app_engine, [log_signer.vkey])

    assert report.valid, report.reason
    assert (report.checked, report.head_size, report.tree_size) == (10, 10, 10)
    assert report.head_root == ten[-1].batch.tree.root()
    assert report.checkpoints == 10  # one signed tree head per group commit
    assert (report.method, report.keys_source, report.legacy) == ("full", "pinned", None)
    answer = report.to_dict()
    assert answer["head"] == {"size": 10, "root": base64.b64encode(report.head_root).decode()}
    assert set(answer) >= {
        "valid",
        "checked",
        "head",
        "first_bad_seq",
        "reason",
        "checkpoints",
        "anchors",
        "keys_source",
        "retention_floor",
        "tree_size",
        "legacy",
        "method",
        "sampled",
    }


def _leaf_of(seq: int, n: int, **changes: Any) -> bytes:
    fields = make_event(n, **changes).fields()
    return leaf_hash(canonical_json(record_for(seq, fields)).encode())


@pytest.mark.usefixtures("ten")
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
                "INSERT INTO audit_events (seq, request_id, occurred_at, action, outcome, "
                "input_digests, detail) SELECT 11, 'forged', occurred_at, action, 'success', "
                "'{}', '{}' FROM audit_events WHERE seq = 10"
            ],
            11,
        ),
        (
            # The forger also rewrites the stored leaf: the signed root at size 6 differs.
            [
                "UPDATE audit_events SET actor = 'mallory' WHERE seq = 6",
                (
                    "UPDATE audit_tree SET hash = :leaf WHERE level = 0 AND idx = 5",
                    {"leaf": _leaf_of(6, 6, actor="mallory")},
                ),
            ],
            6,
        ),
        (["DELETE FROM audit_tree_heads WHERE size >= 9"], 9),
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
        "rewrite-leaf-too",
        "drop-signed-heads",
    ],
)
async def test_tampering_is_found_at_its_seq_in_the_database(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    statements: list[Statement],
    first_bad: int,
) -> None:
    assert (await verify_database(app_engine, [log_signer.vkey])).valid

    await tamper(audit_store, *statements)

    report = await verify_database(app_engine, [log_signer.vkey])
    assert not report.valid
    assert report.first_bad_seq == first_bad, report.reason
    assert report.checked <= first_bad - 1


async def test_a_forger_without_the_key_cannot_fix_the_roots(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    ten: list[AppendResult],
) -> None:
    """The last record, its leaf, the stored root and the head all rewritten: only the
    signature of the latest tree head is left to give it away."""
    forged = _leaf_of(10, 10, outcome="denied")
    tree = ten[8].batch.tree.after.copy()  # the tree at size 9
    tree.append(forged)
    root = tree.root()
    await tamper(
        audit_store,
        "UPDATE audit_events SET outcome = 'denied' WHERE seq = 10",
        ("UPDATE audit_tree SET hash = :h WHERE level = 0 AND idx = 9", {"h": forged}),
        ("UPDATE audit_tree_heads SET root = :r WHERE size = 10", {"r": root}),
        ("UPDATE audit_log_head SET root = :r, compact = :c", {"r": root, "c": tree.to_bytes()}),
    )
    report = await verify_database(app_engine, [log_signer.vkey])
    assert not report.valid and report.first_bad_seq == 10
    assert "another root" in (report.reason or "")


async def test_a_wrong_key_fails(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, ten: list[AppendResult]
) -> None:
    other = NoteLogSigner.generate(TEST_ORIGIN)
    report = await verify_database(app_engine, [other.vkey])
    assert not report.valid
    assert report.first_bad_seq == 10 and "does not verify" in (report.reason or "")

    lines = await export_of(app_engine, log_signer)
    assert verify_export_lines(lines).valid
    pinned = verify_export_lines(lines, trusted_log_keys=[other.vkey])
    assert not pinned.valid and "does not verify" in (pinned.reason or "")
    with pytest.raises(ValueError, match="log key"):
        await verify_database(app_engine, ["not-a-key"])


async def test_keys_come_from_the_source_unless_pinned(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    ten: list[AppendResult],
) -> None:
    # Without the gateway's log_keys table there is nothing to check the signatures with.
    unkeyed = await verify_database(app_engine)
    assert not unkeyed.valid and "no log key" in (unkeyed.reason or "")

    retired = NoteLogSigner.generate(TEST_ORIGIN)
    await store_log_keys(audit_store, [retired.vkey, log_signer.vkey])
    async with app_engine.connect() as conn:
        assert await load_log_keys(conn) == [retired.vkey, log_signer.vkey]
    report = await verify_database(app_engine)
    assert report.valid and report.keys_source == "database"

    items = items_of(await export_of(app_engine))
    keys = [item for item in items if item["type"] == "log_key"]
    assert [(k["vkey"], k["status"]) for k in keys] == [
        (retired.vkey, "retired"),
        (log_signer.vkey, "current"),
    ]
    exported = verify_export_lines(lines_of(items))
    assert exported.valid and exported.keys_source == "export"
    assert verify_export_lines(lines_of(items), [log_signer.vkey]).keys_source == "pinned"


async def test_an_empty_log_verifies(app_engine: AsyncEngine, log_signer: NoteLogSigner) -> None:
    report = await verify_database(app_engine, [log_signer.vkey])
    assert report.valid and (report.checked, report.head_size, report.tree_size) == (0, 0, 0)
    lines = await export_of(app_engine, log_signer)
    assert items_of(lines)[-1] == {
        "type": "checkpoint",
        "size": 0,
        "note": None,
        "issued_at": None,
    }
    assert verify_export_lines(lines).valid


async def test_damaged_stored_subtree_roots_are_found(
    audit_store: AuditStore, app_engine: AsyncEngine, log_signer: NoteLogSigner, writer: AuditWriter
) -> None:
    """Proofs are served from the stored level-8 roots: a full walk checks them too."""
    for start in range(0, 300, 100):
        await asyncio.gather(*(writer.append(make_event(n)) for n in range(start, start + 100)))
    assert (await verify_database(app_engine, [log_signer.vkey])).valid
    await tamper(
        audit_store,
        ("UPDATE audit_tree SET hash = :h WHERE level = 8 AND idx = 0", {"h": b"\x07" * 32}),
    )
    report = await verify_database(app_engine, [log_signer.vkey])
    assert not report.valid and report.first_bad_seq == 1
    assert "level 8" in (report.reason or "")


# -- exports -----------------------------------------------------------------------------


def _edit_entry(items: list[dict], seq: int, old: str, new: str) -> list[dict]:
    out = []
    for item in items:
        if item["type"] == "event" and item["seq"] == seq:
            assert old in item["entry"]
            item = {**item, "entry": item["entry"].replace(old, new)}
        out.append(item)
    return out


def _drop(items: list[dict], keep: Callable[[dict], bool]) -> list[dict]:
    return [item for item in items if keep(item)]


def _swap(items: list[dict], a: int, b: int) -> list[dict]:
    index = {item["seq"]: i for i, item in enumerate(items) if item["type"] == "event"}
    items = list(items)
    items[index[a]], items[index[b]] = items[index[b]], items[index[a]]
    return items


def _duplicate(items: list[dict], seq: int) -> list[dict]:
    out: list[dict] = []
    for item in items:
        out.append(item)
        if item["type"] == "event" and item["seq"] == seq:
            out.append(item)
    return out


def _is_event(item: dict, above: int = 0) -> bool:
    return item["type"] == "event" and item["seq"] > above


@pytest.mark.usefixtures("ten")
@pytest.mark.parametrize(
    ("mutate", "first_bad", "reason"),
    [
        (lambda items: _edit_entry(items, 4, '"req-4"', '"req-X"'), 1, "final signed checkpoint"),
        (lambda items: _drop(items, lambda i: not (_is_event(i) and i["seq"] == 5)), 5, "missing"),
        (lambda items: _swap(items, 3, 4), 3, "missing"),
        (lambda items: _duplicate(items, 6), 6, "again"),
        (lambda items: items[:-1], 11, "truncated"),
        (lambda items: [i for i in items if not _is_event(i, 7)][:-1], 8, "truncated"),
        (lambda items: [i for i in items if not _is_event(i, 7)], 8, "missing"),
        (lambda items: [*items, {"type": "event", "seq": 11, "entry": "{}"}], 11, "beyond"),
    ],
    ids=[
        "edit",
        "delete",
        "reorder",
        "duplicate",
        "no-checkpoint",
        "truncated",
        "tail-dropped",
        "event-after-checkpoint",
    ],
)
async def test_tampering_is_found_in_an_export(
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    mutate: Callable[[list[dict]], list[dict]],
    first_bad: int,
    reason: str,
) -> None:
    items = items_of(await export_of(app_engine, log_signer))
    assert verify_export_lines(lines_of(items)).valid

    report = verify_export_lines(lines_of(mutate(items)))

    assert not report.valid
    assert report.first_bad_seq == first_bad, report.reason
    assert reason in (report.reason or "")


async def test_a_rewritten_export_tail_fails(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, ten: list[AppendResult]
) -> None:
    items = items_of(await export_of(app_engine, log_signer))
    # Rewrite the last record; the forger cannot sign, so either the old checkpoint stays...
    forged = _edit_entry(items, 10, '"success"', '"denied"')
    report = verify_export_lines(lines_of(forged))
    assert not report.valid and "final signed checkpoint" in (report.reason or "")
    # ... or an earlier genuine checkpoint replaces it, which does not cover the tail,
    earlier = {"type": "checkpoint", "size": 9, "note": ten[8].batch.checkpoint}
    report = verify_export_lines(lines_of([*forged[:-1], earlier]))
    assert not report.valid and report.first_bad_seq == 10 and "beyond" in (report.reason or "")
    # ... or they sign one with a key of their own, which the pinned key refuses.
    mallory = NoteLogSigner.generate(TEST_ORIGIN)
    root = verify_export_lines(lines_of(forged)).head_root
    fake = {
        "type": "checkpoint",
        "size": 10,
        "note": mallory.sign_note(Checkpoint(TEST_ORIGIN, 10, root).text()),
    }
    assert not verify_export_lines(lines_of([*forged[:-1], fake]), [log_signer.vkey]).valid
    # Keys carried by the export prove only that whoever wrote it signed it:
    swapped = [
        {**i, "vkey": mallory.vkey} if i["type"] == "log_key" else i for i in [*forged[:-1], fake]
    ]
    carried = verify_export_lines(lines_of(swapped))
    assert carried.valid and carried.keys_source == "export"


def test_what_is_not_a_version_2_export_is_refused() -> None:
    with pytest.raises(ValueError, match="line 2"):
        verify_export_lines(
            ['{"type":"header","format":"kzg-gateway-audit-export","version":2}\n', "not json\n"]
        )
    with pytest.raises(ValueError, match="version 1"):
        verify_export_lines(['{"type":"header","format":"kzg-gateway-audit-export","version":1}'])
    with pytest.raises(ValueError, match="header"):
        verify_export_lines(['{"type":"event","seq":1,"entry":"{}"}'])
    with pytest.raises(ValueError, match="header"):
        verify_export_lines([])


HEADER = {"type": "header", "format": "kzg-gateway-audit-export", "version": 2}


def synthetic_export(signer: NoteLogSigner, entries: list[str]) -> list[dict[str, Any]]:
    """A v2 export of ``entries`` built here from the format's definition alone."""
    tree = CompactRange()
    for entry in entries:
        tree.append(leaf_hash(entry.encode()))
    note = signer.sign_note(Checkpoint(TEST_ORIGIN, len(entries), tree.root()).text())
    return [
        {**HEADER, "exported_at": "2026-06-01T00:00:00.000000Z", "origin": TEST_ORIGIN},
        {"type": "log_key", "key_id": "k", "vkey": signer.vkey, "status": "current"},
        *({"type": "event", "seq": n, "entry": e} for n, e in enumerate(entries, start=1)),
        {"type": "checkpoint", "size": len(entries), "note": note},
    ]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"seq": 3, "entry": 42}, "not a readable event"),
        ({"seq": 3}, "not a readable event"),
        ({"seq": "3", "entry": "{}"}, "no integer seq"),
        ({"seq": 3, "entry": "caf\ud800"}, "not valid UTF-8"),
    ],
    ids=["entry-not-text", "no-entry", "seq-as-text", "lone-surrogate"],
)
def test_an_unreadable_event_line_breaks_the_walk_there(
    log_signer: NoteLogSigner, bad: dict[str, Any], reason: str
) -> None:
    items = synthetic_export(log_signer, [json.dumps({"seq": n}) for n in range(1, 6)])
    assert verify_export_lines(lines_of(items)).valid
    items[4] = {"type": "event", **bad}  # the line of seq 3
    report = verify_export_lines(lines_of(items))
    assert not report.valid and report.first_bad_seq == 3 and report.checked == 2
    assert reason in (report.reason or "")


def test_an_export_line_is_one_json_object(log_signer: NoteLogSigner) -> None:
    lines = lines_of(synthetic_export(log_signer, ["a", "b", "c"]))
    assert verify_export_lines([*lines[:3], "\n", *lines[3:]]).valid  # blank lines are skipped
    with pytest.raises(ValueError, match="line 4"):
        verify_export_lines([*lines[:3], lines[3].rstrip("\n") + '{"type":"event"}\n'])
    with pytest.raises(ValueError, match="line 3"):
        verify_export_lines([*lines[:2], "[1, 2]\n", *lines[2:]])
    among = [*lines[:4], json.dumps({"type": "anchor"}) + "\n", *lines[4:]]
    report = verify_export_lines(among)
    assert not report.valid and "retention anchor cannot be read" in (report.reason or "")


# -- held checkpoints (consistency) ------------------------------------------------------


async def test_a_held_checkpoint_is_proven_extended(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, ten: list[AppendResult]
) -> None:
    held = ten[4].batch.checkpoint  # size 5
    report = await verify_database(app_engine, [log_signer.vkey], held=held)
    assert report.valid, report.reason
    assert report.method == "consistency" and report.checked == 0
    assert (report.head_size, report.tree_size, report.checkpoints) == (10, 10, 2)
    # Held at the latest size: the empty proof, equal roots.
    assert (
        await verify_database(app_engine, [log_signer.vkey], held=ten[-1].batch.checkpoint)
    ).valid
    lines = await export_of(app_engine, log_signer)
    exported = verify_export_lines(lines, held=held)
    assert exported.valid and exported.checkpoints == 2


async def test_a_forked_or_foreign_checkpoint_is_not_extended(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, ten: list[AppendResult]
) -> None:
    forked = log_signer.sign_note(Checkpoint(TEST_ORIGIN, 5, b"\x05" * 32).text())
    report = await verify_database(app_engine, [log_signer.vkey], held=forked)
    assert not report.valid and report.first_bad_seq == 5 and "fork" in (report.reason or "")
    lines = await export_of(app_engine, log_signer)
    offline = verify_export_lines(lines, held=forked)
    assert not offline.valid and "held checkpoint at size 5" in (offline.reason or "")

    foreign = NoteLogSigner.generate(TEST_ORIGIN).sign_note(
        ten[4].batch.checkpoint.split("\n\n")[0] + "\n"
    )
    report = await verify_database(app_engine, [log_signer.vkey], held=foreign)
    assert not report.valid and "held checkpoint does not verify" in (report.reason or "")
    assert not verify_export_lines(lines, held=foreign).valid

    ahead = log_signer.sign_note(Checkpoint(TEST_ORIGIN, 12, b"\x0c" * 32).text())
    report = await verify_database(app_engine, [log_signer.vkey], held=ahead)
    assert not report.valid and "ahead" in (report.reason or "")
    assert "ahead" in (verify_export_lines(lines, held=ahead).reason or "")


# -- sampling ----------------------------------------------------------------------------


async def test_sample_proves_random_entries_by_inclusion(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    ten: list[AppendResult],
) -> None:
    report = await verify_database(app_engine, [log_signer.vkey], sample=4)
    assert report.valid, report.reason
    assert (report.method, report.sampled, report.checked, report.head_size) == ("sample", 4, 4, 10)

    await tamper(audit_store, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 7")
    everything = await verify_database(app_engine, [log_signer.vkey], sample=50)
    assert everything.sampled == 10 and everything.checked == 9
    assert not everything.valid and everything.first_bad_seq == 7
    with pytest.raises(ValueError, match="sample"):
        await verify_database(app_engine, [log_signer.vkey], sample=0)


# -- retention anchors -------------------------------------------------------------------


@pytest.fixture
async def pruned(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, writer: AuditWriter
) -> list[AppendResult]:
    """Records 1-4 old and pruned under an anchor, 5-7 retained."""
    results = await append_events(writer, range(4), occurred_at=OLD)
    results += await append_events(writer, range(4, 7), occurred_at=NOW)
    result = await run_retention(app_engine, log_signer, RetentionPolicy(), NOW)
    assert (result.pruned, result.through_seq) == (4, 4)
    return results


async def test_the_retained_log_verifies_from_its_anchor(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, pruned: list[AppendResult]
) -> None:
    report = await verify_database(app_engine, [log_signer.vkey])
    assert report.valid, report.reason
    assert (report.checked, report.head_size, report.anchors) == (3, 7, 1)
    items = items_of(await export_of(app_engine, log_signer))
    assert [i["seq"] for i in items if i["type"] == "event"] == [5, 6, 7]
    assert verify_export_lines(lines_of(items)).valid
    # A held checkpoint older than the anchor: the stored hashes still prove it...
    held = pruned[1].batch.checkpoint  # size 2
    assert (await verify_database(app_engine, [log_signer.vkey], held=held)).valid
    # ... an export cannot, and says why.
    offline = verify_export_lines(lines_of(items), held=held)
    assert not offline.valid and "predates the retained entries" in (offline.reason or "")
    sampled = await verify_database(app_engine, [log_signer.vkey], sample=10)
    assert sampled.valid and sampled.sampled == 3


async def test_an_altered_anchor_fails(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    pruned: list[AppendResult],
) -> None:
    items = items_of(await export_of(app_engine, log_signer))
    anchor = next(i for i in items if i["type"] == "anchor")
    hashes = anchor["compact"].split(" ")
    hashes[0] = base64.b64encode(b"\x01" * 32).decode()
    forged = [{**i, "compact": " ".join(hashes)} if i["type"] == "anchor" else i for i in items]
    report = verify_export_lines(lines_of(forged))
    assert not report.valid and report.first_bad_seq == 5
    assert "anchor" in (report.reason or "")

    floor = datetime(2017, 1, 1, tzinfo=UTC)
    young = await verify_database(app_engine, [log_signer.vkey], retention_floor=floor)
    assert not young.valid and "younger than the retention floor" in (young.reason or "")
    assert young.retention_floor == "2017-01-01T00:00:00.000000Z"
    assert not verify_export_lines(lines_of(items), retention_floor=floor).valid
    assert (await verify_database(app_engine, [log_signer.vkey], retention_floor=NOW)).valid

    await tamper(audit_store, "UPDATE audit_anchors SET pruned = 3")
    report = await verify_database(app_engine, [log_signer.vkey])
    assert not report.valid and report.first_bad_seq == 5


async def test_anchors_and_checkpoints_count_wherever_they_stand_in_an_export(
    app_engine: AsyncEngine, log_signer: NoteLogSigner, pruned: list[AppendResult]
) -> None:
    items = items_of(await export_of(app_engine, log_signer))
    anchors = [i for i in items if i["type"] == "anchor"]
    final = items[-1]
    header, rest = items[0], [i for i in items[1:-1] if i["type"] != "anchor"]
    # The final checkpoint first, the anchor last, a genuine earlier checkpoint between
    # the events (size 6: its root is compared when the walk reaches it).
    middle = {"type": "checkpoint", "size": 6, "note": pruned[5].batch.checkpoint}
    events = [i for i in rest if i["type"] == "event"]
    others = [i for i in rest if i["type"] != "event"]
    moved = [header, final, *others, events[0], events[1], middle, events[2], *anchors]
    report = verify_export_lines(lines_of(moved), [log_signer.vkey])
    assert report.valid, report.reason
    assert (report.checked, report.head_size, report.anchors, report.checkpoints) == (3, 7, 1, 2)

    # A checkpoint between the events that the entries do not lead to fails there.
    forged_root = pruned[5].batch.tree.root()[::-1]
    wrong = {
        "type": "checkpoint",
        "size": 6,
        "note": log_signer.sign_note(Checkpoint(TEST_ORIGIN, 6, forged_root).text()),
    }
    report = verify_export_lines(lines_of([*moved[:-3], wrong, *moved[-2:]]), [log_signer.vkey])
    assert not report.valid and report.first_bad_seq == 5, report.reason
    assert "signed checkpoint at size 6" in (report.reason or "")


async def test_a_retired_log_key_is_bounded_by_its_not_after(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    pruned: list[AppendResult],
) -> None:
    """The log's records declare log_signer retired on 2026-02-01: every tree head and
    anchor it signed later (all of them, signed today) proves nothing, pinned or not."""
    successor = NoteLogSigner.generate(TEST_ORIGIN)
    assert (await verify_database(app_engine, [log_signer.vkey])).valid
    await store_log_keys(audit_store, [log_signer.vkey, successor.vkey])
    for pinned in (None, [log_signer.vkey]):
        report = await verify_database(app_engine, pinned)
        assert not report.valid, pinned
        assert "retired at 2026-02-01T00:00:00.000000Z" in (report.reason or "")
    items = items_of(await export_of(app_engine))
    retired = next(i for i in items if i["type"] == "log_key" and i["vkey"] == log_signer.vkey)
    assert retired["not_after"] == "2026-02-01T00:00:00.000000Z"
    for pinned in (None, [log_signer.vkey]):
        report = verify_export_lines(lines_of(items), pinned)
        assert not report.valid and "retired at 2026-02-01" in (report.reason or "")
    # Retired after it signed them: they verify; a checkpoint that states no time does not.
    later = [
        {**i, "not_after": "2099-01-01T00:00:00.000000Z"} if i is retired else i for i in items
    ]
    assert verify_export_lines(lines_of(later)).valid
    undated = [*later[:-1], {k: v for k, v in later[-1].items() if k != "issued_at"}]
    report = verify_export_lines(lines_of(undated))
    assert not report.valid and "stating no issue time" in (report.reason or "")


# -- the first release's hash chain ------------------------------------------------------


LEGACY_RECORDS = 6
LEGACY_CHECKPOINTS = (3, 6)


def _legacy_store(kind: str, tmp_path: Path, pg_database: PgDatabase | None) -> AuditStore:
    if kind == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'legacy.db'}"
        return AuditStore("sqlite", url, url)
    assert pg_database is not None
    return AuditStore("postgresql", pg_database.owner_url, pg_database.app_url)


async def build_legacy_log(
    store: AuditStore, bls: BlsSigner, app_role: str | None, tamper_seq: int | None = None
) -> None:
    """A database of the first release (audit_0002): a hash chain of LEGACY_RECORDS old
    records with BLS checkpoints, then upgraded to the tree (audit@head)."""
    await migrate(store.owner_url, app_role, target="audit_0002")
    engine = make_engine(store.owner_url)
    try:
        async with engine.begin() as conn:
            head = GENESIS_HASH
            for seq in range(1, LEGACY_RECORDS + 1):
                fields = make_event(seq, occurred_at=OLD).fields()
                prev, head = head, chain_hash(head, record_for(seq, fields))
                columns = columns_for(fields)
                if seq == tamper_seq:
                    columns["actor"] = "mallory"  # changed after it was chained and signed
                await conn.execute(
                    text(
                        "INSERT INTO audit_events (seq, prev_hash, hash, "
                        + ", ".join(columns)
                        + ") VALUES (:seq, :prev_hash, :hash, "
                        + ", ".join(f":{name}" for name in columns)
                        + ")"
                    ),
                    {"seq": seq, "prev_hash": prev, "hash": head, **columns},
                )
                await conn.execute(
                    text("UPDATE audit_chain_head SET seq = :seq, hash = :hash WHERE id = 1"),
                    {"seq": seq, "hash": head},
                )
                if seq in LEGACY_CHECKPOINTS:
                    issued_at = f"2018-05-0{seq}T00:00:00.000000Z"
                    message = legacy_checkpoint_message(seq, head, issued_at)
                    await conn.execute(
                        text(
                            "INSERT INTO audit_checkpoints (seq, hash, issued_at, key_id, "
                            "message, signature) VALUES (:seq, :hash, :issued_at, :key_id, "
                            ":message, :signature)"
                        ),
                        {
                            "seq": seq,
                            "hash": head,
                            "issued_at": issued_at,
                            "key_id": bls.key_id,
                            "message": message,
                            "signature": "0x" + bls.sign(message.encode()).hex(),
                        },
                    )
    finally:
        await engine.dispose()
    await migrate_audit(store.owner_url, app_role)


@pytest.fixture(params=["sqlite", "postgresql"])
def legacy_store(request: pytest.FixtureRequest, tmp_path: Path) -> AuditStore:
    pg = request.getfixturevalue("pg_database") if request.param == "postgresql" else None
    return _legacy_store(request.param, tmp_path, pg)


def _app_role(store: AuditStore) -> str | None:
    if store.kind == "sqlite":
        return None
    return store.app_url.split("://", 1)[1].split(":", 1)[0]


async def _grow(store: AuditStore, log_signer: NoteLogSigner, records: int) -> AsyncEngine:
    """Sign the migrated tree, then append ``records`` new ones; returns an app engine."""
    engine = make_engine(store.app_url)
    assert (await sign_head(engine, log_signer, NOW)) is not None
    writer = AuditWriter(engine, log_signer)
    await writer.start()
    try:
        await append_events(writer, range(100, 100 + records), occurred_at=NOW)
    finally:
        await writer.stop()
    return engine


async def test_the_legacy_chain_keeps_verifying(
    legacy_store: AuditStore, log_signer: NoteLogSigner
) -> None:
    bls = BlsSigner()
    await build_legacy_log(legacy_store, bls, _app_role(legacy_store))
    engine = await _grow(legacy_store, log_signer, 3)
    try:
        report = await verify_database(engine, [log_signer.vkey], legacy_keys=bls.keys)
        assert report.valid, report.reason
        assert report.checked == LEGACY_RECORDS + 3
        assert report.legacy == {
            "through_seq": LEGACY_RECORDS,
            "checked": True,
            "checkpoints": len(LEGACY_CHECKPOINTS),
            "keys_source": "pinned",
        }
        lines = await export_of(engine, log_signer, public_keys=bls.keys)
        kinds = [json.loads(line)["type"] for line in lines]
        assert kinds.count("legacy_checkpoint") == 2 and "legacy_chain" in kinds
        exported = verify_export_lines(lines)
        assert exported.valid and exported.legacy["checked"], exported.reason
        assert exported.legacy["keys_source"] == "export"

        other = BlsSigner(bls.key_id)
        wrong = await verify_database(engine, [log_signer.vkey], legacy_keys=other.keys)
        assert not wrong.valid and wrong.first_bad_seq == LEGACY_CHECKPOINTS[0]
        assert "legacy BLS checkpoint" in (wrong.reason or "")
        assert not verify_export_lines(lines, trusted_legacy_keys=other.keys).valid

        # Retention into the legacy range: it can no longer be checked, which is no failure.
        result = await run_retention(engine, log_signer, RetentionPolicy(), NOW)
        assert result.through_seq == LEGACY_RECORDS
        pruned = await verify_database(engine, [log_signer.vkey], legacy_keys=bls.keys)
        assert pruned.valid, pruned.reason
        assert pruned.legacy is not None and pruned.legacy["checked"] is False
        assert verify_export_lines(await export_of(engine, log_signer)).valid
    finally:
        await engine.dispose()


async def test_a_record_changed_before_the_tree_fails_the_legacy_checkpoint(
    legacy_store: AuditStore, log_signer: NoteLogSigner
) -> None:
    """The tree was built over a record changed after its BLS checkpoint: the tree is
    consistent, the first release's checkpoint is not."""
    bls = BlsSigner()
    await build_legacy_log(legacy_store, bls, _app_role(legacy_store), tamper_seq=5)
    engine = await _grow(legacy_store, log_signer, 1)
    try:
        report = await verify_database(engine, [log_signer.vkey], legacy_keys=bls.keys)
        assert not report.valid
        assert report.first_bad_seq == LEGACY_CHECKPOINTS[0] + 1, report.reason
        assert "records 4 through 6" in (report.reason or "")
        offline = verify_export_lines(await export_of(engine, log_signer, public_keys=bls.keys))
        assert not offline.valid and offline.first_bad_seq == 4
    finally:
        await engine.dispose()
