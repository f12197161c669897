"""Audit appends per second into the Merkle tree log, with durable commits, against the room.

Each writer awaits its own record's commit before sending the next, as a request handler
does; the AuditWriter group-commits whatever is waiting: records, tree hashes, one signed
checkpoint per batch. Stores: PostgreSQL (synchronous_commit on, a fresh temporary
database per run on the loopback server of KZG_TEST_PG_*, ``source .pg-test-env``;
migrated by the owner role, the writer connecting as the runtime role) and SQLite (WAL,
synchronous FULL, a temporary directory).

"The room" is measured in the same run, in rounds alternating with the writer's (medians
compared, so that whatever else loads the machine hits both alike): the same event rows
(read back from audit_events) inserted into a scratch table of the same shape (same
columns and indexes) by a bare driver ``executemany`` (asyncpg on PostgreSQL, sqlite3 on
SQLite), one transaction per batch of the writer's observed mean batch size, back to
back, on one connection. The ratio appends/s / room/s is what the writer's own work
(entries, tree hashes, the signed checkpoint, SQLAlchemy, futures) costs.

Then two writer processes on one PostgreSQL database (128 writers each) run together,
and the stored tree is checked to be one consistent tree: every stored leaf is the hash
of its stored entry, the level-8 hashes fold from the leaves, the root recomputed from
the leaves is the latest signed tree head's (whose note verifies), a consistency proof
between the two processes' last observed sizes verifies, and so do their receipts.

    .venv/bin/python bench/audit_throughput.py [--seconds 2] [--rounds 3]
        [--writers 1,64,256] [--only sqlite|postgresql] [--max-batch N] [--no-multi]
        [--multi-writers 128] [--multi-seconds 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import itertools
import multiprocessing
import os
import pstats
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from benchlib import PgDatabase, PgServer, machine_facts, verdict
from prometheus_client import CollectorRegistry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import canonical_json, record_for
from audit.events import EVENT_FIELDS, AuditEvent
from audit.log import consistency_proof, latest_tree_head, read_head, tree_head_at
from audit.merkle import leaf_hash, node_hash, root_from_leaves, verify_consistency
from audit.metrics import AuditMetrics
from audit.models import TILE_HEIGHT, audit_events, audit_tree, audit_tree_heads, fields_from_row
from audit.note import NoteSigner, NoteVerifier
from audit.signing import NoteLogSigner
from audit.tlog import open_checkpoint, verify_inclusion_proof
from audit.writer import AuditWriter
from gateway.db import make_engine, migrate
from migrations import AUDIT_TARGETS

ORIGIN = "bench.kzg-gateway.example/audit"
TARGET_RATE = 20_000  # appends/s on PostgreSQL at 256 writers
TARGET_RATIO = 0.5  # of the room, on PostgreSQL
TARGET_TWO_PROCESSES = 15_000  # appends/s, two processes of 128 writers on one database
_POOL = 64  # distinct events per writer, built before the clock starts
_ROOM_ROWS = 4096  # distinct rows the room cycles through
_COLUMNS = ("seq", *EVENT_FIELDS)


def _event(worker: int, n: int) -> AuditEvent:
    return AuditEvent(
        request_id=f"bench-{worker}-{n}-{secrets.token_hex(4)}",
        occurred_at=datetime.now(UTC),
        actor=f"apikey:{worker}",
        role="client",
        action="verify_kzg_proof",
        outcome="success",
        http_status=200,
        client_addr="127.0.0.1",
        tls_version="TLSv1.3",
        method="POST",
        path="/v1/kzg/verify-proof",
        input_digests={"commitment": secrets.token_hex(32), "proof": secrets.token_hex(32)},
        result_digest=secrets.token_hex(32),
        latency_ms=0.8,
    )


def _signer(skey: str | None = None) -> NoteLogSigner:
    if skey is None:
        return NoteLogSigner.generate(ORIGIN)
    note_signer = NoteSigner.from_skey(skey)
    return NoteLogSigner(note_signer, note_signer.vkey)


# ---------------------------------------------------------------------------- the writer


@dataclass
class WriterRun:
    appended: int  # in the timed window
    elapsed: float
    batches: int
    batched: int  # records in those batches
    commit_seconds: float
    cpu_seconds: float = 0.0  # this process's CPU time in the timed window
    started_at: float = 0.0  # wall clock, for runs in several processes
    ended_at: float = 0.0
    last_size: int = 0  # the largest tree size this process saw in a checkpoint
    receipts: list[tuple[str, str]] = field(default_factory=list)  # (entry, tlog-proof)
    profile: str = ""

    @property
    def rate(self) -> float:
        return self.appended / self.elapsed

    @property
    def mean_batch(self) -> float:
        return self.batched / max(self.batches, 1)

    @property
    def commit_ms(self) -> float:
        return 1000 * self.commit_seconds / max(self.batches, 1)

    @property
    def cpu_us(self) -> float:
        """CPU microseconds of this process (clients and writer) per append."""
        return 1e6 * self.cpu_seconds / max(self.appended, 1)


def _sample(registry: CollectorRegistry) -> tuple[float, float, float]:
    get = registry.get_sample_value
    return (
        get("kzg_audit_batch_size_count") or 0.0,
        get("kzg_audit_batch_size_sum") or 0.0,
        get("kzg_audit_commit_seconds_sum") or 0.0,
    )


async def run_writers(
    url: str,
    signer: NoteLogSigner,
    writers: int,
    seconds: float,
    *,
    profile: bool = False,
    barrier: Any = None,
    max_batch: int | None = None,
) -> WriterRun:
    """``writers`` clients appending back to back through one AuditWriter for ``seconds``
    (``max_batch``: the writer's, or its default when None)."""
    engine = make_engine(url)
    registry = CollectorRegistry()
    options = {} if max_batch is None else {"max_batch": max_batch}
    metrics = AuditMetrics.create(registry)
    writer = AuditWriter(engine, signer, commit_timeout=30, metrics=metrics, **options)
    await writer.start()
    try:
        # Events are built before the clock starts: the figure is the audit log's, not
        # the benchmark's cost of inventing requests. One append opens the connection.
        pool = [[_event(w, n) for n in range(_POOL)] for w in range(writers)]
        await writer.append(_event(-1, 0))
        if barrier is not None:
            await asyncio.to_thread(barrier.wait)
        counts = [0] * writers
        last: list[Any] = [None] * writers
        before = _sample(registry)
        profiler = cProfile.Profile() if profile else None
        started_at = time.time()
        cpu_started = time.process_time()
        started = time.perf_counter()
        deadline = started + seconds

        async def client(worker: int) -> None:
            events = pool[worker]
            while time.perf_counter() < deadline:
                last[worker] = await writer.append(events[counts[worker] % _POOL])
                counts[worker] += 1

        if profiler:
            profiler.enable()
        await asyncio.gather(*(client(w) for w in range(writers)))
        if profiler:
            profiler.disable()
        elapsed = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        ended_at = time.time()
        after = _sample(registry)
    finally:
        await writer.stop()
        await engine.dispose()
    done = [r for r in last if r is not None]
    newest = max(done, key=lambda r: r.seq)
    oldest = min(done, key=lambda r: r.seq)
    run = WriterRun(
        appended=sum(counts),
        elapsed=elapsed,
        batches=int(after[0] - before[0]),
        batched=int(after[1] - before[1]),
        commit_seconds=after[2] - before[2],
        cpu_seconds=cpu_seconds,
        started_at=started_at,
        ended_at=ended_at,
        last_size=max(r.size for r in done),
        receipts=[(r.entry, r.inclusion_proof()) for r in (oldest, newest)],
    )
    if profiler:
        run.profile = _profile_text(profiler)
    return run


def _profile_text(profiler: cProfile.Profile, top: int = 30) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


# ------------------------------------------------------------------------------ the room


async def pg_room(db: PgDatabase, batch: int, seconds: float) -> tuple[float, float]:
    """Rows/s of asyncpg executemany into a scratch copy of audit_events (same columns and
    indexes), ``batch`` rows per transaction on one connection (as the writer has), as the
    runtime role. Rows are the writer's own, read back from audit_events."""
    owner = await asyncpg.connect(**db.connect_kwargs(db.owner))
    try:
        await owner.execute(
            "CREATE TABLE IF NOT EXISTS bench_room (LIKE audit_events INCLUDING ALL)"
        )
        await owner.execute(f'GRANT SELECT, INSERT ON bench_room TO "{db.app.user}"')
    finally:
        await owner.close()
    conn = await asyncpg.connect(**db.connect_kwargs(db.app))
    try:
        rows = [
            tuple(r)
            for r in await conn.fetch(
                f"SELECT {', '.join(EVENT_FIELDS)} FROM audit_events ORDER BY seq LIMIT $1",
                _ROOM_ROWS,
            )
        ]
        marks = ", ".join(f"${n}" for n in range(1, len(_COLUMNS) + 1))
        insert = f"INSERT INTO bench_room ({', '.join(_COLUMNS)}) VALUES ({marks})"
        seq = await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM bench_room")

        def next_batch() -> list[tuple[Any, ...]]:
            nonlocal seq
            out = [(seq + i + 1, *rows[(seq + i) % len(rows)]) for i in range(batch)]
            seq += batch
            return out

        async with conn.transaction():  # warm: the statement is prepared once
            await conn.executemany(insert, next_batch())
        inserted = 0
        cpu_started = time.process_time()
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            rows_now = next_batch()
            async with conn.transaction():
                await conn.executemany(insert, rows_now)
            inserted += batch
        elapsed = time.perf_counter() - started
        return inserted / elapsed, 1e6 * (time.process_time() - cpu_started) / max(inserted, 1)
    finally:
        await conn.close()


def sqlite_room(path: str, batch: int, seconds: float) -> tuple[float, float]:
    """Rows/s of sqlite3 executemany into a scratch copy of audit_events in the same
    database (WAL, synchronous FULL), ``batch`` rows per transaction."""
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        ddl = con.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'audit_events' "
            "AND type IN ('table', 'index') AND sql IS NOT NULL ORDER BY type DESC"
        ).fetchall()
        for (sql,) in ddl:
            sql = sql.replace("audit_events", "bench_room")
            sql = sql.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ", 1)
            con.execute(sql.replace("CREATE INDEX ", "CREATE INDEX IF NOT EXISTS ", 1))
        rows = con.execute(
            f"SELECT {', '.join(EVENT_FIELDS)} FROM audit_events ORDER BY seq LIMIT ?",
            (_ROOM_ROWS,),
        ).fetchall()
        marks = ", ".join("?" * len(_COLUMNS))
        insert = f"INSERT INTO bench_room ({', '.join(_COLUMNS)}) VALUES ({marks})"
        seq = con.execute("SELECT COALESCE(MAX(seq), 0) FROM bench_room").fetchone()[0]
        inserted = 0
        cpu_started = time.process_time()
        started = time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            batch_rows = [(seq + i + 1, *rows[(seq + i) % len(rows)]) for i in range(batch)]
            seq += batch
            con.execute("BEGIN")
            con.executemany(insert, batch_rows)
            con.execute("COMMIT")
            inserted += batch
        elapsed = time.perf_counter() - started
        return inserted / elapsed, 1e6 * (time.process_time() - cpu_started) / max(inserted, 1)
    finally:
        con.close()


# ------------------------------------------------------------------------ the tree check


@dataclass
class TreeCheck:
    size: int
    tree_heads: int
    problems: list[str]
    consistency: list[tuple[int, int]]
    receipts: int
    seconds: float

    def summary(self) -> str:
        state = (
            "ONE CONSISTENT TREE"
            if not self.problems
            else "BROKEN: " + "; ".join(self.problems[:5])
        )
        pairs = ", ".join(f"{a}->{b}" for a, b in self.consistency)
        return (
            f"size {self.size}, {self.tree_heads} signed tree heads, consistency {pairs}, "
            f"{self.receipts} receipts: {state} (checked in {self.seconds:.1f} s)"
        )


async def check_tree(
    engine: AsyncEngine,
    verifier: NoteVerifier,
    sizes: Sequence[int],
    receipts: Sequence[tuple[str, str]],
) -> TreeCheck:
    """Recompute the tree from what is stored and compare it with the signed heads."""
    started = time.perf_counter()
    problems: list[str] = []
    pairs: list[tuple[int, int]] = []
    async with engine.connect() as conn:
        head = await read_head(conn)
        latest = await latest_tree_head(conn)
        leaf_rows = (
            await conn.execute(
                select(audit_tree.c.idx, audit_tree.c.hash)
                .where(audit_tree.c.level == 0)
                .order_by(audit_tree.c.idx)
            )
        ).all()
        tile_rows = (
            await conn.execute(
                select(audit_tree.c.idx, audit_tree.c.hash)
                .where(audit_tree.c.level == TILE_HEIGHT)
                .order_by(audit_tree.c.idx)
            )
        ).all()
        heads = (await conn.execute(select(audit_tree_heads.c.size))).all()
        leaves = [bytes(h) for _, h in leaf_rows]
        if [int(i) for i, _ in leaf_rows] != list(range(len(leaf_rows))):
            problems.append("the stored leaves are not indexes 0..n-1")
        seq = 0
        result = await conn.stream(select(audit_events).order_by(audit_events.c.seq))
        async for row in result.mappings():
            seq += 1
            if row["seq"] != seq:
                problems.append(f"audit_events is not gapless at seq {seq}")
                break
            entry = canonical_json(record_for(seq, fields_from_row(row)))
            if seq > len(leaves) or leaf_hash(entry.encode("utf-8")) != leaves[seq - 1]:
                problems.append(f"the stored leaf of seq {seq} is not its entry's hash")
                break
        if seq != len(leaves):
            problems.append(f"{seq} entries but {len(leaves)} stored leaves")
        width = 1 << TILE_HEIGHT
        for idx, value in tile_rows:
            layer = leaves[idx * width : (idx + 1) * width]
            while len(layer) > 1:
                layer = [node_hash(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
            if len(layer) != 1 or layer[0] != bytes(value):
                problems.append(f"stored level-{TILE_HEIGHT} hash {idx} does not fold its leaves")
                break
        if latest is None:
            problems.append("no signed tree head")
        else:
            checkpoint = open_checkpoint(latest.note, [verifier], ORIGIN)
            root = root_from_leaves(leaves)
            if not (latest.size == head.size == len(leaves)):
                problems.append(
                    f"sizes differ: head {head.size}, latest tree head {latest.size}, "
                    f"leaves {len(leaves)}"
                )
            if not (root == latest.root == head.root == checkpoint.root):
                problems.append("the root recomputed from the leaves is not the signed root")
            if checkpoint.size != latest.size:
                problems.append("the latest note's size is not its row's")
        wanted = sorted({*sizes, latest.size if latest else 0} - {0})
        for old, new in itertools.pairwise(wanted):
            proof = await consistency_proof(conn, old, new)
            old_head, new_head = await tree_head_at(conn, old), await tree_head_at(conn, new)
            assert old_head is not None and new_head is not None
            old_cp = open_checkpoint(old_head.note, [verifier], ORIGIN)
            new_cp = open_checkpoint(new_head.note, [verifier], ORIGIN)
            if not verify_consistency(old, new, old_cp.root, new_cp.root, proof):
                problems.append(f"consistency proof {old} -> {new} does not verify")
            pairs.append((old, new))
    for entry, proof in receipts:
        try:
            verify_inclusion_proof(entry.encode("utf-8"), proof, [verifier], ORIGIN)
        except ValueError as exc:
            problems.append(f"a receipt does not verify: {exc}")
    return TreeCheck(
        len(leaves), len(heads), problems, pairs, len(receipts), time.perf_counter() - started
    )


# ----------------------------------------------------------------------------- the runs


@dataclass
class Row:
    """One store and writer count: alternating writer and room rounds, medians compared."""

    store: str
    writers: int
    runs: list[WriterRun]
    rooms: list[tuple[float, float]]  # (rows/s, client CPU us/row) per round
    check: TreeCheck

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    @property
    def room(self) -> float:
        return statistics.median(rate for rate, _ in self.rooms)

    @property
    def ratio(self) -> float:
        return self.rate / self.room

    @property
    def mean_batch(self) -> float:
        return sum(r.batched for r in self.runs) / max(sum(r.batches for r in self.runs), 1)

    @property
    def commit_ms(self) -> float:
        seconds = sum(r.commit_seconds for r in self.runs)
        return 1000 * seconds / max(sum(r.batches for r in self.runs), 1)

    def line(self) -> str:
        rates = [r.rate for r in self.runs]
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
        room_rates = [rate for rate, _ in self.rooms]
        rooms = f"{min(room_rates):,.0f}-{max(room_rates):,.0f}"
        cpu = statistics.median(r.cpu_us for r in self.runs)
        room_cpu = statistics.median(c for _, c in self.rooms)
        ok = "ok" if not self.check.problems else "BROKEN"
        return (
            f"{self.store:<10} {self.writers:>7} {self.rate:>10,.0f} {spread:>15} "
            f"{self.mean_batch:>6.1f} {self.commit_ms:>8.2f} {cpu:>6.0f} "
            f"{self.room:>9,.0f} {rooms:>15} {room_cpu:>6.0f} {self.ratio:>6.2f}  {ok}"
        )


HEADER = (
    f"{'store':<10} {'writers':>7} {'appends/s':>10} {'(rounds)':>15} {'batch':>6} "
    f"{'commit':>8} {'CPU':>6} {'room/s':>9} {'(rounds)':>15} {'CPU':>6} {'ratio':>6}  tree\n"
    f"{'':<10} {'':>7} {'':>10} {'':>15} {'':>6} {'ms':>8} {'us/op':>6} {'':>9} {'':>15} "
    f"{'us/row':>6}"
)


async def measure(
    store: str,
    url: str,
    room: Callable[[int, float], Awaitable[tuple[float, float]]],
    writers: int,
    seconds: float,
    rounds: int,
    max_batch: int | None,
) -> Row:
    """Alternate ``rounds`` writer runs and room runs on one database, then check the tree.
    Alternating lets whatever else loads the machine hit both sides alike."""
    signer = _signer()
    runs: list[WriterRun] = []
    rooms: list[tuple[float, float]] = []
    for _ in range(rounds):
        runs.append(await run_writers(url, signer, writers, seconds, max_batch=max_batch))
        batch = max(1, round(runs[0].mean_batch))
        rooms.append(await room(batch, seconds))
    engine = make_engine(url)
    try:
        receipts = [receipt for run in runs for receipt in run.receipts]
        sizes = [run.last_size for run in runs]
        check = await check_tree(engine, signer.signer.verifier(), sizes, receipts)
    finally:
        await engine.dispose()
    return Row(store, writers, runs, rooms, check)


async def sqlite_row(
    writers: int, seconds: float, rounds: int, max_batch: int | None = None
) -> Row:
    with tempfile.TemporaryDirectory(prefix="kzg-audit-bench-") as tmp:
        path = f"{tmp}/audit.db"
        url = f"sqlite+aiosqlite:///{path}"
        await migrate(url, None, target=AUDIT_TARGETS)

        async def room(batch: int, secs: float) -> tuple[float, float]:
            return await asyncio.to_thread(sqlite_room, path, batch, secs)

        return await measure("sqlite", url, room, writers, seconds, rounds, max_batch)


async def _fresh_pg(server: PgServer) -> PgDatabase:
    db = await server.create(f"kzg_bench_{secrets.token_hex(4)}")
    await migrate(db.owner_url, db.app.user, target=AUDIT_TARGETS)
    return db


async def pg_row(
    server: PgServer, writers: int, seconds: float, rounds: int, max_batch: int | None = None
) -> Row:
    db = await _fresh_pg(server)
    try:

        async def room(batch: int, secs: float) -> tuple[float, float]:
            return await pg_room(db, batch, secs)

        return await measure("postgresql", db.app_url, room, writers, seconds, rounds, max_batch)
    finally:
        await server.drop(db.name)


async def pg_profile(server: PgServer, writers: int, seconds: float) -> WriterRun:
    db = await _fresh_pg(server)
    try:
        return await run_writers(db.app_url, _signer(), writers, seconds, profile=True)
    finally:
        await server.drop(db.name)


def _child(url: str, skey: str, writers: int, seconds: float, barrier: Any, queue: Any) -> None:
    run = asyncio.run(run_writers(url, _signer(skey), writers, seconds, barrier=barrier))
    queue.put(dataclasses.asdict(run))  # plain data: the parent's main module differs


@dataclass
class MultiResult:
    runs: list[WriterRun]
    rate: float
    check: TreeCheck


async def two_processes(
    server: PgServer, writers: int, seconds: float, processes: int = 2
) -> MultiResult:
    """``processes`` writer processes with ``writers`` each on one database, together,
    sharing one log key (as instances of one gateway do)."""
    db = await _fresh_pg(server)
    try:
        signer = _signer()
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(processes + 1)
        queue = ctx.Queue()
        procs = [
            ctx.Process(
                target=_child,
                args=(db.app_url, signer.signer.skey, writers, seconds, barrier, queue),
            )
            for _ in range(processes)
        ]
        for proc in procs:
            proc.start()
        try:
            await asyncio.to_thread(barrier.wait, 120)
            runs = [
                WriterRun(**await asyncio.to_thread(queue.get, True, seconds + 120)) for _ in procs
            ]
        finally:
            for proc in procs:
                proc.join(timeout=60)
        span = max(r.ended_at for r in runs) - min(r.started_at for r in runs)
        engine = make_engine(db.app_url)
        try:
            check = await check_tree(
                engine,
                signer.signer.verifier(),
                [r.last_size for r in runs],
                [receipt for r in runs for receipt in r.receipts],
            )
        finally:
            await engine.dispose()
    finally:
        await server.drop(db.name)
    return MultiResult(runs, sum(r.appended for r in runs) / span, check)


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="per round, each side")
    parser.add_argument("--rounds", type=int, default=3, help="alternating writer/room rounds")
    parser.add_argument("--writers", default="1,64,256")
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    parser.add_argument("--max-batch", type=int, help="the writer's max_batch (its default)")
    parser.add_argument("--no-multi", action="store_true", help="skip the two-process run")
    parser.add_argument("--multi-writers", type=int, default=128, help="writers per process")
    parser.add_argument("--multi-seconds", type=float, default=5.0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="then profile one PostgreSQL run at the largest writer count (cProfile)",
    )
    args = parser.parse_args()
    counts = [int(w) for w in args.writers.split(",")]

    server: PgServer | None = None
    pg_settings = None
    if args.only != "sqlite":
        try:
            server = PgServer()
            pg_settings = await server.settings()
        except (LookupError, OSError) as exc:
            print(f"postgresql skipped: {exc}")
            server = None
    for line in machine_facts(pg_settings):
        print(line)
    if pg_settings and pg_settings["synchronous_commit"] != "on":
        print(f"synchronous_commit is {pg_settings['synchronous_commit']}; need on")
        return 2
    print(
        f"{args.rounds} alternating rounds of {args.seconds:g} s (writer, then room), medians; "
        "room = bare driver executemany of the same rows into a same-shape table, batches of "
        "the writer's mean batch size, one transaction each, one connection"
    )
    print()
    print(HEADER, flush=True)
    rows: list[Row] = []
    if args.only in (None, "sqlite"):
        for writers in counts:
            rows.append(await sqlite_row(writers, args.seconds, args.rounds, args.max_batch))
            print(rows[-1].line(), flush=True)
    if server is not None:
        for writers in counts:
            rows.append(await pg_row(server, writers, args.seconds, args.rounds, args.max_batch))
            print(rows[-1].line(), flush=True)

    multi: MultiResult | None = None
    if server is not None and not args.no_multi:
        multi = await two_processes(server, args.multi_writers, args.multi_seconds)
        print()
        print(f"two processes x {args.multi_writers} writers on one PostgreSQL database:")
        for i, run in enumerate(multi.runs):
            print(
                f"  process {i + 1}: {run.rate:>8,.0f}/s, batch {run.mean_batch:.1f}, "
                f"commit {run.commit_ms:.2f} ms, last size seen {run.last_size}"
            )
        print(f"  together: {multi.rate:,.0f}/s")
        print(f"  tree: {multi.check.summary()}")

    print()
    print("targets:")
    failed = 0
    for row in rows:
        if row.check.problems:
            failed += 1
            print(f"  {row.store} at {row.writers} writers: tree {row.check.summary()}")
    top = max(counts)
    pg_top = next((r for r in rows if r.store == "postgresql" and r.writers == top), None)
    checks: list[tuple[str, float, float]] = []
    if pg_top is not None:
        checks.append((f"postgresql appends/s at {top} writers", pg_top.rate, TARGET_RATE))
    for row in rows:
        if row.store == "postgresql":
            checks.append((f"postgresql / room at {row.writers} writers", row.ratio, TARGET_RATIO))
    if multi is not None:
        checks.append(("two processes together, appends/s", multi.rate, TARGET_TWO_PROCESSES))
        checks.append(("two processes: one consistent tree", float(not multi.check.problems), 1))
    for label, value, target in checks:
        ok = value >= target
        failed += not ok
        print(f"  {label:<46} {value:>10,.2f}  (target >= {target:,g})  {verdict(ok)}")
    for row in rows:
        if row.store == "sqlite":
            print(
                f"  {f'sqlite / room at {row.writers} writers':<46} {row.ratio:>10,.2f}  (no target)"
            )
    print(f"  load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    if args.profile and server is not None:
        profiled = await pg_profile(server, top, args.seconds)
        print()
        print(
            f"profile (cProfile, in-process, slows the run) of postgresql at {top} writers: "
            f"{profiled.rate:,.0f}/s, batch {profiled.mean_batch:.1f}"
        )
        print(profiled.profile)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
