"""Proof latency on a 10-million-entry audit tree, receipt verification, export verification.

Builds (once; cached) a PostgreSQL database holding the stored tree of ``--size`` entries
without going through the writer: every entry is a real canonical JSON audit record (its
``seq`` and ``request_id`` vary), hashed to its RFC 9162 leaf by worker processes, which
also fold the level-8 subtree roots; the parent loads ``audit_tree`` with COPY
(asyncpg ``copy_records_to_table``), then inserts signed tree heads (C2SP checkpoints by a
fresh NoteLogSigner) at ``--heads`` sizes along the way and at the full size, and moves
``audit_log_head`` onto the last. A marker table names the build (entry scheme, size,
the log's verifier key); a later run with the same parameters reuses the database
(``--rebuild`` forces a new one).

Then it measures, with the product's own functions on a real connection as the runtime
role:

- ``audit.log.inclusion_proof`` for random indices at the full size, and
  ``audit.log.consistency_proof`` between random pairs of stored sizes (p50/p95/p99;
  target p95 <= 10 ms); every proof is verified against the signed roots;
- verifying one receipt in Python: ``audit.tlog.verify_inclusion_proof`` on an entry, its
  inclusion proof and the signed note at the full size (target p95 <= 1 ms);
- offline verification of a JSON Lines export (format v2: ``event`` lines with the entry,
  then the final ``checkpoint``) of ``--export-events`` synthetic events in a temporary
  file, with ``audit.verify.verify_export_lines`` (target >= 50,000 entries/s).

    source .pg-test-env
    .venv/bin/python bench/tree_proofs.py [--size 10000000] [--rebuild] [--samples 2000]
        [--warmup 200] [--heads 64] [--export-events 1000000] [--database kzg_bench_tree10m]
        [--no-export]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from benchlib import PgDatabase, PgServer, machine_facts, percentile, verdict

from audit.chain import canonical_json, record_for
from audit.events import AuditEvent, format_timestamp
from audit.log import consistency_proof, inclusion_proof, latest_tree_head
from audit.merkle import (
    CompactRange,
    fold,
    leaf_hash,
    perfect_nodes,
    verify_consistency,
    verify_inclusion,
)
from audit.models import TILE_HEIGHT
from audit.note import NoteVerifier
from audit.signing import NoteLogSigner
from audit.tlog import Checkpoint, TlogProof, open_checkpoint, verify_inclusion_proof
from gateway.db import make_engine, migrate
from migrations import AUDIT_TARGETS

ORIGIN = "bench.kzg-gateway.example/tree"
SCHEME = "bench-tree-v1"  # bump when the entries or the layout change: the cache is rebuilt
CHUNK = 1 << 16  # leaves per worker task (a multiple of 2^TILE_HEIGHT)
TARGET_PROOF_P95_MS = 10.0
TARGET_RECEIPT_P95_MS = 1.0
TARGET_EXPORT_RATE = 50_000
_TILE = 1 << TILE_HEIGHT
_MARKER = "bench_tree_marker"


def entry_format() -> str:
    """A str.format template whose ``{seq}`` gives the canonical JSON entry of record seq."""
    event = AuditEvent(
        request_id="@@RID@@",
        occurred_at=datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=UTC),
        actor="apikey:7f3a9c2e",
        role="client",
        action="verify_kzg_proof",
        outcome="success",
        http_status=200,
        client_addr="203.0.113.7",
        tls_version="TLSv1.3",
        method="POST",
        path="/v1/kzg/verify-proof",
        input_digests={
            "commitment": hashlib.sha256(b"commitment").hexdigest(),
            "proof": hashlib.sha256(b"proof").hexdigest(),
        },
        result_digest=hashlib.sha256(b"result").hexdigest(),
        latency_ms=0.412,
    )
    text = canonical_json(record_for(-4242, event.fields()))
    text = text.replace("{", "{{").replace("}", "}}")
    return text.replace('"seq":-4242', '"seq":{seq}').replace("@@RID@@", "bench-{seq:010d}")


def _check_format(fmt: str) -> None:
    """The template must give exactly what the product's canonical JSON gives."""
    for seq in (1, 77, 9_999_999):
        record = json.loads(fmt.format(seq=seq))
        if canonical_json(record) != fmt.format(seq=seq) or record["seq"] != seq:
            raise SystemExit("the entry template is not canonical JSON")


def _hash_chunk(task: tuple[int, int, str]) -> tuple[int, bytes, bytes]:
    """Leaf hashes of entries ``start + 1 .. end`` (leaf indices start..end-1) and the
    level-8 roots of the complete 256-leaf groups among them."""
    start, end, fmt = task
    sha = hashlib.sha256
    form = fmt.format
    leaves = [
        sha(b"\x00" + form(seq=seq).encode("utf-8")).digest() for seq in range(start + 1, end + 1)
    ]
    tiles = []
    for group in range(0, len(leaves) - _TILE + 1, _TILE):
        layer = leaves[group : group + _TILE]
        while len(layer) > 1:
            layer = [
                sha(b"\x01" + layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)
            ]
        tiles.append(layer[0])
    return start, b"".join(leaves), b"".join(tiles)


class Tree:
    """The built tree in memory: leaf hashes and level-8 roots, enough for any root."""

    def __init__(self, size: int, leaves: bytes, tiles: bytes) -> None:
        self.size = size
        self.leaves = leaves
        self.tiles = tiles

    def node(self, level: int, index: int) -> bytes:
        """The perfect subtree (level, index), folded from leaves or level-8 roots."""
        if level >= TILE_HEIGHT:
            span = level - TILE_HEIGHT
            source, first = self.tiles, index << span
        else:
            span = level
            source, first = self.leaves, index << span
        layer = [source[(first + i) * 32 : (first + i) * 32 + 32] for i in range(1 << span)]
        sha = hashlib.sha256
        while len(layer) > 1:
            layer = [
                sha(b"\x01" + layer[i] + layer[i + 1]).digest() for i in range(0, len(layer), 2)
            ]
        return layer[0]

    def edge(self, size: int) -> list[bytes]:
        return [self.node(level, index) for level, index in perfect_nodes(0, size)]

    def root(self, size: int) -> bytes:
        return fold(self.edge(size))


@dataclass(frozen=True)
class Built:
    size: int
    fmt: str
    verifier: NoteVerifier
    sizes: list[int]
    build_seconds: float
    built_at: str
    reused: bool


async def _read_marker(db: PgDatabase) -> dict[str, Any] | None:
    conn = await asyncpg.connect(**db.connect_kwargs(db.app))
    try:
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", _MARKER)
        if not exists:
            return None
        row = await conn.fetchrow(f"SELECT * FROM {_MARKER} LIMIT 1")
        return dict(row) if row is not None else None
    finally:
        await conn.close()


async def build(server: PgServer, name: str, size: int, heads: int, rebuild: bool) -> Built:
    """Reuse the cached tree database ``name`` if its marker matches, else build it."""
    fmt = entry_format()
    _check_format(fmt)
    if not rebuild and await server.exists(name):
        marker = await _read_marker(server.database(name))
        if (
            marker
            and marker["scheme"] == SCHEME
            and marker["size"] == size
            and marker["fmt"] == fmt
            and marker["heads"] == heads
        ):
            return Built(
                size,
                fmt,
                NoteVerifier.from_vkey(marker["vkey"]),
                list(marker["sizes"]),
                marker["build_seconds"],
                marker["built_at"],
                reused=True,
            )
        print(f"database {name} exists without a matching marker: rebuilding it")
    await server.drop(name)
    db = await server.create(name)
    await migrate(db.owner_url, db.app.user, target=AUDIT_TARGETS)
    started = time.perf_counter()
    conn = await asyncpg.connect(**db.connect_kwargs(db.owner))
    try:
        tree = await _load_tree(conn, size, fmt)
        loaded = time.perf_counter() - started
        print(f"  leaves hashed and audit_tree loaded in {loaded:.1f} s", flush=True)
        await conn.execute("ANALYZE audit_tree")
        signer = NoteLogSigner.generate(ORIGIN)
        rng = random.Random(20261127)
        sizes = sorted({*(rng.randrange(1, size) for _ in range(heads - 1)), size})
        await _store_heads(conn, tree, signer, sizes)
        seconds = time.perf_counter() - started
        built_at = datetime.now(UTC).isoformat(timespec="seconds")
        await conn.execute(
            f"CREATE TABLE {_MARKER} (scheme text, size bigint, heads int, fmt text, "
            "vkey text, sizes bigint[], build_seconds float8, built_at text)"
        )
        await conn.execute(f'GRANT SELECT ON {_MARKER} TO "{db.app.user}"')
        await conn.execute(
            f"INSERT INTO {_MARKER} VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            SCHEME, size, heads, fmt, signer.vkey, sizes, seconds, built_at,
        )  # fmt: skip
    finally:
        await conn.close()
    return Built(size, fmt, signer.signer.verifier(), sizes, seconds, built_at, reused=False)


async def _load_tree(conn: asyncpg.Connection, size: int, fmt: str) -> Tree:
    """Hash the leaves in worker processes and COPY each chunk as it arrives."""
    tasks = [(start, min(start + CHUNK, size), fmt) for start in range(0, size, CHUNK)]
    leaves: list[bytes] = []
    tiles: list[bytes] = []
    ctx = multiprocessing.get_context("spawn")
    workers = max(1, len(os.sched_getaffinity(0)))
    loop = asyncio.get_running_loop()
    with ctx.Pool(workers) as pool:
        results = pool.imap(_hash_chunk, tasks)
        while True:
            chunk = await loop.run_in_executor(None, next, results, None)
            if chunk is None:
                break
            start, chunk_leaves, chunk_tiles = chunk
            leaves.append(chunk_leaves)
            tiles.append(chunk_tiles)
            records = (
                (0, start + i, chunk_leaves[i * 32 : i * 32 + 32])
                for i in range(len(chunk_leaves) // 32)
            )
            await conn.copy_records_to_table(
                "audit_tree", records=records, columns=("level", "idx", "hash")
            )
            first_tile = start // _TILE
            await conn.copy_records_to_table(
                "audit_tree",
                records=(
                    (TILE_HEIGHT, first_tile + i, chunk_tiles[i * 32 : i * 32 + 32])
                    for i in range(len(chunk_tiles) // 32)
                ),
                columns=("level", "idx", "hash"),
            )
            done = start + len(chunk_leaves) // 32
            if done % (CHUNK * 32) == 0 or done == size:
                print(f"  {done:,} leaves stored", flush=True)
    tree = Tree(size, b"".join(leaves), b"".join(tiles))
    # Higher stored levels (16, 24, ...): every complete node of each.
    level = 2 * TILE_HEIGHT
    while (1 << level) <= size:
        rows = [(level, i, tree.node(level, i)) for i in range(size >> level)]
        await conn.copy_records_to_table(
            "audit_tree", records=rows, columns=("level", "idx", "hash")
        )
        level += TILE_HEIGHT
    return tree


async def _store_heads(
    conn: asyncpg.Connection, tree: Tree, signer: NoteLogSigner, sizes: list[int]
) -> None:
    """Signed tree heads at ``sizes`` (ascending), then the head row onto the last."""
    issued_at = format_timestamp(datetime.now(UTC))
    for size in sizes:
        root = tree.root(size)
        note = signer.sign_note(Checkpoint(ORIGIN, size, root).text())
        await conn.execute(
            "INSERT INTO audit_tree_heads (size, root, issued_at, key_id, note) "
            "VALUES ($1, $2, $3, $4, $5)",
            size, root, issued_at, signer.key_id, note,
        )  # fmt: skip
    last = sizes[-1]
    edge = tree.edge(last)
    await conn.execute(
        "UPDATE audit_log_head SET size = $1, root = $2, compact = $3 WHERE id = 1",
        last, fold(edge), b"".join(edge),
    )  # fmt: skip


# --------------------------------------------------------------------------- measurements


@dataclass
class Figure:
    label: str
    latencies_ms: list[float]
    target_ms: float | None

    def line(self) -> str:
        ordered = sorted(self.latencies_ms)
        p50, p95, p99 = (percentile(ordered, p) for p in (50, 95, 99))
        if self.target_ms is None:
            target = ""
        else:
            target = f"p95 <= {self.target_ms:g} ms  {verdict(p95 <= self.target_ms)}"
        return (
            f"  {self.label:<40} {len(ordered):>6} {p50:>8.3f} {p95:>8.3f} {p99:>8.3f} "
            f"{ordered[-1]:>8.2f}  {target}"
        )

    @property
    def ok(self) -> bool:
        p95 = percentile(sorted(self.latencies_ms), 95)
        return self.target_ms is None or p95 <= self.target_ms


async def measure_proofs(
    db: PgDatabase, built: Built, samples: int, warmup: int
) -> tuple[Figure, Figure, Figure, int]:
    """Inclusion and consistency proof latencies through audit.log on one connection as the
    runtime role, every proof verified; then receipt verification of the inclusion proofs."""
    rng = random.Random()
    engine = make_engine(db.app_url)
    size = built.size
    fmt = built.fmt
    inclusion_ms: list[float] = []
    consistency_ms: list[float] = []
    receipts: list[tuple[bytes, str]] = []
    bad = 0
    try:
        async with engine.connect() as conn:
            latest = await latest_tree_head(conn)
            assert latest is not None and latest.size == size
            checkpoint = open_checkpoint(latest.note, [built.verifier], ORIGIN)
            result = await conn.exec_driver_sql("SELECT size, note FROM audit_tree_heads")
            notes = {int(stored): str(note) for stored, note in result.all()}
            roots = {
                s: open_checkpoint(note, [built.verifier], ORIGIN).root for s, note in notes.items()
            }
            # Warm the connection's statement caches and the upper levels' pages (a server
            # just restarted has empty shared buffers); not counted.
            for _ in range(warmup):
                await inclusion_proof(conn, rng.randrange(size), size)
            for _ in range(samples):
                index = rng.randrange(size)
                began = time.perf_counter()
                proof = await inclusion_proof(conn, index, size)
                inclusion_ms.append((time.perf_counter() - began) * 1000)
                entry = fmt.format(seq=index + 1).encode("utf-8")
                if not verify_inclusion(leaf_hash(entry), index, size, proof, checkpoint.root):
                    bad += 1
                receipts.append((entry, TlogProof(index, tuple(proof), latest.note).text()))
            stored = sorted(roots)
            for _ in range(samples):
                old, new = sorted(rng.sample(stored, 2))
                began = time.perf_counter()
                proof = await consistency_proof(conn, old, new)
                consistency_ms.append((time.perf_counter() - began) * 1000)
                if not verify_consistency(old, new, roots[old], roots[new], proof):
                    bad += 1
    finally:
        await engine.dispose()
    receipt_ms: list[float] = []
    verifiers = [built.verifier]
    for entry, text in receipts[:50]:  # warm
        verify_inclusion_proof(entry, text, verifiers, ORIGIN)
    for entry, text in receipts:
        began = time.perf_counter()
        verify_inclusion_proof(entry, text, verifiers, ORIGIN)
        receipt_ms.append((time.perf_counter() - began) * 1000)
    return (
        Figure(f"inclusion proof at size {size:,}", inclusion_ms, TARGET_PROOF_P95_MS),
        Figure(
            f"consistency proof, {len(built.sizes)} stored sizes",
            consistency_ms,
            TARGET_PROOF_P95_MS,
        ),
        Figure(f"receipt verification at size {size:,}", receipt_ms, TARGET_RECEIPT_P95_MS),
        bad,
    )


# --------------------------------------------------------------------- export verification


def _export_lines(count: int, fmt: str, signer: NoteLogSigner) -> Iterator[str]:
    """A format 2 export of ``count`` synthetic events (see audit.export): the header, the
    log key, one ``event`` line per entry, then the signed checkpoint over them."""
    from audit.verify import EXPORT_FORMAT, EXPORT_VERSION

    now = format_timestamp(datetime.now(UTC))
    yield canonical_json(
        {"type": "header", "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
         "exported_at": now, "origin": ORIGIN}
    ) + "\n"  # fmt: skip
    yield canonical_json(
        {"type": "log_key", "key_id": signer.key_id, "vkey": signer.vkey, "status": "current",
         "not_before": now, "not_after": None}
    ) + "\n"  # fmt: skip
    compact = CompactRange()
    sha = hashlib.sha256
    for seq in range(1, count + 1):
        entry = fmt.format(seq=seq)
        compact.append(sha(b"\x00" + entry.encode("utf-8")).digest())
        yield canonical_json({"type": "event", "seq": seq, "entry": entry}) + "\n"
    note = signer.sign_note(Checkpoint(ORIGIN, count, compact.root()).text())
    yield canonical_json({"type": "checkpoint", "size": count, "note": note}) + "\n"


def measure_export(count: int, fmt: str) -> tuple[str, bool]:
    """Time audit.verify.verify_export_lines (the log key pinned) over a generated export
    read from a temporary file; a status line and whether it met the target."""
    try:
        from audit.verify import verify_export_lines
    except ImportError as exc:
        return f"  export verification: SKIPPED, audit.verify is not ready ({exc!r})", True
    signer = NoteLogSigner.generate(ORIGIN)
    with tempfile.TemporaryDirectory(prefix="kzg-export-bench-") as tmp:
        path = Path(tmp) / "audit.jsonl"
        began = time.perf_counter()
        with path.open("w", encoding="utf-8") as out:
            out.writelines(_export_lines(count, fmt, signer))
        written = time.perf_counter() - began
        mb = path.stat().st_size / 1e6
        with path.open(encoding="utf-8") as lines:
            began = time.perf_counter()
            report = verify_export_lines(lines, trusted_log_keys=[signer.vkey])
            elapsed = time.perf_counter() - began
    rate = count / elapsed
    ok = rate >= TARGET_EXPORT_RATE and report.valid and report.checked == count
    line = (
        f"  export verification (format 2, {mb:,.0f} MB file, written in {written:.1f} s): "
        f"{report.checked:,} entries in {elapsed:.2f} s = {rate:,.0f} entries/s, "
        f"valid {report.valid}  (target >= {TARGET_EXPORT_RATE:,}/s)  {verdict(ok)}"
    )
    if not report.valid:
        line += f"\n    reason: {report.reason}"
    return line, ok


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--heads", type=int, default=64, help="signed tree heads stored")
    parser.add_argument("--samples", type=int, default=2000, help="proofs of each kind")
    parser.add_argument("--warmup", type=int, default=200, help="proofs first, not counted")
    parser.add_argument("--export-events", type=int, default=1_000_000)
    parser.add_argument("--database", default="kzg_bench_tree10m")
    parser.add_argument("--rebuild", action="store_true", help="drop the cached tree database")
    parser.add_argument("--no-export", action="store_true")
    args = parser.parse_args()
    if args.size < 2 or args.heads < 2:
        parser.error("--size and --heads must be at least 2")

    server = PgServer()
    for line in machine_facts(await server.settings()):
        print(line)
    print(f"tree database {args.database}: ", end="", flush=True)
    built = await build(server, args.database, args.size, args.heads, args.rebuild)
    state = "reused (cached)" if built.reused else "built now"
    print(
        f"{state}: {built.size:,} entries, {len(built.sizes)} signed tree heads, "
        f"built at {built.built_at} in {built.build_seconds:.1f} s"
    )
    db = server.database(args.database)
    inclusion, consistency, receipt, bad = await measure_proofs(
        db, built, args.samples, args.warmup
    )
    print()
    print(
        f"  {'measure':<40} {'n':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8}  target"
    )
    figures = (inclusion, consistency, receipt)
    for figure in figures:
        print(figure.line())
    print(f"  proofs that failed to verify: {bad}")
    failed = bad + sum(not f.ok for f in figures)
    if not args.no_export:
        line, ok = measure_export(args.export_events, built.fmt)
        print(line)
        failed += not ok
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
