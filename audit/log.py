"""The stored tree: its head, its signed tree heads, and proofs read from stored hashes.

``audit_tree`` keeps every leaf hash and every complete subtree root at levels that are
multiples of ``TILE_HEIGHT``. A perfect subtree at level L is the fold of at most
2^(L mod 8) stored hashes of level L - L mod 8, so a proof at any checkpointed size reads
one range per proof node (all in one query) and never rehashes an entry.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import select
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.merkle import (
    HASH_SIZE,
    CompactRange,
    Node,
    consistency_nodes,
    inclusion_nodes,
    node_hash,
    proof_from_nodes,
)
from audit.models import (
    TILE_HEIGHT,
    StoredRow,
    audit_log_head,
    audit_tree,
    audit_tree_heads,
)

HEAD_ID = 1


class ProofUnavailable(ValueError):
    """A proof was asked for a size that was never checkpointed, or an index out of range."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@dataclass(frozen=True)
class LogHead:
    """The tree as the head row holds it: size, root and compact range."""

    size: int
    root: bytes
    compact: bytes

    def compact_range(self) -> CompactRange:
        return CompactRange.from_bytes(self.size, self.compact)


@dataclass(frozen=True)
class TreeHead:
    """A signed checkpoint of the tree at ``size``; ``note`` is the C2SP signed note."""

    size: int
    root: bytes
    issued_at: str
    key_id: str
    note: str

    @classmethod
    def from_row(cls, row: StoredRow) -> TreeHead:
        return cls(
            int(row["size"]), bytes(row["root"]), row["issued_at"], row["key_id"], row["note"]
        )


async def begin_write(conn: AsyncConnection) -> None:
    """Begin a transaction that will write. SQLite takes its write lock up front: a read
    transaction that later writes fails outright if another writer committed meanwhile."""
    if conn.dialect.name == "sqlite":
        await conn.exec_driver_sql("BEGIN IMMEDIATE")


def _head_query(lock: bool) -> Any:
    query = select(audit_log_head.c.size, audit_log_head.c.root, audit_log_head.c.compact).where(
        audit_log_head.c.id == HEAD_ID
    )
    return query.with_for_update() if lock else query


async def lock_head(conn: AsyncConnection) -> LogHead:
    """Begin a transaction holding the head lock (every writer's); return the head."""
    await begin_write(conn)
    row = (await conn.execute(_head_query(lock=True))).one()
    return LogHead(int(row.size), bytes(row.root), bytes(row.compact))


async def read_head(conn: AsyncConnection) -> LogHead:
    row = (await conn.execute(_head_query(lock=False))).one()
    return LogHead(int(row.size), bytes(row.root), bytes(row.compact))


async def latest_tree_head(conn: AsyncConnection) -> TreeHead | None:
    """The signed tree head of the largest size, or None before the first one."""
    row = (
        await conn.execute(
            select(audit_tree_heads).order_by(audit_tree_heads.c.size.desc()).limit(1)
        )
    ).first()
    return TreeHead.from_row(row._mapping) if row is not None else None


async def tree_head_at(conn: AsyncConnection, size: int) -> TreeHead | None:
    row = (
        await conn.execute(select(audit_tree_heads).where(audit_tree_heads.c.size == size))
    ).first()
    return TreeHead.from_row(row._mapping) if row is not None else None


def _stored_range(node: Node) -> tuple[int, int, int]:
    """The stored level and index range whose fold is ``node``."""
    level, index = node
    base = level - level % TILE_HEIGHT
    span = level - base
    return base, index << span, ((index + 1) << span) - 1


@functools.cache
def _ranges_sql(count: int, paramstyle: str) -> str:
    """One statement reading ``count`` ranges of stored hashes, in the driver's own
    parameter style: built once per count, it skips SQLAlchemy's statement compilation,
    which measured about 40% of a proof's time at 10 million entries."""
    marks = (
        (f"${n}" for n in range(1, 3 * count + 1))
        if paramstyle == "numeric_dollar"
        else iter(["?"] * (3 * count))
    )
    ranges = " OR ".join(
        f"(level = {next(marks)} AND idx BETWEEN {next(marks)} AND {next(marks)})"
        for _ in range(count)
    )
    return f"SELECT level, idx, hash FROM {audit_tree.name} WHERE {ranges}"  # noqa: S608


async def read_nodes(conn: AsyncConnection, nodes: Iterable[Node]) -> dict[Node, bytes]:
    """Return the hash of every perfect subtree in ``nodes`` from stored hashes (one query
    per 64 ranges). Raises LookupError when a hash it needs is not stored (the tree is
    damaged)."""
    wanted = sorted(set(nodes))
    if not wanted:
        return {}
    ranges = [_stored_range(node) for node in wanted]
    distinct = sorted(set(ranges))
    stored: dict[tuple[int, int], bytes] = {}
    # Bounded OR lists keep each statement small for proofs of huge trees.
    for start in range(0, len(distinct), 64):
        chunk = distinct[start : start + 64]
        sql = _ranges_sql(len(chunk), conn.dialect.paramstyle)
        params = tuple(value for bounds in chunk for value in bounds)
        # SQLAlchemy types exec_driver_sql's rows as one column; these have three.
        rows = cast("CursorResult[Any, Any, Any]", await conn.exec_driver_sql(sql, params))
        for level, idx, value in rows:
            stored[(int(level), int(idx))] = bytes(value)
    result: dict[Node, bytes] = {}
    for node, (base, first, last) in zip(wanted, ranges, strict=True):
        try:
            layer = [stored[(base, i)] for i in range(first, last + 1)]
        except KeyError as exc:
            raise LookupError(f"the stored tree lacks the hash at {exc.args[0]}") from None
        while len(layer) > 1:
            layer = [node_hash(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
        if len(layer[0]) != HASH_SIZE:
            raise LookupError(f"the stored hash of {node} is not {HASH_SIZE} bytes")
        result[node] = layer[0]
    return result


async def _checkpointed(conn: AsyncConnection, size: int, parameter: str) -> TreeHead:
    head = await tree_head_at(conn, size) if size > 0 else None
    if head is None:
        raise ProofUnavailable(parameter, f"{parameter} {size} is not a checkpointed tree size")
    return head


async def inclusion_proof(conn: AsyncConnection, index: int, size: int) -> list[bytes]:
    """RFC 9162 inclusion proof of leaf ``index`` in the checkpointed tree of ``size``."""
    await _checkpointed(conn, size, "size")
    if not 0 <= index < size:
        raise ProofUnavailable("index", f"index must be in [0, {size}), got {index}")
    groups = inclusion_nodes(index, size)
    found = await read_nodes(conn, (node for group in groups for node in group))
    return proof_from_nodes(groups, found.__getitem__)


async def consistency_proof(conn: AsyncConnection, old: int, size: int) -> list[bytes]:
    """RFC 9162 consistency proof between two checkpointed sizes, ``old`` <= ``size``."""
    await _checkpointed(conn, size, "size")
    if old > size:
        raise ProofUnavailable("old", f"old must not exceed size ({size}), got {old}")
    await _checkpointed(conn, old, "old")
    groups = consistency_nodes(old, size)
    found = await read_nodes(conn, (node for group in groups for node in group))
    return proof_from_nodes(groups, found.__getitem__)
