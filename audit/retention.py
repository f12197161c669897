"""Retention: the only path by which records leave the audit log.

Prunes the oldest whole range of records that is both older than the policy and
covered by a signed tree head, after checking that range's entries against the stored
leaf hashes and tile roots, the stored tree against that head's root, and the prefix
rebuilt from the entries against that head (a consistency proof). Only entry bodies
leave: the tree's hashes stay, so inclusion proofs of retained entries and consistency
proofs keep verifying. A signed anchor states what left (with the compact range of the pruned leaves
and the time of the newest) so that the retained log verifies offline. The database has
the last word (migrations ``audit_0002``/``audit_0003``): it refuses an anchor unless
every record it covers is older than the retention floor it holds, by its own clock, and
a signed tree head covers it. On PostgreSQL the anchor and the delete go through
``audit_prune`` (SECURITY DEFINER), because the runtime role may neither insert anchors
nor delete records.
"""

from __future__ import annotations

import base64
import tomllib
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.events import format_timestamp
from audit.log import TreeHead, begin_write, latest_tree_head, read_nodes
from audit.merkle import (
    CompactRange,
    Node,
    consistency_nodes,
    fold,
    leaf_hash,
    proof_from_nodes,
    root_nodes,
    verify_consistency,
)
from audit.models import (
    TILE_HEIGHT,
    audit_anchors,
    audit_events,
    audit_retention,
    audit_tree,
    entry_from_row,
)
from audit.signing import LogSigner, anchor_text

DEFAULT_KEEP_YEARS = 7
_PRUNE_LOCK = 0x6B7A6761  # advisory lock id of retention runs (audit_prune takes it too)
# The floor as migration audit_0002's SQLite trigger computes it (SQLite has millisecond
# time; the padding gives the canonical timestamp form).
_SQLITE_FLOOR = (
    "SELECT strftime('%Y-%m-%dT%H:%M:%f', 'now', '-' || keep_years || ' years') || '000Z' "
    "FROM audit_retention WHERE id = 1"
)
_PRUNE_CALL = (
    "SELECT audit_prune(:through_seq, :tree_size, :pruned, :newest_occurred_at, "
    ":issued_at, :compact, :key_id, :note)"
)


class RetentionRefused(RuntimeError):
    """The range to prune does not verify against its checkpoint, or the database refused
    the anchor: nothing is removed."""


@dataclass(frozen=True)
class RetentionPolicy:
    keep_years: int = DEFAULT_KEEP_YEARS

    def __post_init__(self) -> None:
        if self.keep_years < 1:
            raise ValueError("audit retention must keep at least one year")

    def cutoff(self, now: datetime) -> datetime:
        """Return the instant before which records may be pruned."""
        try:
            return now.replace(year=now.year - self.keep_years)
        except ValueError:  # 29 February in a year that has none
            return now.replace(year=now.year - self.keep_years, day=28)

    @classmethod
    def load(cls, path: Path) -> RetentionPolicy:
        """Read ``[audit] keep_years`` from a policy file; defaults when the file is absent."""
        if not path.exists():
            return cls()
        with path.open("rb") as handle:
            section = tomllib.load(handle).get("audit", {})
        return cls(keep_years=int(section.get("keep_years", DEFAULT_KEEP_YEARS)))


@dataclass(frozen=True)
class RetentionResult:
    pruned: int
    through_seq: int | None
    cutoff: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _latest_anchor(conn: AsyncConnection) -> int:
    latest = (await conn.execute(select(func.max(audit_anchors.c.through_seq)))).scalar()
    return int(latest or 0)


async def _prunable_through(conn: AsyncConnection, cutoff: str, limit_seq: int) -> int:
    """Return the last seq of the leading range older than ``cutoff``, at most ``limit_seq``."""
    first_young = (
        await conn.execute(
            select(func.min(audit_events.c.seq)).where(audit_events.c.occurred_at >= cutoff)
        )
    ).scalar()
    through = limit_seq if first_young is None else min(limit_seq, first_young - 1)
    return int(through)


async def database_floor(conn: AsyncConnection) -> str:
    """Return the retention floor the database enforces now, by its own clock: only
    records that occurred before it may leave."""
    query = "SELECT audit_retention_floor()" if conn.dialect.name == "postgresql" else _SQLITE_FLOOR
    floor = (await conn.execute(text(query))).scalar()
    if floor is None:
        raise RetentionRefused("the database holds no retention floor")
    return str(floor)


async def store_retention_policy(owner_engine: AsyncEngine, policy: RetentionPolicy) -> None:
    """Write the policy's floor into the database; run as the migration owner (on
    PostgreSQL the runtime role may only read it)."""
    async with owner_engine.begin() as conn:
        await conn.execute(update(audit_retention).values(keep_years=policy.keep_years))


async def run_retention(
    engine: AsyncEngine, signer: LogSigner, policy: RetentionPolicy, now: datetime
) -> RetentionResult:
    """Prune what the policy and the database's floor both allow; return what was done.

    The range is read and verified without blocking appends; only the anchor and the
    delete run in a write transaction, which re-checks that no other run pruned first.
    """
    async with engine.connect() as conn:
        # The database refuses anything younger than its floor, whatever our clock says.
        cutoff = min(format_timestamp(policy.cutoff(now)), await database_floor(conn))
        head = await latest_tree_head(conn)
        if head is None:
            return RetentionResult(0, None, cutoff, "no signed tree head yet")
        anchored = await _latest_anchor(conn)
        through = await _prunable_through(conn, cutoff, head.size)
        if through <= anchored:
            return RetentionResult(0, None, cutoff, "nothing older than the policy")
        newest, compact = await _verified_range(conn, head, anchored, through)
        await conn.rollback()

        await begin_write(conn)
        if conn.dialect.name == "postgresql":
            # SQLite's write lock already serialises retention runs; PostgreSQL needs one.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PRUNE_LOCK})
        if await _latest_anchor(conn) != anchored:
            await conn.rollback()
            return RetentionResult(0, None, cutoff, "another retention run pruned first")
        issued_at = format_timestamp(now)
        pruned = through - anchored
        compact_text = " ".join(base64.b64encode(h).decode() for h in compact.hashes)
        key = signer.current()  # the id stored is the signing key's
        note = key.sign_note(
            anchor_text(through, head.size, pruned, newest, issued_at, compact_text)
        )
        anchor = {
            "through_seq": through,
            "tree_size": head.size,
            "pruned": pruned,
            "newest_occurred_at": newest,
            "issued_at": issued_at,
            "compact": compact_text,
            "key_id": key.key_id,
            "note": note,
        }
        try:
            removed = await _prune(conn, anchor)
        except DBAPIError as exc:
            if "retention refused" in str(exc.orig):
                raise RetentionRefused(str(exc.orig)) from exc
            raise
        await conn.commit()
    return RetentionResult(removed, through, cutoff, "pruned")


async def _prune(conn: AsyncConnection, anchor: dict[str, Any]) -> int:
    """Write ``anchor`` and delete the records it covers; return how many left."""
    if conn.dialect.name == "postgresql":
        return int((await conn.execute(text(_PRUNE_CALL), anchor)).scalar_one())
    await conn.execute(insert(audit_anchors).values(**anchor))
    deleted = await conn.execute(
        delete(audit_events).where(audit_events.c.seq <= anchor["through_seq"])
    )
    return int(deleted.rowcount)


async def _verified_range(
    conn: AsyncConnection, head: TreeHead, anchored: int, through: int
) -> tuple[str, CompactRange]:
    """Check the range to prune against the signed tree head, from the entries themselves:

    - the stored tree folds to the head's signed root (it keeps serving proofs);
    - every entry in (anchored, through] hashes to its stored leaf, and every tile root
      its leaves complete is the stored one;
    - the tree of the first ``through`` leaves, rebuilt from the entries onto the compact
      range of what earlier runs pruned, is a prefix of the signed tree (a consistency
      proof from the stored hashes). Stored hashes alone cannot show that: an entry
      rewritten together with its leaf hash still matches it, and the tile roots above
      still fold to the signed root.

    Returns the newest ``occurred_at`` of the range and the compact range of the first
    ``through`` leaves (the anchor's)."""
    nodes = root_nodes(head.size)
    found = await read_nodes(conn, nodes)
    if fold([found[node] for node in nodes]) != head.root:
        raise RetentionRefused(f"the stored tree does not fold to the signed root at {head.size}")
    before = root_nodes(anchored)
    stored_before = await read_nodes(conn, before)
    compact = CompactRange(anchored, [stored_before[node] for node in before])
    tiles: dict[Node, bytes] = {}
    newest = ""
    rows = await conn.stream(
        select(audit_events, audit_tree.c.hash.label("leaf"))
        .join(
            audit_tree,
            (audit_tree.c.level == 0) & (audit_tree.c.idx == audit_events.c.seq - 1),
            isouter=True,
        )
        .where(audit_events.c.seq > anchored, audit_events.c.seq <= through)
        .order_by(audit_events.c.seq)
        .execution_options(yield_per=2000)
    )
    expected = anchored + 1
    async for row in rows.mappings():
        seq = row["seq"]
        leaf = leaf_hash(entry_from_row(row).encode("utf-8"))
        if seq != expected or row["leaf"] is None or bytes(row["leaf"]) != leaf:
            raise RetentionRefused(f"record {expected} does not match the tree: nothing pruned")
        for node, value in compact.append(leaf):
            if node[0] and node[0] % TILE_HEIGHT == 0:
                tiles[node] = value
        newest = max(newest, row["occurred_at"])
        expected += 1
    if expected != through + 1:
        raise RetentionRefused(f"records missing from seq {expected}: nothing pruned")
    stored_tiles = await read_nodes(conn, tiles)
    for node, value in tiles.items():
        if stored_tiles[node] != value:
            raise RetentionRefused(
                f"the stored tile root {node} does not match records {anchored + 1}-{through}: "
                "nothing pruned"
            )
    groups = consistency_nodes(through, head.size)
    stored = await read_nodes(conn, (node for group in groups for node in group))
    proof = proof_from_nodes(groups, stored.__getitem__)
    if not verify_consistency(through, head.size, compact.root(), head.root, proof):
        raise RetentionRefused(
            f"records {anchored + 1}-{through} are not the ones the signed tree head at "
            f"{head.size} holds: nothing pruned"
        )
    return newest, compact
