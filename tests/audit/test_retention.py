"""Retention prunes entry bodies only: the oldest whole range older than the policy (and
than the database's own floor) and covered by a signed tree head leaves, a signed anchor
says what left, and the tree's hashes stay, so inclusion proofs of retained entries and
consistency proofs between checkpoints taken before pruning keep verifying."""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.events import format_timestamp
from audit.log import TreeHead, inclusion_proof
from audit.models import audit_anchors, audit_events, audit_tree
from audit.retention import RetentionPolicy, RetentionRefused, run_retention
from audit.signing import NoteLogSigner, anchor_text
from audit.writer import AuditWriter
from gateway.db import migrate
from migrations import AUDIT_TARGETS
from tests.audit import reference_tlog as ref
from tests.audit.conftest import TEST_ORIGIN, AuditStore, make_engine
from tests.audit.helpers import make_event, tamper
from tests.audit.test_migration import write_chain
from tests.audit.test_writer import (
    assert_consistent,
    assert_one_tree,
    count,
    read_entries,
    read_tree_heads,
)

OLD = datetime(2018, 5, 1, tzinfo=UTC)
RECENT = datetime(2026, 5, 1, tzinfo=UTC)
NOW = datetime(2026, 6, 1, tzinfo=UTC)
SEVEN_YEARS = RetentionPolicy()


async def _fill(writer: AuditWriter, old: int, recent: int, start: int = 0) -> None:
    for n in range(start, start + old):
        await writer.append(make_event(n, occurred_at=OLD))
    for n in range(start + old, start + old + recent):
        await writer.append(make_event(n, occurred_at=RECENT))


async def _seqs(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return [r[0] for r in await conn.execute(select(audit_events.c.seq).order_by("seq"))]


async def _anchors(engine: AsyncEngine) -> list[dict]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(audit_anchors).order_by(audit_anchors.c.through_seq))
        return [dict(row._mapping) for row in rows]


async def _tree_rows(engine: AsyncEngine) -> list[tuple[int, int, bytes]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(audit_tree.c.level, audit_tree.c.idx, audit_tree.c.hash).order_by(
                audit_tree.c.level, audit_tree.c.idx
            )
        )
        return [(int(level), int(idx), bytes(value)) for level, idx, value in rows]


def expected_compact(entries: list[str], through: int) -> str:
    """The anchor's compact range, computed with the reference tree hash: the hashes of
    the maximal perfect subtrees covering leaves [0, through), left to right."""
    hashes = []
    start = 0
    for bit in reversed(range(through.bit_length())):
        width = 1 << bit
        if through & width:
            hashes.append(ref.tree_hash([e.encode() for e in entries[start : start + width]]))
            start += width
    return " ".join(base64.b64encode(h).decode() for h in hashes)


def assert_anchor(
    anchor: dict,
    signer: NoteLogSigner,
    entries: list[str],
    *,
    through: int,
    tree_size: int,
    pruned: int,
    newest: datetime,
    issued: datetime,
) -> None:
    """The stored anchor says what left, and its note is the log key's signature of
    exactly that statement."""
    assert anchor["through_seq"] == through
    assert anchor["tree_size"] == tree_size
    assert anchor["pruned"] == pruned
    assert anchor["newest_occurred_at"] == format_timestamp(newest)
    assert anchor["issued_at"] == format_timestamp(issued)
    assert anchor["compact"] == expected_compact(entries, through)
    assert anchor["key_id"] == signer.key_id
    statement = anchor_text(
        through,
        tree_size,
        pruned,
        format_timestamp(newest),
        format_timestamp(issued),
        anchor["compact"],
    )
    assert ref.open_note(anchor["note"], [signer.vkey]) == statement
    with pytest.raises(AssertionError, match="no verified signature"):
        ref.open_note(anchor["note"], [NoteLogSigner.generate(TEST_ORIGIN).vkey])


async def assert_proofs_survive(
    engine: AsyncEngine, heads: list[TreeHead], entries: list[str], first_retained: int
) -> None:
    """Every retained entry's inclusion proof at every checkpoint that holds it, and every
    consistency proof between those checkpoints, verify from the stored hashes."""
    roots = {head.size: head.root for head in heads}
    async with engine.connect() as conn:
        for head in heads:
            for index in range(first_retained - 1, head.size):
                proof = await inclusion_proof(conn, index, head.size)
                leaf = ref.leaf_hash(entries[index].encode())
                assert ref.verify_inclusion(leaf, index, head.size, proof, head.root), (
                    index,
                    head.size,
                )
    await assert_consistent(engine, roots, list(itertools.combinations(sorted(roots), 2)))


def test_policy_file_defaults_to_seven_years(tmp_path: Path) -> None:
    shipped = RetentionPolicy.load(Path(__file__).parents[2] / "policies" / "retention.toml")
    assert shipped.keep_years == 7
    assert RetentionPolicy.load(tmp_path / "absent.toml").keep_years == 7
    custom = tmp_path / "retention.toml"
    custom.write_text("[audit]\nkeep_years = 10\n")
    assert RetentionPolicy.load(custom).cutoff(NOW) == datetime(2016, 6, 1, tzinfo=UTC)
    assert RetentionPolicy().cutoff(datetime(2028, 2, 29, tzinfo=UTC)).day == 28
    with pytest.raises(ValueError, match="at least one year"):
        RetentionPolicy(keep_years=0)


@pytest.fixture(params=["sqlite", "postgresql"])
async def fresh_migrated_chain(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[AsyncEngine, list[str]]]:
    """Old records of the first release, migrated to a tree nobody signed yet."""
    if request.param == "sqlite":
        owner = app = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
        role = None
    else:
        pg = request.getfixturevalue("pg_database")
        owner, app, role = pg.owner_url, pg.app_url, pg.app_role
    await migrate(owner, role, target="audit@audit_0002")
    chain = await write_chain(owner, [make_event(n, occurred_at=OLD) for n in range(5)])
    await migrate(owner, role, target=AUDIT_TARGETS)
    engine = make_engine(app)
    yield engine, chain.entries
    await engine.dispose()


async def test_nothing_leaves_without_a_signed_tree_head(
    fresh_migrated_chain: tuple[AsyncEngine, list[str]], log_signer: NoteLogSigner
) -> None:
    engine, entries = fresh_migrated_chain
    result = await run_retention(engine, log_signer, SEVEN_YEARS, NOW)
    assert (result.pruned, result.through_seq) == (0, None)
    assert result.reason == "no signed tree head yet"
    assert await _seqs(engine) == list(range(1, len(entries) + 1))
    assert await _anchors(engine) == []


async def test_prunes_entry_bodies_only_and_every_proof_still_verifies(
    app_engine: AsyncEngine, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    await _fill(writer, old=6, recent=4)
    await writer.append(make_event(50, occurred_at=OLD))  # old, but after recent records
    entries = await read_entries(app_engine)
    heads = await read_tree_heads(app_engine)
    tree = await _tree_rows(app_engine)
    assert [h.size for h in heads] == list(range(1, 12))

    result = await run_retention(app_engine, log_signer, SEVEN_YEARS, NOW)

    # Records 1-6 are old; 7 is recent, so the leading old range ends at 6 (11 stays).
    assert (result.pruned, result.through_seq, result.reason) == (6, 6, "pruned")
    assert await _seqs(app_engine) == [7, 8, 9, 10, 11]
    assert await read_entries(app_engine, first=7) == entries[6:]
    # Only bodies left: every hash and every signed tree head is still stored.
    assert await _tree_rows(app_engine) == tree
    assert await read_tree_heads(app_engine) == heads
    (anchor,) = await _anchors(app_engine)
    assert_anchor(
        anchor,
        log_signer,
        entries,
        through=6,
        tree_size=11,
        pruned=6,
        newest=OLD,
        issued=NOW,
    )
    await assert_proofs_survive(app_engine, heads, entries, first_retained=7)

    # The tree keeps growing past the anchor, and a second run has nothing to do.
    later = await writer.append(make_event(60))
    assert later.seq == 12
    ref.verify_receipt({"entry": later.entry, "proof": later.inclusion_proof()}, [log_signer.vkey])
    await assert_one_tree(app_engine, [log_signer.vkey], entries=[*entries, later.entry])
    again = await run_retention(app_engine, log_signer, SEVEN_YEARS, NOW)
    assert (again.pruned, again.reason) == (0, "nothing older than the policy")
    assert len(await _anchors(app_engine)) == 1


async def test_a_second_run_prunes_the_next_range_and_the_database_clock_bounds_the_cutoff(
    app_engine: AsyncEngine, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    await _fill(writer, old=3, recent=0)
    entries = await read_entries(app_engine)
    first = await run_retention(app_engine, log_signer, SEVEN_YEARS, NOW)
    assert (first.pruned, first.through_seq) == (3, 3)
    await _fill(writer, old=3, recent=1, start=3)
    entries += await read_entries(app_engine, first=4)
    second = await run_retention(app_engine, log_signer, SEVEN_YEARS, NOW)
    assert (second.pruned, second.through_seq) == (3, 6)

    assert await _seqs(app_engine) == [7]
    first_anchor, second_anchor = await _anchors(app_engine)
    assert_anchor(
        first_anchor, log_signer, entries, through=3, tree_size=3, pruned=3, newest=OLD, issued=NOW
    )
    # The second anchor counts its own range; its compact range covers leaves [0, 6).
    assert_anchor(
        second_anchor, log_signer, entries, through=6, tree_size=7, pruned=3, newest=OLD, issued=NOW
    )
    await assert_one_tree(app_engine, [log_signer.vkey], entries=entries)

    # A gateway whose clock runs years ahead still cannot prune what the database's own
    # clock calls young: the database's floor bounds the cutoff.
    later = datetime(2034, 1, 1, tzinfo=UTC)
    third = await run_retention(app_engine, log_signer, SEVEN_YEARS, later)
    assert third.pruned == 0 and await _seqs(app_engine) == [7]
    assert third.cutoff < format_timestamp(SEVEN_YEARS.cutoff(later))
    assert len(await _anchors(app_engine)) == 2


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        ("UPDATE audit_events SET actor = 'mallory' WHERE seq = 2", "record 2 does not match"),
        # A leaf hash of the range rewritten: the stored tree no longer folds to the root.
        (
            "UPDATE audit_tree SET hash = (SELECT hash FROM audit_tree WHERE level = 0 AND "
            "idx = 0) WHERE level = 0 AND idx = 1",
            "does not fold to the signed root",
        ),
        # A record of the range gone without an anchor.
        ("DELETE FROM audit_events WHERE seq = 3", "record 3 does not match|missing"),
    ],
)
async def test_a_tampered_range_is_refused_and_nothing_leaves(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    writer: AuditWriter,
    log_signer: NoteLogSigner,
    statement: str,
    reason: str,
) -> None:
    await _fill(writer, old=4, recent=1)
    before = await _seqs(app_engine)
    await tamper(audit_store, statement)
    after_tamper = await _seqs(app_engine)

    with pytest.raises(RetentionRefused, match=reason):
        await run_retention(app_engine, log_signer, SEVEN_YEARS, NOW)
    assert await _seqs(app_engine) == after_tamper
    assert set(after_tamper) <= set(before)
    assert await _anchors(app_engine) == []


async def test_runtime_role_cannot_prune_outside_retention(
    pg_store: AuditStore, log_signer: NoteLogSigner
) -> None:
    engine = make_engine(pg_store.app_url)
    writer = AuditWriter(engine, log_signer)
    await writer.start()
    try:
        await _fill(writer, old=3, recent=0)
        newest = format_timestamp(OLD)
        # Old records, counted right, but no signed tree head of that size.
        with pytest.raises(DBAPIError, match="retention refused: no signed tree head covers"):
            async with engine.begin() as conn:
                await conn.execute(
                    text("SELECT audit_prune(2, 99, 2, :newest, 'now', '', 'k', 'n')"),
                    {"newest": newest},
                )
        for statement in (
            "DELETE FROM audit_events WHERE seq = 1",
            "INSERT INTO audit_anchors (through_seq, tree_size, pruned, newest_occurred_at, "
            "issued_at, compact, key_id, note) VALUES (3, 3, 3, 'x', 'now', '', 'k', 'n')",
            "UPDATE audit_retention SET keep_years = 1",
        ):
            with pytest.raises(DBAPIError, match="permission denied"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
        assert await _seqs(engine) == [1, 2, 3]
        assert await count(engine, audit_anchors) == 0
    finally:
        await writer.stop()
        await engine.dispose()


async def test_retention_runs_beside_live_appends_and_races_itself(
    app_engine: AsyncEngine, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    await _fill(writer, old=40, recent=0)
    pruned_entries = await read_entries(app_engine)
    held = (await read_tree_heads(app_engine))[-1]  # an auditor's checkpoint before pruning
    stop = asyncio.Event()

    async def traffic() -> int:
        appended = 0
        while not stop.is_set():
            await asyncio.gather(*(writer.append(make_event(n, occurred_at=NOW)) for n in range(8)))
            appended += 8
        return appended

    load = asyncio.create_task(traffic())
    await asyncio.sleep(0.05)
    first, second = await asyncio.gather(
        run_retention(app_engine, log_signer, SEVEN_YEARS, NOW),
        run_retention(app_engine, log_signer, SEVEN_YEARS, NOW),
    )
    await asyncio.sleep(0.05)
    stop.set()
    appended = await load

    assert appended > 0
    assert sorted([first.pruned, second.pruned]) == [0, 40]
    # The other run either lost the race for the write or started after the anchor.
    (other,) = [r.reason for r in (first, second) if r.pruned == 0]
    assert other in {"another retention run pruned first", "nothing older than the policy"}
    (anchor,) = await _anchors(app_engine)
    assert anchor["through_seq"] == 40 and anchor["tree_size"] >= 40
    retained = await read_entries(app_engine, first=41)
    assert len(retained) == appended
    entries = [*pruned_entries, *retained]
    heads = await assert_one_tree(app_engine, [log_signer.vkey], entries=entries)
    assert held in heads
    assert anchor["compact"] == expected_compact(entries, 40)
    await assert_proofs_survive(app_engine, [held, heads[-1]], entries, first_retained=41)


@pytest.mark.parametrize(
    ("recent", "seq", "reason"),
    [
        # Record 2 lies in a tile the range completes: its rebuilt tile root is not the
        # stored one.
        (1, 2, r"tile root \(8, 0\) does not match records 1-260"),
        # Record 258 lies in the range's last, partial tile, whose stored root (the head
        # completed it) still folds to the signed root: only the rebuilt prefix, proved
        # against the signed head, shows the rewrite.
        (252, 258, "records 1-260 are not the ones the signed tree head at 512 holds"),
    ],
    ids=["in-a-complete-tile", "in-the-last-partial-tile"],
)
async def test_a_range_rewritten_with_matching_leaf_hashes_is_refused(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    writer: AuditWriter,
    log_signer: NoteLogSigner,
    recent: int,
    seq: int,
    reason: str,
) -> None:
    # 260 old records (leaves 0-255 form a complete tile, stored at level 8), then recent
    # ones: the range to prune is 1-260.
    await asyncio.gather(*(writer.append(make_event(n, occurred_at=OLD)) for n in range(260)))
    await asyncio.gather(
        *(writer.append(make_event(n, occurred_at=RECENT)) for n in range(260, 260 + recent))
    )
    # The owner rewrites a record and its stored leaf hash to match: every entry of the
    # range still hashes to its stored leaf, and the stored tree still folds to the signed
    # root.
    row = (await read_entries(app_engine))[seq - 1]
    forged = row.replace('"actor":"apikey:', '"actor":"mallory:')
    assert forged != row
    leaf = ref.leaf_hash(forged.encode()).hex()
    literal = f"X'{leaf}'" if audit_store.kind == "sqlite" else f"decode('{leaf}', 'hex')"
    await tamper(
        audit_store,
        f"UPDATE audit_events SET actor = 'mallory:' || substr(actor, 8) WHERE seq = {seq}",
        f"UPDATE audit_tree SET hash = {literal} WHERE level = 0 AND idx = {seq - 1}",
    )
    assert (await read_entries(app_engine))[seq - 1] == forged

    with pytest.raises(RetentionRefused, match=reason):
        await run_retention(app_engine, log_signer, SEVEN_YEARS, NOW)
    assert await _seqs(app_engine) == list(range(1, 261 + recent))
    assert await _anchors(app_engine) == []
