"""Offline verification of the audit log, from a database or a JSON Lines export.

Needs nothing of the server. The log is an RFC 9162 Merkle tree whose leaves are the
entries (the canonical JSON of each record, leaf index ``seq - 1``) and whose heads are
C2SP signed checkpoints by the log key (Ed25519 signed notes). Three methods:

- ``full`` (the default): start from the newest retention anchor (its signed note and
  the compact range of the pruned prefix), or from the empty tree; recompute every
  retained entry's leaf hash, in the database compare it with the stored leaf hash (and
  every stored subtree root with the recomputed one), and compare the recomputed root at
  every stored tree head size. The signature of the latest tree head is checked, and the
  walk must end exactly at its size (and at the head row in a database). The first bad
  seq is named: a record that is missing or differs from its stored leaf hash, or else
  the first record after the last tree head whose root still matched.
- ``consistency`` (a held checkpoint given, database only): an RFC 9162 consistency proof
  from the stored tree shows that the latest signed tree head extends the held one, in
  O(log n) reads. For an export, the held root is checked when the walk reaches its size.
- ``sample`` (K given, database only): K random retained entries are rebuilt from their
  rows and proven by inclusion proofs against the latest signed root.

Records up to ``audit_legacy_chain.through_seq`` also belong to the first release's hash
chain; its BLS checkpoints and head are checked during a full walk, when retention has
not pruned any of it (else the report says the legacy chain was not checkable).
Retention anchors must be signed by a log key and state exactly their columns; told a
retention floor, the verifier also refuses anchors that pruned records younger than it.

Where the keys came from is part of the report (``keys_source``): keys pinned by the
caller prove the signatures; keys read from the database or export being verified prove
only that whoever controls that source signed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.chain import GENESIS_HASH
from audit.checkpoints import legacy_checkpoints
from audit.events import format_timestamp, parse_timestamp
from audit.log import (
    ProofUnavailable,
    TreeHead,
    consistency_proof,
    inclusion_proof,
    latest_tree_head,
    read_head,
    read_nodes,
    tree_head_at,
)
from audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    fold,
    leaf_hash,
    root_nodes,
    verify_consistency,
    verify_inclusion,
)
from audit.models import (
    TILE_HEIGHT,
    StoredRow,
    audit_anchors,
    audit_events,
    audit_legacy_chain,
    audit_tree,
    audit_tree_heads,
    entry_from_row,
)
from audit.note import NoteError, NoteVerifier, b64decode_strict, open_note
from audit.signing import anchor_text, bls_signature_valid, key_bytes, legacy_checkpoint_message
from audit.tlog import Checkpoint, parse_checkpoint

# pinned: handed in by the caller; database / export: read from the source being verified.
KeysSource = Literal["pinned", "database", "export"]
Method = Literal["full", "consistency", "sample"]

# The export format this verifier reads (written by audit.export).
EXPORT_FORMAT = "kzg-gateway-audit-export"
EXPORT_VERSION = 2

_PAGE = 5000  # records read per query of a database walk
_ANCHOR_COLUMNS = (
    "through_seq",
    "tree_size",
    "pruned",
    "newest_occurred_at",
    "issued_at",
    "compact",
    "key_id",
    "note",
)
_sha256 = hashlib.sha256


@dataclass
class VerifyReport:
    """What a verification found. ``head`` is where it ended: the recomputed tree in a
    full walk, the latest signed tree head otherwise; ``tree_size`` is the size of the
    latest signed tree head the source holds. ``checked`` counts the entries verified
    (recomputed in a full walk, proven by inclusion when sampling; in a full walk never
    past the first bad seq); ``checkpoints`` the signed tree heads compared with the
    entries; ``signatures`` the signatures that verified (log checkpoints, anchors, legacy
    BLS checkpoints): 0 means no key was put to the test, whatever the keys given. ``legacy`` describes the first
    release's hash chain, None when the log has none."""

    valid: bool
    checked: int
    head_size: int
    head_root: bytes
    first_bad_seq: int | None
    reason: str | None
    checkpoints: int = 0
    anchors: int = 0
    keys_source: KeysSource = "pinned"
    retention_floor: str | None = None
    tree_size: int = 0
    legacy: dict[str, Any] | None = None
    method: Method = "full"
    sampled: int = 0
    signatures: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "checked": self.checked,
            "head": {"size": self.head_size, "root": _b64(self.head_root)},
            "tree_size": self.tree_size,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "checkpoints": self.checkpoints,
            "anchors": self.anchors,
            "keys_source": self.keys_source,
            "retention_floor": self.retention_floor,
            "legacy": self.legacy,
            "method": self.method,
            "sampled": self.sampled,
            "signatures": self.signatures,
        }


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


@dataclass
class _Problems:
    """Every problem found, each at a seq when one can be named; the report names the
    lowest seq (problems without one come last)."""

    found: list[tuple[int | None, str]] = field(default_factory=list)
    signatures: int = 0  # signatures that verified, whatever else was found

    def add(self, seq: int | None, reason: str) -> None:
        self.found.append((seq, reason))

    def first(self) -> tuple[int | None, str | None]:
        if not self.found:
            return None, None
        numbered = [(seq, why) for seq, why in self.found if seq is not None]
        return min(numbered, key=lambda p: p[0]) if numbered else self.found[0]


@dataclass(frozen=True)
class _LogKeys:
    """The log keys a verification uses, and when each retired one stopped signing
    (``not_after`` by verifier key, as the source states it: a bound only ever refuses
    more, so it applies to pinned keys too)."""

    verifiers: list[NoteVerifier]
    retired: Mapping[str, str] = field(default_factory=dict)

    def open(
        self, note: str, issued_at: Any = None, *, timed: bool = True
    ) -> tuple[str, list[NoteVerifier]]:
        """``open_note``, then (``timed``) a signer must not have been retired before
        ``issued_at``: a retired key's signature on something issued later, or on
        something that states no time, proves nothing. Raises NoteError."""
        if not self.verifiers:
            raise NoteError("no log key to verify it with")
        text_, signers = open_note(note, self.verifiers)
        if timed and self.retired:
            timely = isinstance(issued_at, str)
            live = [
                s
                for s in signers
                if s.vkey not in self.retired
                or (timely and issued_at <= _grace(self.retired[s.vkey]))
            ]
            if not live:
                bound = min(self.retired[s.vkey] for s in signers)
                stated = f"issued at {issued_at}" if timely else "stating no issue time"
                raise NoteError(f"signed by a log key retired at {bound}, {stated}")
        return text_, signers


# An instance picks up a log key rotated by another within [server]
# log_key_refresh_seconds (30 by default) and may sign with the old key until then: a
# retired key's signature counts until this long after its not_after.
RETIRED_KEY_GRACE = timedelta(seconds=60)


def _grace(not_after: str) -> str:
    """The last issue time a key retired at ``not_after`` may have signed at."""
    try:
        return format_timestamp(parse_timestamp(not_after) + RETIRED_KEY_GRACE)
    except ValueError:
        return not_after


def _verifiers(
    vkeys: Iterable[str], problems: _Problems | None, retired: Mapping[str, str] | None = None
) -> _LogKeys:
    """Parse verifier keys; a bad pinned key raises, a bad key of the source is a problem.
    ``retired``: the source's ``not_after`` by verifier key."""
    out: dict[NoteVerifier, None] = {}
    for vkey in vkeys:
        try:
            out[NoteVerifier.from_vkey(vkey)] = None
        except NoteError as exc:
            if problems is None:
                raise ValueError(f"log key {vkey!r}: {exc}") from None
            problems.add(None, f"the source holds a log key that is not a verifier key: {exc}")
    verifiers = list(out)
    known = {v.vkey for v in verifiers}
    bounds = {vkey: when for vkey, when in (retired or {}).items() if vkey in known}
    return _LogKeys(verifiers, bounds)


def _open_checkpoint(
    note: str, keys: _LogKeys, issued_at: Any = None, *, timed: bool = True
) -> Checkpoint:
    """Verify a signed checkpoint with the log keys; its origin must be the name of a key
    that signed it (one not retired before ``issued_at`` when ``timed``). Raises NoteError."""
    text_, signers = keys.open(note, issued_at, timed=timed)
    checkpoint = parse_checkpoint(text_)
    if checkpoint.origin not in {v.name for v in signers}:
        raise NoteError(
            f"checkpoint origin {checkpoint.origin!r} is not the name of the key that signed it"
        )
    return checkpoint


def _check_tree_head(
    note: Any, size: int, root: bytes, keys: _LogKeys, problems: _Problems, issued_at: Any
) -> bool:
    """The signed note of the tree head (size, root) must verify, by a key not retired
    before ``issued_at``, and state exactly them."""
    try:
        if not isinstance(note, str):
            raise NoteError("no signed note")
        checkpoint = _open_checkpoint(note, keys, issued_at)
    except NoteError as exc:
        problems.add(size or None, f"the signed tree head at size {size} does not verify: {exc}")
        return False
    problems.signatures += 1
    if (checkpoint.size, checkpoint.root) != (size, root):
        problems.add(
            size or None,
            f"the signed tree head at size {size} signs size {checkpoint.size} and another root",
        )
        return False
    return True


def _floor(retention_floor: datetime | None) -> str | None:
    return format_timestamp(retention_floor) if retention_floor is not None else None


def _parse_compact(through_seq: int, compact: Any) -> CompactRange:
    if not isinstance(compact, str):
        raise ValueError("no compact range")
    parts = compact.split(" ") if compact else []
    hashes = [b64decode_strict(part, "compact range hash") for part in parts]
    return CompactRange(through_seq, hashes)


def _check_anchors(
    anchors: Sequence[Mapping[str, Any]],
    keys: _LogKeys,
    floor: str | None,
    problems: _Problems,
) -> CompactRange | None:
    """Check every retention anchor (oldest first); return the compact range the retained
    log starts from (the empty tree without anchors), None when it cannot be read."""
    previous = 0
    start: CompactRange | None = CompactRange()
    for anchor in anchors:
        try:
            values = {name: anchor[name] for name in _ANCHOR_COLUMNS}
            through = values["through_seq"]
            if not isinstance(through, int) or not isinstance(values["tree_size"], int):
                raise TypeError("through_seq and tree_size must be integers")
        except (KeyError, TypeError) as exc:
            problems.add(previous + 1, f"a retention anchor cannot be read: {exc}")
            return None
        seq = through + 1
        expected = anchor_text(
            through,
            values["tree_size"],
            values["pruned"],
            values["newest_occurred_at"],
            values["issued_at"],
            values["compact"],
        )
        try:
            # issued_at is part of the signed statement: a retired key cannot backdate.
            signed, _ = keys.open(str(values["note"]), values["issued_at"])
            problems.signatures += 1
            if signed != expected:
                raise NoteError("its signed statement differs from its columns")
        except NoteError as exc:
            problems.add(seq, f"the retention anchor through seq {through} does not verify: {exc}")
        if values["pruned"] != through - previous:
            problems.add(
                seq, f"the retention anchor through seq {through} miscounts what it pruned"
            )
        if values["tree_size"] < through:
            problems.add(
                seq, f"the retention anchor through seq {through} has no tree head over it"
            )
        newest = values["newest_occurred_at"]
        if floor is not None and (not isinstance(newest, str) or newest >= floor):
            problems.add(
                seq,
                f"the retention anchor through seq {through} pruned records from {newest}, "
                f"younger than the retention floor {floor}",
            )
        try:
            start = _parse_compact(through, values["compact"])
        except ValueError as exc:
            problems.add(
                seq, f"the retention anchor through seq {through}: bad compact range: {exc}"
            )
            start = None
        previous = through
    return start


class _Legacy:
    """The first release's hash chain over seq 1..through_seq, its BLS checkpoints and
    head: fed the entries during a full walk that starts at seq 1."""

    def __init__(
        self,
        through_seq: int,
        head_hash: str,
        checkpoints: Sequence[Mapping[str, Any]],
        keys: Mapping[str, bytes],
        keys_source: KeysSource,
        problems: _Problems,
    ) -> None:
        self.through = through_seq
        self.checkpoints = checkpoints
        self.keys = keys
        self.keys_source = keys_source
        self.problems = problems
        self.active = False
        self.hash = bytes.fromhex(GENESIS_HASH)
        self.good = 0
        self.failed = False
        self.targets: dict[int, list[tuple[str, str]]] = {}
        if through_seq > 0:
            self.targets.setdefault(through_seq, []).append((str(head_hash), "legacy chain head"))

    def start(self) -> None:
        """The walk starts at seq 1: check the checkpoints' signatures, then the chain."""
        self.active = True
        for cp in self.checkpoints:
            try:
                seq, head, issued_at = int(cp["seq"]), str(cp["hash"]), str(cp["issued_at"])
                key_id, message, signature = cp["key_id"], cp["message"], cp["signature"]
            except (KeyError, TypeError, ValueError):
                self.problems.add(None, "a legacy checkpoint cannot be read")
                continue
            if message != legacy_checkpoint_message(seq, head, issued_at) or not (
                bls_signature_valid(self.keys, str(key_id), str(message), str(signature))
            ):
                self.problems.add(seq, f"the legacy BLS checkpoint at seq {seq} does not verify")
            else:
                self.problems.signatures += 1
            if seq > self.through:
                self.problems.add(
                    seq, f"a legacy checkpoint at seq {seq} lies beyond the legacy chain"
                )
            self.targets.setdefault(seq, []).append((head, f"legacy BLS checkpoint at seq {seq}"))

    def feed(self, seq: int, data: bytes) -> None:
        self.hash = _sha256(self.hash + data).digest()
        targets = self.targets.get(seq)
        if targets is None or self.failed:
            return
        value = self.hash.hex()
        for expected, what in targets:
            if expected != value:
                # The chain diverged: every later checkpoint would differ as well.
                self.failed = True
                self.problems.add(
                    self.good + 1,
                    f"records {self.good + 1} through {seq} do not hash to the {what}",
                )
                return
        self.good = seq

    def report(self, walked_to: int) -> dict[str, Any]:
        checked = self.active and walked_to >= self.through
        out: dict[str, Any] = {
            "through_seq": self.through,
            "checked": checked,
            "checkpoints": len(self.checkpoints),
            "keys_source": self.keys_source,
        }
        if not self.active:
            out["reason"] = "retention pruned records of the legacy chain"
        return out


class _Walk:
    """A full walk over the retained entries, from a start compact range: appends each
    entry's leaf, compares the root wherever a tree head is expected, feeds the legacy
    chain, and stops at the first break."""

    def __init__(
        self,
        start: CompactRange,
        problems: _Problems,
        legacy: _Legacy | None,
        keep_nodes: bool = False,
    ) -> None:
        self.start = start.size
        self.size = start.size
        self.hashes = list(start.hashes)
        self.good = start.size  # the last size proven against a root (or the anchor)
        self.problems = problems
        self.legacy = legacy if legacy is not None and legacy.active else None
        self.legacy_through = self.legacy.through if self.legacy is not None else 0
        self.broken: int | None = None
        self.expected: dict[int, list[tuple[bytes, str]]] = {}
        self.matched = 0
        self.keep_nodes = keep_nodes
        self.nodes: list[tuple[int, int, bytes]] = []

    def root(self) -> bytes:
        return fold(self.hashes)

    def expect(self, size: int, root: bytes, what: str) -> None:
        """Compare the root when the walk reaches ``size`` (now, if it is there)."""
        if size == self.size:
            self._compare(root, what)
        elif size > self.size:
            self.expected.setdefault(size, []).append((root, what))

    def _compare(self, root: bytes, what: str) -> None:
        if self.broken is not None:
            return
        if self.root() == root:
            self.good = self.size
            self.matched += 1
            return
        first = self.good + 1 if self.good < self.size else self.size
        self.fail(first, f"the entries from seq {first} through {self.size} do not lead to {what}")

    def fail(self, seq: int, reason: str) -> None:
        if self.broken is None:
            self.broken = seq
            self.problems.add(seq, reason)

    def append(self, seq: object, data: bytes) -> None:
        """Add the entry ``data`` of record ``seq`` (the next one, or the walk breaks: an
        export line's seq may be anything)."""
        if self.broken is not None:
            return
        size = self.size
        if seq != size + 1 or type(seq) is not int:
            if type(seq) is not int:
                self.fail(size + 1, f"the record after {size} has no integer seq")
            elif seq > size + 1:
                self.fail(size + 1, f"record {size + 1} is missing (the next one is {seq})")
            else:
                self.fail(seq, f"record {seq} appears again after record {size}")
            return
        if seq <= self.legacy_through:
            # legacy_through is 0 when legacy is None, which mypy cannot relate.
            self.legacy.feed(seq, data)  # type: ignore[union-attr]
        hashes = self.hashes
        h = _sha256(b"\x00" + data).digest()
        index = size
        level = 0
        while index & 1:
            h = _sha256(b"\x01" + hashes.pop() + h).digest()
            index >>= 1
            level += 1
            if self.keep_nodes and level % TILE_HEIGHT == 0:
                self.nodes.append((level, index, h))
        hashes.append(h)
        self.size = seq
        if seq in self.expected:
            for root, what in self.expected.pop(seq):
                self._compare(root, what)

    @property
    def walked(self) -> int:
        """The size up to which the entries were walked without a break."""
        return self.broken - 1 if self.broken is not None else self.size

    def checked(self, signed: int) -> int:
        """The entries verified: walked without a break and under the signed size."""
        return max(0, min(self.walked, signed) - self.start)


def _finish(
    problems: _Problems,
    *,
    checked: int,
    head_size: int,
    head_root: bytes,
    checkpoints: int,
    anchors: int,
    keys_source: KeysSource,
    floor: str | None,
    tree_size: int,
    legacy: dict[str, Any] | None,
    method: Method,
    sampled: int = 0,
    start: int = 0,
) -> VerifyReport:
    first, reason = problems.first()
    if method == "full" and first is not None:
        # Entries at or past the first bad seq are not "verified before it", even when
        # the walk went on (a damaged stored subtree, a bad signature at the end).
        checked = min(checked, max(0, first - 1 - start))
    return VerifyReport(
        valid=not problems.found,
        checked=checked,
        head_size=head_size,
        head_root=head_root,
        first_bad_seq=first,
        reason=reason,
        checkpoints=checkpoints,
        anchors=anchors,
        keys_source=keys_source,
        retention_floor=floor,
        tree_size=tree_size,
        legacy=legacy,
        method=method,
        sampled=sampled,
        signatures=problems.signatures,
    )


# -- database ----------------------------------------------------------------------------


async def _has_table(conn: AsyncConnection, name: str) -> bool:
    return await conn.run_sync(lambda sync: inspect(sync).has_table(name))


async def load_public_keys(conn: AsyncConnection) -> dict[str, bytes]:
    """Return the legacy BLS receipt public keys by key id from ``receipt_keys``, if any
    (they verify the first release's checkpoints)."""
    if not await _has_table(conn, "receipt_keys"):
        return {}
    rows = await conn.execute(text("SELECT key_id, public_key FROM receipt_keys"))
    return {str(row.key_id): key_bytes(row.public_key) for row in rows}


async def log_key_rows(conn: AsyncConnection) -> list[dict[str, Any]]:
    """The gateway's ``log_keys`` rows without their private part, current and retired,
    oldest first; none when the table is absent."""
    if not await _has_table(conn, "log_keys"):
        return []
    rows = await conn.execute(
        text(
            "SELECT key_id, vkey, status, not_before, not_after FROM log_keys "
            "ORDER BY not_before, key_id"
        )
    )
    return [dict(row._mapping) for row in rows]


async def load_log_keys(conn: AsyncConnection) -> list[str]:
    """Return the log's verifier keys (C2SP vkeys), current and retired, oldest first."""
    return [str(row["vkey"]) for row in await log_key_rows(conn)]


async def begin_snapshot(conn: AsyncConnection) -> None:
    """Begin a read-only transaction that sees one consistent state of the log."""
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
    else:
        await conn.exec_driver_sql("BEGIN")


async def _anchor_rows(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = await conn.execute(select(audit_anchors).order_by(audit_anchors.c.through_seq))
    return [dict(row._mapping) for row in rows]


async def _legacy_row(conn: AsyncConnection) -> tuple[int, str]:
    row = (await conn.execute(select(audit_legacy_chain))).first()
    return (int(row.through_seq), str(row.hash)) if row is not None else (0, GENESIS_HASH)


def _entry(row: StoredRow) -> bytes:
    return entry_from_row(row).encode("utf-8")


@dataclass
class _DbContext:
    conn: AsyncConnection
    keys: _LogKeys
    keys_source: KeysSource
    floor: str | None
    problems: _Problems
    anchors: list[dict[str, Any]]
    start: CompactRange | None
    latest: TreeHead | None


async def _check_stored_anchor(ctx: _DbContext) -> None:
    """The newest anchor's compact range must be the stored tree's at its through_seq."""
    if ctx.start is None or not ctx.anchors or ctx.start.size == 0:
        return
    nodes = root_nodes(ctx.start.size)
    try:
        found = await read_nodes(ctx.conn, nodes)
    except LookupError as exc:
        ctx.problems.add(ctx.start.size + 1, f"the stored tree is damaged: {exc}")
        return
    if [found[node] for node in nodes] != ctx.start.hashes:
        ctx.problems.add(
            ctx.start.size + 1,
            f"the retention anchor through seq {ctx.start.size} does not match the stored tree",
        )


async def _check_latest(ctx: _DbContext) -> bool:
    """The latest tree head is signed, and the head row stands on it; True when there is
    a latest tree head and its signature verified."""
    head = await read_head(ctx.conn)
    latest = ctx.latest
    if latest is None:
        if head.size:
            ctx.problems.add(1, f"no signed tree head covers the {head.size} records of the log")
        return False
    signed = _check_tree_head(
        latest.note, latest.size, latest.root, ctx.keys, ctx.problems, latest.issued_at
    )
    if (head.size, head.root) != (latest.size, latest.root):
        ctx.problems.add(
            min(head.size, latest.size) + 1,
            f"the log head (size {head.size}) is not the latest signed tree head "
            f"(size {latest.size})",
        )
    return signed


async def _check_stored_nodes(
    conn: AsyncConnection, nodes: list[tuple[int, int, bytes]], walk: _Walk
) -> None:
    """Every subtree root the walk completed at a stored level must be the stored one."""
    by_level: dict[int, dict[int, bytes]] = {}
    for level, index, value in nodes:
        by_level.setdefault(level, {})[index] = value
    for level, expected in by_level.items():
        rows = await conn.execute(
            select(audit_tree.c.idx, audit_tree.c.hash).where(
                audit_tree.c.level == level,
                audit_tree.c.idx.between(min(expected), max(expected)),
            )
        )
        stored = {int(idx): bytes(value) for idx, value in rows}
        for index in sorted(expected):
            if stored.get(index) != expected[index]:
                walk.problems.add(
                    (index << level) + 1,
                    f"the stored tree hash at level {level}, index {index} (records "
                    f"{(index << level) + 1} through {(index + 1) << level}) does not match "
                    "the records: proofs served from it would fail",
                )
                return


async def _walk_database(ctx: _DbContext, legacy: _Legacy | None) -> _Walk:
    conn = ctx.conn
    assert ctx.start is not None
    walk = _Walk(ctx.start, ctx.problems, legacy, keep_nodes=True)
    at_start = await tree_head_at(conn, walk.size) if walk.size else None
    if at_start is not None:
        walk.expect(at_start.size, at_start.root, f"the signed tree head at size {walk.size}")
    last = walk.size
    while walk.broken is None:
        rows = (
            (
                await conn.execute(
                    select(audit_events)
                    .where(audit_events.c.seq > last)
                    .order_by(audit_events.c.seq)
                    .limit(_PAGE)
                )
            )
            .mappings()
            .all()
        )
        if not rows:
            break
        first_seq, last_seq = rows[0]["seq"], rows[-1]["seq"]
        leaves = {
            int(idx): bytes(value)
            for idx, value in await conn.execute(
                select(audit_tree.c.idx, audit_tree.c.hash).where(
                    audit_tree.c.level == 0,
                    audit_tree.c.idx.between(first_seq - 1, last_seq - 1),
                )
            )
        }
        heads = await conn.execute(
            select(audit_tree_heads.c.size, audit_tree_heads.c.root)
            .where(audit_tree_heads.c.size > last, audit_tree_heads.c.size <= last_seq)
            .order_by(audit_tree_heads.c.size)
        )
        for size, root in heads:
            walk.expect(int(size), bytes(root), f"the signed tree head at size {size}")
        for row in rows:
            seq = row["seq"]
            data = _entry(row)
            if seq == walk.size + 1 and leaves.get(seq - 1) != leaf_hash(data):
                walk.fail(
                    seq,
                    f"record {seq} does not match its leaf hash in the tree"
                    if seq - 1 in leaves
                    else f"record {seq} has no leaf in the tree",
                )
            walk.append(seq, data)
            if walk.broken is not None:
                break
        if walk.nodes:
            await _check_stored_nodes(conn, walk.nodes, walk)
            walk.nodes.clear()
        last = last_seq
    return walk


async def _full(ctx: _DbContext, legacy_keys: Mapping[str, bytes] | None) -> VerifyReport:
    conn = ctx.conn
    through, head_hash = await _legacy_row(conn)
    cps = [cp.to_dict() for cp in await legacy_checkpoints(conn)]
    legacy: _Legacy | None = None
    if through or cps:
        keys = dict(legacy_keys) if legacy_keys is not None else await load_public_keys(conn)
        source: KeysSource = "pinned" if legacy_keys is not None else "database"
        legacy = _Legacy(through, head_hash, cps, keys, source, ctx.problems)
        if ctx.start is not None and ctx.start.size == 0:
            legacy.start()
    latest = ctx.latest
    if ctx.start is None:  # the newest anchor cannot be read: nowhere to start from
        return _finish(
            ctx.problems,
            checked=0,
            head_size=0,
            head_root=EMPTY_ROOT,
            checkpoints=0,
            anchors=len(ctx.anchors),
            keys_source=ctx.keys_source,
            floor=ctx.floor,
            tree_size=latest.size if latest is not None else 0,
            legacy=legacy.report(0) if legacy else None,
            method="full",
        )
    walk = await _walk_database(ctx, legacy)
    if walk.broken is None:
        signed = latest.size if latest is not None else 0
        if walk.size < signed:
            ctx.problems.add(
                walk.size + 1,
                f"records {walk.size + 1} through {signed} are missing "
                f"(the signed tree head at size {signed} covers them)",
            )
        elif walk.size > signed:
            ctx.problems.add(
                signed + 1,
                f"records {signed + 1} through {walk.size} lie beyond the latest signed tree head",
            )
    return _finish(
        ctx.problems,
        checked=walk.checked(latest.size if latest is not None else 0),
        head_size=walk.size,
        head_root=walk.root(),
        checkpoints=walk.matched,
        anchors=len(ctx.anchors),
        keys_source=ctx.keys_source,
        floor=ctx.floor,
        tree_size=latest.size if latest is not None else 0,
        legacy=legacy.report(walk.walked) if legacy else None,
        method="full",
        start=walk.start,
    )


async def _consistency(ctx: _DbContext, held: Checkpoint) -> int:
    """Prove that the latest signed tree head extends ``held``; return 1 when it did."""
    latest = ctx.latest
    problems = ctx.problems
    if latest is None:
        problems.add(None, "the log has no signed tree head to extend the held checkpoint")
        return 0
    if held.size > latest.size:
        problems.add(
            held.size,
            f"the held checkpoint (size {held.size}) is ahead of the log's latest signed tree "
            f"head (size {latest.size}): the log was rolled back or forked",
        )
        return 0
    if held.size == 0:
        if held.root != EMPTY_ROOT:
            problems.add(
                None, "the held checkpoint of size 0 has a root other than the empty tree's"
            )
            return 0
        return 1
    stored = await tree_head_at(ctx.conn, held.size)
    if stored is not None and stored.root != held.root:
        problems.add(
            held.size,
            f"the log's signed tree head at size {held.size} has another root than the held "
            "checkpoint: a fork",
        )
        return 0
    try:
        proof = await consistency_proof(ctx.conn, held.size, latest.size)
    except ProofUnavailable as exc:
        problems.add(held.size, f"the log cannot prove the held checkpoint: {exc}")
        return 0
    except LookupError as exc:
        problems.add(held.size, f"the stored tree is damaged: {exc}")
        return 0
    if not verify_consistency(held.size, latest.size, held.root, latest.root, proof):
        problems.add(
            held.size,
            f"the latest signed tree head (size {latest.size}) does not extend the held "
            f"checkpoint (size {held.size}): a fork or rewritten history",
        )
        return 0
    return 1


async def _sample(ctx: _DbContext, count: int, rng: random.Random) -> tuple[int, int]:
    """Prove ``count`` random retained entries against the latest signed root; return
    (sampled, verified)."""
    latest = ctx.latest
    if latest is None or ctx.start is None:
        return 0, 0
    first = ctx.start.size
    if latest.size <= first:
        return 0, 0
    indexes = sorted(rng.sample(range(first, latest.size), min(count, latest.size - first)))
    rows: dict[int, StoredRow] = {}
    for chunk in range(0, len(indexes), 1000):
        seqs = [i + 1 for i in indexes[chunk : chunk + 1000]]
        result = await ctx.conn.execute(select(audit_events).where(audit_events.c.seq.in_(seqs)))
        rows.update((row["seq"], row) for row in result.mappings())
    verified = 0
    for index in indexes:
        seq = index + 1
        row = rows.get(seq)
        if row is None:
            ctx.problems.add(seq, f"record {seq} is missing")
            continue
        try:
            proof = await inclusion_proof(ctx.conn, index, latest.size)
        except (ProofUnavailable, LookupError) as exc:
            ctx.problems.add(seq, f"no inclusion proof for record {seq}: {exc}")
            continue
        if not verify_inclusion(leaf_hash(_entry(row)), index, latest.size, proof, latest.root):
            ctx.problems.add(
                seq,
                f"record {seq} is not the entry the signed tree head at size {latest.size} "
                "includes",
            )
            continue
        verified += 1
    return len(indexes), verified


async def verify_connection(
    conn: AsyncConnection,
    log_keys: list[str] | None = None,
    held: str | None = None,
    retention_floor: datetime | None = None,
    sample: int | None = None,
    legacy_keys: Mapping[str, bytes] | None = None,
    rng: random.Random | None = None,
) -> VerifyReport:
    """Verify the log as ``conn`` sees it (use one snapshot transaction); see
    ``verify_database``."""
    problems = _Problems()
    floor = _floor(retention_floor)
    source: KeysSource = "pinned" if log_keys is not None else "database"
    rows = await log_key_rows(conn)
    vkeys = log_keys if log_keys is not None else [str(row["vkey"]) for row in rows]
    # A retired key's not_after bounds what it verifies, pinned or not.
    retired = {str(r["vkey"]): str(r["not_after"]) for r in rows if r["not_after"] is not None}
    keys = _verifiers(vkeys, None if log_keys is not None else problems, retired)
    held_checkpoint: Checkpoint | None = None
    if held is not None:
        try:
            # The auditor's own copy, kept since it was fetched: its age is not in question.
            held_checkpoint = _open_checkpoint(held, keys, timed=False)
            problems.signatures += 1
        except NoteError as exc:
            problems.add(None, f"the held checkpoint does not verify with the log keys: {exc}")
    anchors = await _anchor_rows(conn)
    ctx = _DbContext(
        conn,
        keys,
        source,
        floor,
        problems,
        anchors,
        _check_anchors(anchors, keys, floor, problems),
        await latest_tree_head(conn),
    )
    await _check_stored_anchor(ctx)
    signed = await _check_latest(ctx)
    if held is None and sample is None:
        return await _full(ctx, legacy_keys)
    checkpoints = int(signed)
    if held_checkpoint is not None:
        checkpoints += await _consistency(ctx, held_checkpoint)
    sampled = verified = 0
    if sample is not None:
        sampled, verified = await _sample(ctx, sample, rng or random.SystemRandom())
    method: Method = "sample" if sample is not None else "consistency"
    through, _ = await _legacy_row(conn)
    legacy = None
    if through:
        reason = f"the legacy chain is checked by a full walk, not the {method} method"
        legacy = {"through_seq": through, "checked": False, "reason": reason}
    latest = ctx.latest
    return _finish(
        problems,
        checked=verified,
        head_size=latest.size if latest is not None else 0,
        head_root=latest.root if latest is not None else EMPTY_ROOT,
        checkpoints=checkpoints,
        anchors=len(anchors),
        keys_source=source,
        floor=floor,
        tree_size=latest.size if latest is not None else 0,
        legacy=legacy,
        method=method,
        sampled=sampled,
    )


async def verify_database(
    engine: AsyncEngine,
    log_keys: list[str] | None = None,
    held: str | None = None,
    retention_floor: datetime | None = None,
    sample: int | None = None,
    legacy_keys: Mapping[str, bytes] | None = None,
) -> VerifyReport:
    """Verify the log stored behind ``engine`` in one consistent snapshot.

    ``log_keys``: pinned verifier keys (else the ``log_keys`` table's, and the report says
    so); ``held``: a signed checkpoint note the log must extend (proved by a consistency
    proof instead of a full walk); ``sample``: prove that many random entries by inclusion
    instead of a full walk; ``retention_floor``: refuse anchors that pruned records younger
    than it; ``legacy_keys``: pinned BLS keys of the first release's checkpoints.
    """
    if sample is not None and sample < 1:
        raise ValueError("sample must be at least 1")
    async with engine.connect() as conn:
        await begin_snapshot(conn)
        return await verify_connection(conn, log_keys, held, retention_floor, sample, legacy_keys)


# -- export ------------------------------------------------------------------------------


class _ExportState:
    """What an export says besides its events (wherever those lines stand), and where
    the walk stands."""

    def __init__(
        self,
        trusted_log_keys: Iterable[str] | None,
        held: str | None,
        floor: str | None,
        trusted_legacy_keys: Mapping[str, bytes] | None,
    ) -> None:
        self.problems = _Problems()
        self.trusted_log_keys = list(trusted_log_keys) if trusted_log_keys is not None else None
        self.log_keys: list[str] = []
        self.retired: dict[str, str] = {}
        self.legacy_keys: dict[str, bytes] = dict(trusted_legacy_keys or {})
        self.legacy_pinned = trusted_legacy_keys is not None
        self.legacy_chain: tuple[int, str] | None = None
        self.legacy_checkpoints: list[dict[str, Any]] = []
        self.anchors: list[dict[str, Any]] = []
        self.checkpoints: list[tuple[int, dict[str, Any]]] = []
        self.held = held
        self.held_checkpoint: Checkpoint | None = None
        self.floor = floor
        self.keys = _LogKeys([])
        self.legacy: _Legacy | None = None
        self.walk: _Walk | None = None

    @property
    def keys_source(self) -> KeysSource:
        return "pinned" if self.trusted_log_keys is not None else "export"

    def take(self, number: int, item: dict[str, Any]) -> None:
        """Note a line other than an event."""
        problems = self.problems
        kind = item["type"]
        if kind == "log_key" and isinstance(item.get("vkey"), str):
            self.log_keys.append(item["vkey"])
            if isinstance(item.get("not_after"), str):
                self.retired[item["vkey"]] = item["not_after"]
        elif kind == "key":
            if not self.legacy_pinned:
                try:
                    self.legacy_keys[str(item["key_id"])] = key_bytes(item["public_key"])
                except (KeyError, TypeError, ValueError):
                    problems.add(None, f"export line {number}: a legacy key cannot be read")
        elif kind == "legacy_chain":
            try:
                self.legacy_chain = (int(item["through_seq"]), str(item["hash"]))
            except (KeyError, TypeError, ValueError):
                problems.add(None, f"export line {number}: the legacy chain cannot be read")
        elif kind == "legacy_checkpoint":
            self.legacy_checkpoints.append(item)
        elif kind == "anchor":
            self.anchors.append(item)
        elif kind == "checkpoint":
            self.checkpoints.append((number, item))
        else:
            problems.add(None, f"export line {number}: unexpected {kind!r} line")

    def started(self) -> _Walk:
        """Check what the export says besides its events; return the walk over them."""
        if self.walk is not None:
            return self.walk
        problems = self.problems
        if self.trusted_log_keys is not None:
            self.keys = _verifiers(self.trusted_log_keys, None, self.retired)
        else:
            self.keys = _verifiers(self.log_keys, problems, self.retired)
        anchors = sorted(self.anchors, key=_anchor_order)
        start = _check_anchors(anchors, self.keys, self.floor, problems)
        through, head_hash = self.legacy_chain or (0, GENESIS_HASH)
        if through or self.legacy_checkpoints:
            self.legacy = _Legacy(
                through,
                head_hash,
                self.legacy_checkpoints,
                self.legacy_keys,
                "pinned" if self.legacy_pinned else "export",
                problems,
            )
            if start is not None and start.size == 0:
                self.legacy.start()
        walk = _Walk(start or CompactRange(), problems, self.legacy)
        if start is None:
            walk.broken = 1 + (anchors[-1].get("through_seq", 0) if anchors else 0)
        if self.held is not None:
            self._expect_held(walk)
        self.walk = walk
        return walk

    def _expect_held(self, walk: _Walk) -> None:
        try:
            held = _open_checkpoint(str(self.held), self.keys, timed=False)
            self.problems.signatures += 1
        except NoteError as exc:
            self.problems.add(None, f"the held checkpoint does not verify with the log keys: {exc}")
            return
        self.held_checkpoint = held
        if held.size < walk.size:
            self.problems.add(
                held.size or None,
                f"the held checkpoint (size {held.size}) predates the retained entries "
                f"(from seq {walk.size + 1}): check it against the database instead",
            )
            return
        walk.expect(held.size, held.root, f"the held checkpoint at size {held.size}")


def _anchor_order(anchor: Mapping[str, Any]) -> int:
    """Anchors by through_seq, wherever they stood (one that cannot be read sorts last,
    where _check_anchors reports it)."""
    through = anchor.get("through_seq")
    return through if type(through) is int else 2**63


_DECODE = json.JSONDecoder().raw_decode
_Numbered = Iterator[tuple[int, str]]


def _export_item(line: str, number: int) -> dict[str, Any] | None:
    """Parse one export line: None for a blank line; ValueError unless it is one JSON
    object with a type."""
    try:
        item, end = _DECODE(line)
        if end != len(line) and not line[end:].isspace():
            raise ValueError("extra data")
    except ValueError:
        if not line.strip():
            return None
        item = None
    if not isinstance(item, dict) or "type" not in item:
        raise ValueError(f"export line {number} is not an audit export item")
    return item


def _next_item(numbered: _Numbered) -> tuple[int, dict[str, Any]] | None:
    for number, line in numbered:
        item = _export_item(line, number)
        if item is not None:
            return number, item
    return None


def _walk_events(
    walk: _Walk, numbered: _Numbered, number: int, item: dict[str, Any]
) -> tuple[int, dict[str, Any]] | None:
    """Feed ``item`` and the event lines after it to the walk; return the first line of
    another type, or None at the end. The hot path of export verification: one JSON
    parse per line, the entry hashed exactly as given, the append inlined."""
    decode = _DECODE
    sha = _sha256
    hashes = walk.hashes
    push, pop = hashes.append, hashes.pop
    expected = walk.expected
    legacy, legacy_through = walk.legacy, walk.legacy_through
    while True:
        if walk.broken is None:
            seq, entry, size = item.get("seq"), item.get("entry"), walk.size
            if seq == size + 1 and type(seq) is int and type(entry) is str:
                try:
                    data = entry.encode("utf-8")
                except UnicodeEncodeError:
                    walk.fail(seq, f"export line {number}: the entry is not valid UTF-8")
                else:
                    if seq <= legacy_through:
                        # Never None here (legacy_through is 0 then); no check on the hot path.
                        legacy.feed(seq, data)  # type: ignore[union-attr]
                    h = sha(b"\x00" + data).digest()
                    index = size
                    while index & 1:
                        h = sha(b"\x01" + pop() + h).digest()
                        index >>= 1
                    push(h)
                    walk.size = seq
                    if seq in expected:
                        for root, what in expected.pop(seq):
                            walk._compare(root, what)
            elif type(entry) is not str:
                walk.fail(size + 1, f"export line {number} is not a readable event")
            else:
                walk.append(seq, b"")  # out of order, or no integer seq: the walk breaks
        for number, line in numbered:  # number and line carry on past the loop
            try:
                item, end = decode(line)
                kind = item["type"]
                if end != len(line) and not line[end:].isspace():
                    raise ValueError("extra data")
            except (ValueError, KeyError, TypeError):
                parsed = _export_item(line, number)
                if parsed is None:
                    continue
                item, kind = parsed, parsed["type"]
            break
        else:
            return None
        if kind != "event":
            return number, item


def _check_header(item: dict[str, Any] | None) -> None:
    if item is None or item.get("type") != "header" or item.get("format") != EXPORT_FORMAT:
        raise ValueError("not an audit export: the first line must be its header")
    version = item.get("version")
    if version != EXPORT_VERSION:
        raise ValueError(
            f"audit export format version {version} is not supported (this verifier reads "
            f"version {EXPORT_VERSION}, the Merkle tree log)"
        )


def _expect_checkpoints(state: _ExportState, walk: _Walk) -> int | None:
    """Verify every signed checkpoint of the export, wherever its line stood, and have the
    walk compare its root at its size; return the size the events must end at (the
    largest checkpoint's), None when the export has no checkpoint."""
    problems = state.problems
    sizes = [item.get("size") for _, item in state.checkpoints]
    final = max((s for s in sizes if type(s) is int and s >= 0), default=None)
    for number, item in state.checkpoints:
        size, note = item.get("size"), item.get("note")
        if type(size) is not int or size < 0:
            problems.add(walk.size + 1, f"the checkpoint of export line {number} states no size")
            continue
        what = "final signed checkpoint" if size == final else "signed checkpoint"
        if note is None and size == 0:
            checkpoint = Checkpoint("-", 0, EMPTY_ROOT)
        else:
            try:
                if not isinstance(note, str):
                    raise NoteError("no signed note")
                checkpoint = _open_checkpoint(note, state.keys, item.get("issued_at"))
            except NoteError as exc:
                problems.add(size or None, f"the {what} (size {size}) does not verify: {exc}")
                continue
            problems.signatures += 1
            if checkpoint.size != size:
                problems.add(size, f"the checkpoint line says size {size}, its note another")
                continue
        if size >= walk.size:  # one inside the pruned prefix is not among the entries
            walk.expect(size, checkpoint.root, f"the {what} at size {size}")
    return final


def _end_at(state: _ExportState, walk: _Walk, final: int | None) -> None:
    """The events must end exactly at the largest signed checkpoint."""
    problems = state.problems
    if final is None:
        problems.add(
            walk.size + 1,
            "the export does not end with its signed checkpoint: it was truncated after "
            f"record {walk.size}",
        )
        return
    if walk.broken is not None:
        return
    if walk.size < final:
        problems.add(
            walk.size + 1,
            f"records {walk.size + 1} through {final} are missing (the final checkpoint "
            f"covers them)",
        )
    elif walk.size > final:
        problems.add(
            final + 1, f"records {final + 1} through {walk.size} lie beyond the final checkpoint"
        )


def _numbered(lines: Callable[[], Iterable[str]]) -> _Numbered:
    return iter(enumerate(lines(), start=1))


def _read_again(lines: Iterable[str] | Path) -> Callable[[], Iterable[str]]:
    """The export as something that can be read twice (a file is opened again)."""
    if isinstance(lines, Path):
        path = lines

        def read() -> Iterator[str]:
            with path.open(encoding="utf-8") as handle:
                yield from handle

        return read
    held = lines if isinstance(lines, Sequence) else list(lines)
    return lambda: held


def _scan(state: _ExportState, numbered: _Numbered) -> None:
    """First reading: the header, then every line that is not an event."""
    first = _next_item(numbered)
    _check_header(first[1] if first is not None else None)
    for number, line in numbered:
        if line.startswith('{"entry":'):  # an event as the exporter writes it: read later
            continue
        item = _export_item(line, number)
        if item is not None and item["type"] != "event":
            state.take(number, item)


def verify_export_lines(
    lines: Iterable[str] | Path,
    trusted_log_keys: Iterable[str] | None = None,
    held: str | None = None,
    retention_floor: datetime | None = None,
    trusted_legacy_keys: Mapping[str, bytes] | None = None,
) -> VerifyReport:
    """Verify an export (format in ``audit.export``), always by a full walk.

    ``lines``: the export's lines, or its file (read twice: once for what it says
    besides its events, wherever those lines stand, then for the events).
    ``trusted_log_keys`` (verifier keys), when given, replace the log keys the export
    carries, so an auditor can pin the keys they hold; ``trusted_legacy_keys`` likewise
    the BLS keys of the first release's checkpoints. A retired key's ``not_after``, as
    the export states it, bounds what it can have signed: checkpoints and anchors issued
    later do not verify. ``held`` is a signed checkpoint note the export must extend (its
    root is compared when the walk reaches its size); ``retention_floor`` as for
    ``verify_database``. Raises ValueError for a file that is not a version 2 export.
    """
    state = _ExportState(trusted_log_keys, held, _floor(retention_floor), trusted_legacy_keys)
    problems = state.problems
    source = _read_again(lines)
    _scan(state, _numbered(source))
    walk = state.started()
    final = _expect_checkpoints(state, walk)
    numbered = _numbered(source)
    pending = _next_item(numbered)  # the header
    while pending is not None:
        pending = _next_item(numbered)
        while pending is not None and pending[1]["type"] == "event":
            pending = _walk_events(walk, numbered, *pending)
    _end_at(state, walk, final)
    held_checkpoint = state.held_checkpoint
    if held_checkpoint is not None and held_checkpoint.size > walk.size and walk.broken is None:
        problems.add(
            walk.size + 1,
            f"the held checkpoint (size {held_checkpoint.size}) is ahead of the export "
            f"(size {walk.size}): the log was rolled back or forked",
        )
    legacy = state.legacy.report(walk.walked) if state.legacy is not None else None
    signed = final or 0
    return _finish(
        problems,
        checked=walk.checked(signed),
        head_size=walk.size,
        head_root=walk.root(),
        checkpoints=walk.matched,
        anchors=len(state.anchors),
        keys_source=state.keys_source,
        floor=state.floor,
        tree_size=signed,
        legacy=legacy,
        method="full",
        start=walk.start,
    )


__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "KeysSource",
    "VerifyReport",
    "begin_snapshot",
    "load_log_keys",
    "load_public_keys",
    "log_key_rows",
    "verify_connection",
    "verify_database",
    "verify_export_lines",
]
