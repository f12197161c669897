"""The group-commit writer on SQLite and PostgreSQL: one gapless RFC 9162 tree, a signed
tree head stored with every group commit, receipts that an independent verifier accepts,
append-only storage, fail-closed when the store or the log key is gone, and recovery
without a restart.

The helpers below check a stored log from its rows alone and with ``reference_tlog`` (which
shares no code with ``audit``); the other audit test modules use them too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import canonical_json, record_for
from audit.errors import AuditUnavailable
from audit.events import AuditEvent, parse_timestamp
from audit.log import TreeHead, consistency_proof, read_head
from audit.metrics import AuditMetrics
from audit.models import audit_events, audit_log_head, audit_tree, audit_tree_heads, fields_from_row
from audit.note import NoteSigner
from audit.signing import NoteLogSigner
from audit.writer import AppendResult, AuditWriter
from tests.audit import reference_tlog as ref
from tests.audit.conftest import TEST_ORIGIN, AuditStore, make_engine
from tests.audit.helpers import make_event, sqlite_write_lock, tamper
from tests.audit.proxy import CuttableProxy

REPO = Path(__file__).resolve().parents[2]
TILE = 256  # hashes per stored tile: level-8 rows are the roots of complete 256-leaf tiles


# --- helpers shared by the audit tests ------------------------------------------------------


def receipt_of(result: AppendResult) -> dict[str, str]:
    """The receipt a KZG answer carries for this record."""
    return {"entry": result.entry, "proof": result.inclusion_proof()}


async def read_entries(engine: AsyncEngine, first: int = 1) -> list[str]:
    """Every stored entry from seq ``first`` on, as the canonical JSON the tree hashed;
    fails on a gap."""
    async with engine.connect() as conn:
        rows = (
            (await conn.execute(select(audit_events).order_by(audit_events.c.seq))).mappings().all()
        )
    entries = []
    for expected, row in enumerate(rows, start=first):
        assert row["seq"] == expected, f"the log has a gap before seq {row['seq']}"
        entries.append(canonical_json(record_for(row["seq"], fields_from_row(row))))
    return entries


async def read_tree_heads(engine: AsyncEngine) -> list[TreeHead]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(audit_tree_heads).order_by(audit_tree_heads.c.size))
        return [TreeHead.from_row(row._mapping) for row in rows]


def spread(values: list[int], count: int) -> list[int]:
    """At most ``count`` of ``values``, evenly spaced, always the first and the last."""
    if len(values) <= count:
        return list(values)
    step = (len(values) - 1) / (count - 1)
    return sorted({values[round(i * step)] for i in range(count)})


async def assert_consistent(
    engine: AsyncEngine, roots: dict[int, bytes], pairs: list[tuple[int, int]]
) -> None:
    """Every (old, size) pair's consistency proof, read from the stored tree, verifies with
    the reference verifier between the two given roots."""
    async with engine.connect() as conn:
        for old, size in pairs:
            proof = await consistency_proof(conn, old, size)
            assert ref.verify_consistency(old, size, roots[old], roots[size], proof), (
                f"consistency proof {old} -> {size} does not verify"
            )


async def assert_one_tree(
    engine: AsyncEngine,
    vkeys: list[str],
    *,
    entries: list[str] | None = None,
    sample: int = 20,
    origin: str = TEST_ORIGIN,
) -> list[TreeHead]:
    """Check the stored log as an auditor would: the head's root is the RFC 9162 root of the
    stored entries, it sits on the newest signed tree head, every tree head is a signed
    checkpoint of this log equal to its row and consistent with the head, and every pair
    among ``sample`` of them is mutually consistent. Returns the tree heads."""
    if entries is None:
        entries = await read_entries(engine)
    heads = await read_tree_heads(engine)
    async with engine.connect() as conn:
        head = await read_head(conn)
    assert head.size == len(entries)
    assert head.root == ref.tree_hash([e.encode() for e in entries])
    assert heads and (heads[-1].size, heads[-1].root) == (head.size, head.root)
    roots = {}
    for tree_head in heads:
        opened = ref.open_checkpoint(tree_head.note, vkeys)
        assert opened == (origin, tree_head.size, tree_head.root), tree_head.size
        roots[tree_head.size] = tree_head.root
    sizes = sorted(roots)
    # Every head against the newest (so each is a prefix of the stored tree) ...
    await assert_consistent(engine, roots, [(size, head.size) for size in sizes])
    # ... and every pair of a spread among them, each verified on its own.
    chosen = spread(sizes, sample)
    await assert_consistent(engine, roots, list(itertools.combinations(chosen, 2)))
    return heads


async def assert_stored_hashes(engine: AsyncEngine, entries: list[str]) -> None:
    """audit_tree holds every leaf hash (level 0) and the root of every complete tile of
    256 leaves (level 8), nothing else."""
    async with engine.connect() as conn:
        rows = (
            await conn.execute(select(audit_tree.c.level, audit_tree.c.idx, audit_tree.c.hash))
        ).all()
    stored: dict[int, dict[int, bytes]] = {}
    for level, idx, value in rows:
        stored.setdefault(int(level), {})[int(idx)] = bytes(value)
    leaves = [e.encode() for e in entries]
    assert stored.get(0, {}) == {i: ref.leaf_hash(leaf) for i, leaf in enumerate(leaves)}
    tiles = {
        i: ref.tree_hash(leaves[i * TILE : (i + 1) * TILE]) for i in range(len(leaves) // TILE)
    }
    assert stored.get(8, {}) == tiles
    assert set(stored) <= {0, 8}


def assert_receipts(results: list[AppendResult], vkeys: list[str]) -> None:
    """Every receipt verifies with the reference verifier, at its own index and entry."""
    for result in results:
        checked = ref.verify_receipt(receipt_of(result), vkeys, origin=TEST_ORIGIN)
        assert (checked["index"], checked["size"]) == (result.seq - 1, result.size)
        assert checked["entry"]["seq"] == result.seq


async def count(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


# --- appends, entries, receipts, tree heads ---------------------------------------------------


async def test_concurrent_appends_build_one_gapless_tree_whose_receipts_verify(
    writer: AuditWriter, app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    events = [make_event(n) for n in range(120)]
    results = await asyncio.gather(*(writer.append(e) for e in events))

    assert sorted(r.seq for r in results) == list(range(1, 121))
    for event, result in zip(events, results, strict=True):
        assert result.entry == canonical_json(record_for(result.seq, event.fields()))
        assert result.seq <= result.size <= 120
    assert_receipts(results, [log_signer.vkey])
    entries = await read_entries(app_engine)
    assert entries == [r.entry for r in sorted(results, key=lambda r: r.seq)]
    await assert_one_tree(app_engine, [log_signer.vkey], entries=entries)
    await assert_stored_hashes(app_engine, entries)


async def test_a_receipt_from_another_key_or_for_another_entry_is_refused(
    writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    first, second = [await writer.append(make_event(n)) for n in range(2)]
    stranger = NoteLogSigner.generate(TEST_ORIGIN)

    with pytest.raises(AssertionError, match="no verified signature"):
        ref.verify_receipt(receipt_of(second), [stranger.vkey])
    swapped = {"entry": first.entry, "proof": second.inclusion_proof()}
    with pytest.raises(AssertionError, match="not included"):
        ref.verify_receipt(swapped, [log_signer.vkey])
    assert ref.verify_receipt(receipt_of(second), [stranger.vkey, log_signer.vkey])["index"] == 1


@pytest.mark.parametrize(
    "event",
    [
        make_event(1),
        # tls_version is the key the entry template splices seq in front of: a nested key
        # or a string that spells it must not move seq.
        make_event(2, detail={"tls_version": "x", "seq": 5, "s": ',"tls_version":'}),
        make_event(3, tls_version=None, input_digests={"tls_version": "ab" * 32}),
        make_event(4, actor=None, role=None, http_status=None, latency_ms=None, detail={}),
        make_event(5, path="/ünï/\u2014/😀", detail={"\u00e9": ["é", {"b": 1, "a": 2}]}),
    ],
    ids=["plain", "tls_version-in-detail", "no-tls-version", "nulls", "non-ascii"],
)
async def test_the_entry_is_the_canonical_json_of_the_record(
    writer: AuditWriter, app_engine: AsyncEngine, log_signer: NoteLogSigner, event: AuditEvent
) -> None:
    result = await writer.append(event)

    expected = canonical_json(record_for(1, event.fields()))
    assert result.seq == 1 and result.entry == expected
    assert json.loads(result.entry) == {**event.fields(), "seq": 1}
    assert ref.verify_receipt(receipt_of(result), [log_signer.vkey])["entry"]["seq"] == 1
    assert await read_entries(app_engine) == [expected]
    await assert_stored_hashes(app_engine, [expected])


async def test_each_group_commit_stores_its_signed_tree_head_before_append_returns(
    writer: AuditWriter, app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    started = datetime.now(UTC)

    async def append_then_look(n: int) -> tuple[AppendResult, Any]:
        result = await writer.append(make_event(n))
        # Read at once, on another connection: the head must already be there.
        async with app_engine.connect() as conn:
            row = (
                await conn.execute(
                    select(audit_tree_heads).where(audit_tree_heads.c.size == result.size)
                )
            ).first()
        return result, row

    pairs: list[tuple[AppendResult, Any]] = []
    for burst in (1, 7, 1, 40, 3):
        pairs += await asyncio.gather(*(append_then_look(len(pairs) + i) for i in range(burst)))

    for result, row in pairs:
        assert row is not None, f"no tree head at {result.size} when seq {result.seq} returned"
        assert row.note == result.batch.checkpoint
        assert row.key_id == log_signer.key_id
        assert ref.open_checkpoint(row.note, [log_signer.vkey]) == (
            TEST_ORIGIN,
            result.size,
            bytes(row.root),
        )
        assert row.root == result.batch.tree.root()
        issued = parse_timestamp(row.issued_at)
        assert started - timedelta(seconds=1) <= issued <= datetime.now(UTC)
    # One tree head per group commit: each batch is a gapless run ending at its size.
    batches = sorted({id(r.batch): r.batch for r, _ in pairs}.values(), key=lambda b: b.tree.size)
    heads = await read_tree_heads(app_engine)
    assert [h.size for h in heads] == [b.tree.size for b in batches]
    previous = 0
    for batch in batches:
        seqs = sorted(r.seq for r, _ in pairs if r.batch is batch)
        assert seqs == list(range(previous + 1, batch.tree.size + 1))
        previous = batch.tree.size
    await assert_one_tree(app_engine, [log_signer.vkey])


async def test_waiting_records_share_one_transaction_and_one_tree_head(
    app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    registry = CollectorRegistry()
    writer = AuditWriter(app_engine, log_signer, metrics=AuditMetrics.create(registry))
    await writer.start()
    try:
        results = await asyncio.gather(*(writer.append(make_event(n)) for n in range(200)))
    finally:
        await writer.stop()

    batches = registry.get_sample_value("kzg_audit_batch_size_count")
    assert registry.get_sample_value("kzg_audit_batch_size_sum") == 200
    assert batches is not None and batches < 50
    assert await count(app_engine, audit_tree_heads) == batches
    assert len({id(r.batch) for r in results}) == batches
    assert registry.get_sample_value("kzg_audit_head_seq") == 200
    assert registry.get_sample_value("kzg_audit_tree_size") == 200
    assert registry.get_sample_value("kzg_audit_queue_depth") == 0
    assert registry.get_sample_value("kzg_audit_signing_failures_total") == 0
    stamped = registry.get_sample_value("kzg_audit_checkpoint_timestamp_seconds")
    assert stamped is not None and abs(stamped - time.time()) < 60


async def test_stop_commits_what_is_waiting_and_refuses_after(
    app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    writer = AuditWriter(app_engine, log_signer)
    await writer.start()
    pending = [asyncio.ensure_future(writer.append(make_event(n))) for n in range(10)]
    await asyncio.sleep(0)
    await writer.stop()

    results = await asyncio.gather(*pending)
    assert sorted(r.seq for r in results) == list(range(1, 11))
    assert_receipts(results, [log_signer.vkey])
    with pytest.raises(AuditUnavailable):
        await writer.append(make_event(11))
    assert not await writer.ready()
    await assert_one_tree(app_engine, [log_signer.vkey])


# --- a randomized long log ----------------------------------------------------------------------


def batch_sizes(rng: random.Random, total: int) -> list[int]:
    """Random burst sizes summing to ``total``: runs of single appends, small and mid
    bursts, and bursts past a tile (256) and past the writer's max_batch."""
    sizes: list[int] = []
    while (left := total - sum(sizes)) > 0:
        kind = rng.random()
        if kind < 0.35:
            size = 1
        elif kind < 0.65:
            size = rng.randint(2, 9)
        elif kind < 0.9:
            size = rng.randint(10, 300)
        else:
            size = rng.randint(300, 1500)
        sizes.append(min(size, left))
    return sizes


async def test_a_randomized_log_of_ten_thousand_entries_stays_one_consistent_tree(
    app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    seed = random.SystemRandom().randrange(2**32)
    print(f"randomized log: seed {seed}")  # shown with a failure, to replay it
    rng = random.Random(seed)
    bursts = batch_sizes(rng, 10_000)
    writer = AuditWriter(app_engine, log_signer, max_batch=rng.randint(400, 1200))
    await writer.start()
    results: list[AppendResult] = []
    try:
        for burst in bursts:
            start = len(results)
            results += await asyncio.gather(
                *(writer.append(make_event(start + i)) for i in range(burst))
            )
    finally:
        await writer.stop()

    note = f"seed {seed}"
    assert [r.seq for r in results] == list(range(1, 10_001)), note
    assert_receipts(results, [log_signer.vkey])
    entries = await read_entries(app_engine)
    assert entries == [r.entry for r in results], note
    heads = await assert_one_tree(app_engine, [log_signer.vkey], entries=entries, sample=60)
    assert [h.size for h in heads] == sorted({r.size for r in results}), note
    # Every burst waited for its own commit, so each ended with at least one signed head.
    assert len(heads) >= len(bursts), note
    await assert_stored_hashes(app_engine, entries)


# --- guards ---------------------------------------------------------------------------------


REWRITES = [
    "UPDATE audit_events SET actor = 'someone-else' WHERE seq = 1",
    "DELETE FROM audit_events WHERE seq = 1",
    "DELETE FROM audit_events",
    "UPDATE audit_tree SET idx = idx + 100 WHERE level = 0",
    "DELETE FROM audit_tree",
    "UPDATE audit_tree_heads SET note = 'forged'",
    "DELETE FROM audit_tree_heads WHERE size = 2",
    # A tree head below the head: a head that goes back.
    "INSERT INTO audit_tree_heads (size, root, issued_at, key_id, note) "
    "SELECT 0, root, issued_at, key_id, note FROM audit_tree_heads WHERE size = 1",
    # The head back onto an older signed head, forward onto no signed head, or onto a root
    # that is not the signed one of its size.
    "UPDATE audit_log_head SET size = 1, root = (SELECT root FROM audit_tree_heads WHERE size = 1)",
    "UPDATE audit_log_head SET size = size + 1",
    "UPDATE audit_log_head SET root = (SELECT root FROM audit_tree_heads WHERE size = 1)",
    "DELETE FROM audit_log_head",
    "INSERT INTO audit_legacy_chain (id, through_seq, hash) VALUES (2, 0, 'x')",
    "INSERT INTO audit_checkpoints (seq, hash, issued_at, key_id, message, signature) "
    "VALUES (9, 'h', 'now', 'k', 'm', 's')",
]


@pytest.mark.parametrize("statement", REWRITES)
async def test_gateway_connection_cannot_rewrite_history(
    writer: AuditWriter, app_engine: AsyncEngine, log_signer: NoteLogSigner, statement: str
) -> None:
    await writer.append(make_event(1))
    await writer.append(make_event(2))

    with pytest.raises(
        DBAPIError,
        match=r"append-only|refused|permission denied|never goes back|moves forward|closed",
    ):
        async with app_engine.begin() as conn:
            await conn.execute(text(statement))

    heads = await assert_one_tree(app_engine, [log_signer.vkey])
    assert [h.size for h in heads] == [1, 2]


async def test_even_the_owner_is_refused_by_the_triggers(
    audit_store: AuditStore, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    await writer.append(make_event(1))
    await writer.append(make_event(2))
    statements = [
        "UPDATE audit_events SET outcome = 'denied'",
        "DELETE FROM audit_events",
        "UPDATE audit_tree SET idx = idx + 100",
        "DELETE FROM audit_tree",
        "UPDATE audit_tree_heads SET size = size + 100",
        "DELETE FROM audit_tree_heads",
        "UPDATE audit_log_head SET size = 1, root = (SELECT root FROM audit_tree_heads WHERE size = 1)",
        "DELETE FROM audit_log_head",
        "UPDATE audit_legacy_chain SET through_seq = 7",
        "INSERT INTO audit_checkpoints (seq, hash, issued_at, key_id, message, signature) "
        "VALUES (9, 'h', 'now', 'k', 'm', 's')",
    ]
    if audit_store.kind == "postgresql":
        statements += [
            f"TRUNCATE {table}"
            for table in ("audit_events", "audit_tree", "audit_tree_heads", "audit_log_head")
        ]
    owner = make_engine(audit_store.owner_url)
    try:
        for statement in statements:
            with pytest.raises(DBAPIError, match=r"append-only|refused|moves forward|closed"):
                async with owner.begin() as conn:
                    await conn.execute(text(statement))
        await assert_one_tree(owner, [log_signer.vkey])
    finally:
        await owner.dispose()


async def test_postgres_runtime_role_appends_and_reads_only(pg_store: AuditStore) -> None:
    engine = make_engine(pg_store.app_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
                    "WHERE grantee = current_user AND table_name LIKE 'audit%'"
                )
            )
            grants: dict[str, set[str]] = {}
            for row in rows:
                grants.setdefault(row.table_name, set()).add(row.privilege_type)
    finally:
        await engine.dispose()
    assert grants == {
        "audit_events": {"INSERT", "SELECT"},
        "audit_tree": {"INSERT", "SELECT"},
        "audit_tree_heads": {"INSERT", "SELECT"},
        # The head row moves (forward only, onto a stored tree head: its trigger).
        "audit_log_head": {"SELECT", "UPDATE"},
        # Anchors are written only by audit_prune (SECURITY DEFINER), under its checks;
        # the first release's chain head and BLS checkpoints are closed.
        "audit_anchors": {"SELECT"},
        "audit_retention": {"SELECT"},
        "audit_legacy_chain": {"SELECT"},
        "audit_checkpoints": {"SELECT"},
    }


# --- several writers on one database -------------------------------------------------------


async def test_two_writers_on_one_database_build_one_consistent_tree(
    audit_store: AuditStore, app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    # Two instances, the second still on the previous log key (a rotation it has not
    # picked up yet): one tree all the same, every head signed by one of the two keys.
    previous = NoteLogSigner.generate(TEST_ORIGIN)
    other_engine = make_engine(audit_store.app_url)
    writers = [
        AuditWriter(app_engine, log_signer, commit_timeout=30),
        AuditWriter(other_engine, previous, commit_timeout=30),
    ]
    for w in writers:
        await w.start()
    try:

        async def traffic(w: AuditWriter, tag: str) -> list[AppendResult]:
            done: list[AppendResult] = []
            for start in range(0, 300, 15):
                done += await asyncio.gather(
                    *(
                        w.append(make_event(n, request_id=f"{tag}-{n}"))
                        for n in range(start, start + 15)
                    )
                )
                # A breath between bursts, as in write_many below.
                await asyncio.sleep(0.005)
            return done

        a, b = await asyncio.gather(traffic(writers[0], "a"), traffic(writers[1], "b"))
    finally:
        for w in writers:
            await w.stop()
        await other_engine.dispose()

    assert sorted(r.seq for r in a + b) == list(range(1, 601))
    assert_receipts(a, [log_signer.vkey])
    assert_receipts(b, [previous.vkey])
    owners = [json.loads(e)["request_id"][0] for e in await read_entries(app_engine)]
    assert sum(1 for x, y in itertools.pairwise(owners) if x != y) > 1  # really interleaved
    vkeys = [log_signer.vkey, previous.vkey]
    heads = await assert_one_tree(app_engine, vkeys)
    by_key = {log_signer.key_id: log_signer.vkey, previous.key_id: previous.vkey}
    for head in heads:
        ref.open_checkpoint(head.note, [by_key[head.key_id]])  # signed by the key it names
    assert {h.size for h in heads} == {r.size for r in a + b}


# Long enough (~0.5 s on SQLite) that two writers started together surely overlap.
PER_PROCESS = 1000


def _process_signer(skey: str) -> NoteLogSigner:
    signer = NoteSigner.from_skey(skey)
    return NoteLogSigner(signer, signer.vkey)


async def write_many(url: str, count: int, tag: str) -> None:
    """Run in a separate OS process: read the log key from stdin, say ready, and once told
    to go, append ``count`` events through its own writer; print every receipt (JSON)."""
    signer = _process_signer((await asyncio.to_thread(sys.stdin.readline)).strip())
    engine = make_engine(url)
    writer = AuditWriter(engine, signer, commit_timeout=30)
    await writer.start()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    results: list[AppendResult] = []
    try:
        for start in range(0, count, 20):
            results += await asyncio.gather(
                *(
                    writer.append(make_event(n, request_id=f"{tag}-{n}"))
                    for n in range(start, min(start + 20, count))
                )
            )
            # A breath between bursts: SQLite's busy handler polls with sleeps, and a
            # writer that never pauses could keep the lock until it is done.
            await asyncio.sleep(0.005)
    finally:
        await writer.stop()
        await engine.dispose()
    for result in results:
        print(json.dumps(receipt_of(result)), flush=False)
    sys.stdout.flush()


async def test_two_processes_share_one_gapless_consistent_tree(
    audit_store: AuditStore, app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    code = "import asyncio, sys; from tests.audit.test_writer import write_many; " + (
        "asyncio.run(write_many(sys.argv[1], int(sys.argv[2]), sys.argv[3]))"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            audit_store.app_url,
            str(PER_PROCESS),
            tag,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for tag in ("proc-a", "proc-b")
    ]
    # Both share the log key (as the instances of one deployment do) and start together,
    # once both are connected and their writers running.
    for p in procs:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(log_signer.signer.skey.encode() + b"\n")
        await p.stdin.drain()
        assert await p.stdout.readline() == b"ready\n"
    outputs = await asyncio.gather(*(p.communicate(b"go\n") for p in procs))
    assert [p.returncode for p in procs] == [0, 0]

    receipts = [json.loads(line) for out, _ in outputs for line in out.decode().splitlines()]
    assert len(receipts) == 2 * PER_PROCESS
    checked = [ref.verify_receipt(r, [log_signer.vkey], origin=TEST_ORIGIN) for r in receipts]
    assert sorted(c["index"] for c in checked) == list(range(2 * PER_PROCESS))
    entries = await read_entries(app_engine)
    for receipt, check in zip(receipts, checked, strict=True):
        assert entries[check["index"]] == receipt["entry"]
    ids = [json.loads(e)["request_id"] for e in entries]
    assert sorted(ids) == sorted(
        f"{t}-{n}" for t in ("proc-a", "proc-b") for n in range(PER_PROCESS)
    )
    # Both processes really interleaved rather than running one after the other.
    owners = [i.split("-")[1] for i in ids]
    assert sum(1 for a, b in itertools.pairwise(owners) if a != b) > 1
    heads = await assert_one_tree(app_engine, [log_signer.vkey], entries=entries)
    assert {h.size for h in heads} == {c["size"] for c in checked}


# --- faults -----------------------------------------------------------------------------------


def _via_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _append_until_ok(writer: AuditWriter, deadline: float) -> AppendResult:
    while True:
        try:
            return await writer.append(make_event(99))
        except AuditUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_postgres_unreachable_fails_closed_then_recovers(
    pg_store: AuditStore, log_signer: NoteLogSigner
) -> None:
    pg_port = int(os.environ["KZG_TEST_PG_PORT"])
    proxy = CuttableProxy(os.environ["KZG_TEST_PG_HOST"], pg_port)
    await proxy.start()
    engine = make_engine(_via_port(pg_store.app_url, proxy.port))
    writer = AuditWriter(engine, log_signer, commit_timeout=2.0)
    await writer.start()
    try:
        assert (await writer.append(make_event(1))).seq == 1
        assert await writer.ready()

        await proxy.cut()
        with pytest.raises(AuditUnavailable):
            await writer.append(make_event(2))
        assert not await writer.ready()

        await proxy.start()
        result = await _append_until_ok(writer, time.monotonic() + 10)
        assert result.seq == 2
        assert await writer.ready()
        assert_receipts([result], [log_signer.vkey])
        heads = await assert_one_tree(engine, [log_signer.vkey])
        assert [h.size for h in heads] == [1, 2]
    finally:
        await writer.stop()
        await engine.dispose()
        await proxy.cut()


async def test_sqlite_locked_out_fails_closed_then_recovers(
    sqlite_store: AuditStore, log_signer: NoteLogSigner
) -> None:
    engine = make_engine(sqlite_store.app_url, busy_timeout=0.5)
    writer = AuditWriter(engine, log_signer, commit_timeout=1.0)
    await writer.start()
    try:
        with sqlite_write_lock(sqlite_store.app_url) as release:
            with pytest.raises(AuditUnavailable):
                await writer.append(make_event(1))
            release()
            result = await _append_until_ok(writer, time.monotonic() + 10)
        assert result.seq == 1
        assert_receipts([result], [log_signer.vkey])
        heads = await assert_one_tree(engine, [log_signer.vkey])
        assert [h.size for h in heads] == [1]
    finally:
        await writer.stop()
        await engine.dispose()


class FlakySigner:
    """The log key, failing while ``broken`` (an HSM or KMS that stopped answering)."""

    def __init__(self, inner: NoteLogSigner) -> None:
        self.inner = inner
        self.broken = False
        self.failed = 0

    @property
    def key_id(self) -> str:
        return self.inner.key_id

    @property
    def origin(self) -> str:
        return self.inner.origin

    def sign_note(self, text: str) -> str:
        if self.broken:
            self.failed += 1
            raise RuntimeError("the signing service is unreachable")
        return self.inner.sign_note(text)

    def current(self) -> FlakySigner:
        return self


async def test_a_signer_that_fails_fails_the_batch_and_commits_nothing(
    app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    registry = CollectorRegistry()
    signer = FlakySigner(log_signer)
    writer = AuditWriter(app_engine, signer, metrics=AuditMetrics.create(registry))
    await writer.start()
    try:
        first = await writer.append(make_event(1))
        signer.broken = True
        outcomes = await asyncio.gather(
            *(writer.append(make_event(n)) for n in range(2, 8)), return_exceptions=True
        )
        assert all(isinstance(o, AuditUnavailable) for o in outcomes), outcomes
        assert signer.failed >= 1
        assert registry.get_sample_value("kzg_audit_signing_failures_total") == signer.failed
        assert registry.get_sample_value("kzg_audit_commit_failures_total") == signer.failed
        # Nothing of the failed batches reached the database: no entry, hash or head.
        assert await read_entries(app_engine) == [first.entry]
        assert await count(app_engine, audit_tree) == 1
        assert [h.size for h in await read_tree_heads(app_engine)] == [1]
        async with app_engine.connect() as conn:
            assert (await conn.execute(select(audit_log_head.c.size))).scalar_one() == 1

        signer.broken = False
        later = await writer.append(make_event(8))
    finally:
        await writer.stop()
    assert later.seq == 2
    assert_receipts([first, later], [log_signer.vkey])
    heads = await assert_one_tree(app_engine, [log_signer.vkey])
    assert [h.size for h in heads] == [1, 2]


async def acknowledge_forever(url: str) -> None:
    """Run in a separate OS process: read the log key from stdin, then append without end,
    printing each receipt only after its append returned (as the gateway answers only then)."""
    signer = _process_signer((await asyncio.to_thread(sys.stdin.readline)).strip())
    engine = make_engine(url)
    writer = AuditWriter(engine, signer, commit_timeout=30)
    await writer.start()

    async def client(worker: int) -> None:
        n = 0
        while True:
            result = await writer.append(make_event(n, request_id=f"w{worker}-{n}"))
            print(json.dumps(receipt_of(result)), flush=True)
            n += 1

    await asyncio.gather(*(client(w) for w in range(16)))


async def test_sigkill_under_load_loses_no_acknowledged_record(
    audit_store: AuditStore, app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    code = "import asyncio, sys; from tests.audit.test_writer import acknowledge_forever; " + (
        "asyncio.run(acknowledge_forever(sys.argv[1]))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        audit_store.app_url,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(log_signer.signer.skey.encode() + b"\n")
    await proc.stdin.drain()
    acknowledged: list[str] = []
    while len(acknowledged) < 300:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line, "the writer process ended early"
        acknowledged.append(line.decode())
    proc.kill()  # SIGKILL: no flush, no clean shutdown
    rest, _ = await proc.communicate()
    # The last line may have been cut mid-write by the kill: only whole lines count.
    acknowledged.extend(
        line for line in rest.decode().splitlines(keepends=True) if line.endswith("\n")
    )

    entries = await read_entries(app_engine)
    heads = await assert_one_tree(app_engine, [log_signer.vkey], entries=entries)
    signed = {h.size: h.root for h in heads}
    for line in acknowledged:
        checked = ref.verify_receipt(json.loads(line), [log_signer.vkey], origin=TEST_ORIGIN)
        # Its entry is stored where its proof says, under a checkpoint that was stored.
        assert entries[checked["index"]] == json.loads(line)["entry"]
        assert signed[checked["size"]] == checked["root"]


async def test_client_bytes_the_database_refuses_are_stored_escaped(
    writer: AuditWriter, app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    # A URL path may decode to NUL (PostgreSQL text refuses it) and a value may hold a
    # lone surrogate (not UTF-8): both are escaped before hashing, so the record is
    # committed and its entry is what is read back.
    event = make_event(1, path="/a\x00b", detail={"subject": "x\udcff"})
    result = await writer.append(event)
    async with app_engine.connect() as conn:
        row = (await conn.execute(select(audit_events))).mappings().one()
    fields = fields_from_row(row)
    assert fields["path"] == "/a\\x00b" and fields["detail"]["subject"] == "x\\udcff"
    assert result.entry == canonical_json(record_for(1, fields))
    assert_receipts([result], [log_signer.vkey])
    await assert_one_tree(app_engine, [log_signer.vkey])


class _Unescaped(AuditEvent):
    """An event whose path skips the escaping, as a new field someone forgot might."""

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "path": "/\x00"}


async def test_a_refused_record_fails_alone_not_its_whole_batch(
    pg_store: AuditStore, log_signer: NoteLogSigner
) -> None:
    engine = make_engine(pg_store.app_url)
    writer = AuditWriter(engine, log_signer)
    await writer.start()
    try:
        bad = _Unescaped(**vars(make_event(99)))
        outcomes = await asyncio.gather(
            *(writer.append(make_event(n)) for n in range(10)),
            writer.append(bad),
            *(writer.append(make_event(n)) for n in range(10, 20)),
            return_exceptions=True,
        )
        assert isinstance(outcomes[10], AuditUnavailable), outcomes[10]
        good = [o for i, o in enumerate(outcomes) if i != 10]
        assert all(isinstance(o, AppendResult) for o in good), good
        assert sorted(o.seq for o in good) == list(range(1, 21))
        assert_receipts(good, [log_signer.vkey])
        await assert_one_tree(engine, [log_signer.vkey])
    finally:
        await writer.stop()
        await engine.dispose()


async def test_a_compact_range_that_is_not_the_signed_trees_is_never_extended(
    audit_store: AuditStore, writer: AuditWriter, app_engine: AsyncEngine
) -> None:
    """The head row is the one row the runtime role may update. A compact range rewritten
    at the same size and root would fork every later checkpoint: the writer refuses it."""
    before = await writer.append(make_event(1))
    junk = bytes(32 * len(before.batch.tree.after.hashes))
    # The database refuses the rewrite to the runtime role (audit_0004) ...
    with pytest.raises(DBAPIError, match="refused"):
        async with app_engine.begin() as conn:
            await conn.execute(audit_log_head.update().values(compact=junk))
    # ... and should the owner, guards off, rewrite it, the writer does not extend it.
    await tamper(audit_store, ("UPDATE audit_log_head SET compact = :c", {"c": junk}))
    with pytest.raises(AuditUnavailable):
        await writer.append(make_event(2))
    async with app_engine.connect() as conn:
        head = await read_head(conn)
        stored = (await conn.execute(select(func.count()).select_from(audit_events))).scalar()
    assert (head.size, stored) == (1, 1)
