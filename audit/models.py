"""The audit tables. Schema changes go through migrations/versions/audit_*.py only."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, Text

from audit.chain import canonical_json
from audit.events import EVENT_FIELDS, JSON_FIELDS

metadata = MetaData()

# One row per record; never updated, deleted only by retention below a signed anchor.
audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
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

# A single row (id = 1): the lock every writer takes and the newest (seq, hash).
audit_chain_head = Table(
    "audit_chain_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

# Signed statements "the chain had this head"; append-only.
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

# Signed statements left by retention: records up to through_seq were pruned, the
# record at through_seq had this hash (the retained chain starts from it) and the newest
# pruned record occurred at newest_occurred_at (NULL in anchors older than audit_0002).
audit_anchors = Table(
    "audit_anchors",
    metadata,
    Column("through_seq", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
    Column("checkpoint_seq", BigInteger, nullable=False),
    Column("pruned", BigInteger, nullable=False),
    Column("issued_at", String(27), nullable=False),
    Column("key_id", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("signature", Text, nullable=False),
    Column("newest_occurred_at", String(27)),
)

# One row (id = 1): the retention floor the database enforces with its own clock; only
# the migration owner writes it (``kzg-gateway init`` sets it from the policy).
audit_retention = Table(
    "audit_retention",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("keep_years", Integer, nullable=False),
)

HEAD_ID = 1


def columns_for(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return the column values that store an event's fields."""
    return {
        name: canonical_json(value) if name in JSON_FIELDS else value
        for name, value in fields.items()
    }


def fields_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Return an event's fields, as hashed, from its stored columns."""
    return {
        name: json.loads(row[name]) if name in JSON_FIELDS else row[name] for name in EVENT_FIELDS
    }
