"""The audit tables. Schema changes go through migrations/versions/audit_*.py only."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.engine import RowMapping

from audit.chain import canonical_json, record_for
from audit.events import EVENT_FIELDS, JSON_FIELDS

# A stored row as read: SQLAlchemy's RowMapping (keyed by name or column) or a plain dict.
StoredRow: TypeAlias = Mapping[str, Any] | RowMapping

metadata = MetaData()

# One row per record (an entry of the tree: leaf index seq - 1); never updated, deleted
# only by retention below a signed anchor. The tree's hashes stay in audit_tree.
audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("request_id", Text, nullable=False),
    Column("occurred_at", String(27), nullable=False, index=True),
    Column("actor", Text, index=True),
    Column("role", Text),
    Column("action", Text, nullable=False, index=True),
    Column("outcome", Text, nullable=False),
    Column("http_status", Integer),
    Column("client_addr", Text),
    Column("tls_version", Text),
    Column("method", Text),
    Column("path", Text),
    Column("input_digests", Text, nullable=False),
    Column("result_digest", Text),
    Column("latency_ms", Float),
    Column("detail", Text, nullable=False),
)

# The tree's stored hashes: every leaf hash (level 0) and every complete subtree root at
# levels that are multiples of TILE_HEIGHT; any other node is at most 255 of them away.
audit_tree = Table(
    "audit_tree",
    metadata,
    Column("level", SmallInteger, primary_key=True, autoincrement=False),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", LargeBinary, nullable=False),
)
TILE_HEIGHT = 8

# One signed checkpoint (C2SP signed note over origin, size, root) per tree size.
audit_tree_heads = Table(
    "audit_tree_heads",
    metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("root", LargeBinary, nullable=False),
    Column("issued_at", String(27), nullable=False),
    Column("key_id", Text, nullable=False),
    Column("note", Text, nullable=False),
)

# A single row (id = 1): the lock every writer takes, the tree's size and root, and its
# compact range (the right-edge subtree hashes) from which the next append continues.
audit_log_head = Table(
    "audit_log_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("size", BigInteger, nullable=False),
    Column("root", LargeBinary, nullable=False),
    Column("compact", LargeBinary, nullable=False),
)

# The first release's hash chain: its head when the tree took over (audit_0003), and the
# BLS-signed checkpoints of that chain. Both are closed to new rows.
audit_legacy_chain = Table(
    "audit_legacy_chain",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("through_seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("issued_at", String(27), nullable=False),
    Column("key_id", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("signature", Text, nullable=False),
)

# Signed statements left by retention: records up to through_seq left the database; the
# compact range of those leaves (base64 hashes, space separated) and the signed tree head
# at tree_size let the retained log verify without them.
audit_anchors = Table(
    "audit_anchors",
    metadata,
    Column("through_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("tree_size", BigInteger, nullable=False),
    Column("pruned", BigInteger, nullable=False),
    Column("newest_occurred_at", String(27), nullable=False),
    Column("issued_at", String(27), nullable=False),
    Column("compact", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("note", Text, nullable=False),
)

# One row (id = 1): the retention floor the database enforces with its own clock; only
# the migration owner writes it (``kzg-gateway init`` sets it from the policy).
audit_retention = Table(
    "audit_retention",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("keep_years", Integer, nullable=False),
)


def column_values(fields: Mapping[str, Any]) -> tuple[Any, ...]:
    """Return the column values that store an event's fields, in EVENT_FIELDS order."""
    return tuple(
        canonical_json(fields[name]) if name in JSON_FIELDS else fields[name]
        for name in EVENT_FIELDS
    )


def columns_for(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return the column values that store an event's fields, by column name."""
    return dict(zip(EVENT_FIELDS, column_values(fields), strict=True))


def fields_from_row(row: StoredRow) -> dict[str, Any]:
    """Return an event's fields, as hashed, from its stored columns."""
    return {
        name: json.loads(row[name]) if name in JSON_FIELDS else row[name] for name in EVENT_FIELDS
    }


def entry_from_row(row: StoredRow) -> str:
    """Return the logged entry of a stored record: the canonical JSON its leaf hashes."""
    return canonical_json(record_for(row["seq"], fields_from_row(row)))
