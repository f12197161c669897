"""Offline verification of the audit chain, from a database or a JSON Lines export.

Needs nothing of the server. Walks the retained chain from the newest retention anchor
(or genesis), recomputing every hash; checks the head, every checkpoint against the
record at its seq, and every checkpoint and anchor signature against the public keys.
Told a retention floor, it also refuses anchors that pruned records younger than it.

Where the public keys came from is part of the report (``keys_source``): keys pinned by
the caller prove the signatures; keys read from the database or export being verified
prove only that whoever controls that source signed them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.chain import GENESIS_HASH, chain_hash, record_for
from audit.checkpoints import Checkpoint
from audit.events import EVENT_FIELDS, format_timestamp
from audit.models import (
    HEAD_ID,
    audit_anchors,
    audit_chain_head,
    audit_checkpoints,
    audit_events,
    fields_from_row,
)
from audit.signing import anchor_message, checkpoint_message, key_bytes, signature_valid

# pinned: handed in by the caller; database / export: read from the source being verified.
KeysSource = Literal["pinned", "database", "export"]


@dataclass
class VerifyReport:
    valid: bool
    checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None
    reason: str | None
    checkpoints: int = 0
    anchors: int = 0
    keys_source: KeysSource = "pinned"
    retention_floor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "valid": self.valid,
            "checked": self.checked,
            "head": {"seq": self.head_seq, "hash": self.head_hash},
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "checkpoints": self.checkpoints,
            "anchors": self.anchors,
            "keys_source": self.keys_source,
            "retention_floor": self.retention_floor,
        }


@dataclass
class ChainVerifier:
    """Feed anchors and checkpoints first, then records in the order the source holds
    them, then the claimed head; ``finish()`` names the lowest seq found bad.
    ``retention_floor`` (canonical timestamp): anchors must have pruned only records
    that occurred before it."""

    public_keys: Mapping[str, bytes]
    start_seq: int = 0
    start_hash: str = GENESIS_HASH
    keys_source: KeysSource = "pinned"
    retention_floor: str | None = None
    _seq: int = 0
    _hash: str = GENESIS_HASH
    _checked: int = 0
    _broken: bool = False
    _problems: list[tuple[int, str]] = field(default_factory=list)
    _checkpoints: dict[int, str] = field(default_factory=dict)
    _anchors: int = 0

    def __post_init__(self) -> None:
        self._seq, self._hash = self.start_seq, self.start_hash

    def add_anchors(self, anchors: Iterable[Mapping[str, Any]]) -> None:
        for anchor in anchors:
            self._anchors += 1
            message = anchor_message(
                anchor["through_seq"],
                anchor["hash"],
                anchor["checkpoint_seq"],
                anchor["pruned"],
                anchor["issued_at"],
                anchor.get("newest_occurred_at"),
            )
            if message != anchor["message"] or not signature_valid(
                self.public_keys, anchor["key_id"], message, anchor["signature"]
            ):
                self._problem(anchor["through_seq"] + 1, "retention anchor signature invalid")
            self._check_age(anchor)
            if anchor["through_seq"] >= self.start_seq:
                self.start_seq, self.start_hash = anchor["through_seq"], anchor["hash"]
        self._seq, self._hash = self.start_seq, self.start_hash

    def _check_age(self, anchor: Mapping[str, Any]) -> None:
        if self.retention_floor is None:
            return
        newest = anchor.get("newest_occurred_at")
        if newest is None:
            self._problem(anchor["through_seq"] + 1, "retention anchor does not state its age")
        elif newest >= self.retention_floor:
            self._problem(
                anchor["through_seq"] + 1,
                f"retention anchor pruned records from {newest}, "
                f"younger than the retention floor {self.retention_floor}",
            )

    def add_checkpoints(self, checkpoints: Iterable[Mapping[str, Any]]) -> None:
        for cp in checkpoints:
            message = checkpoint_message(cp["seq"], cp["hash"], cp["issued_at"])
            if message != cp["message"] or not signature_valid(
                self.public_keys, cp["key_id"], message, cp["signature"]
            ):
                self._problem(cp["seq"], "checkpoint signature invalid")
            known = self._checkpoints.setdefault(cp["seq"], cp["hash"])
            if known != cp["hash"]:
                self._problem(cp["seq"], "two checkpoints disagree about this seq")
        anchored = self._checkpoints.get(self.start_seq)
        if anchored is not None and self.start_seq > 0 and anchored != self.start_hash:
            self._problem(self.start_seq + 1, "retention anchor contradicts a checkpoint")

    def add_held_checkpoint(self, checkpoint: Checkpoint) -> None:
        """An auditor's own earlier checkpoint: the chain must run through it."""
        self.add_checkpoints([checkpoint.to_dict()])
        if checkpoint.seq < self.start_seq:
            self._problem(checkpoint.seq, "the held checkpoint predates the retained chain")
        elif checkpoint.seq == self.start_seq and checkpoint.hash != self.start_hash:
            self._problem(checkpoint.seq, "the retained chain does not extend the checkpoint")

    def add_record(self, seq: int, prev_hash: str, stored_hash: str, fields: Mapping) -> None:
        if self._broken:
            return
        expected = self._seq + 1
        if seq != expected:
            self._break(min(seq, expected), f"expected seq {expected}, found {seq}")
            return
        if prev_hash != self._hash:
            self._break(seq, "prev_hash does not match the previous record")
            return
        if chain_hash(self._hash, record_for(seq, fields)) != stored_hash:
            self._break(seq, "record content does not match its hash")
            return
        signed = self._checkpoints.get(seq)
        if signed is not None and signed != stored_hash:
            self._break(seq, "record differs from the signed checkpoint at this seq")
            return
        self._seq, self._hash = seq, stored_hash
        self._checked += 1

    def add_malformed(self, reason: str) -> None:
        """A record the source holds but that cannot be read: the chain breaks here."""
        if not self._broken:
            self._break(self._seq + 1, reason)

    def finish(self, head_seq: int | None, head_hash: str | None) -> VerifyReport:
        if not self._broken:
            if head_seq is None:
                self._problem(self._seq + 1, "the source does not state its head")
            elif head_seq > self._seq:
                self._problem(self._seq + 1, f"records missing up to the head at seq {head_seq}")
            elif head_seq < self._seq:
                self._problem(head_seq + 1, f"records beyond the head at seq {head_seq}")
            elif head_hash != self._hash:
                self._problem(head_seq, "head hash does not match the last record")
            beyond = [seq for seq in self._checkpoints if seq > self._seq]
            if beyond:
                self._problem(self._seq + 1, f"a checkpoint covers seq {min(beyond)}, not held")
        first = min(self._problems) if self._problems else None
        return VerifyReport(
            valid=first is None,
            checked=self._checked,
            head_seq=self._seq,
            head_hash=self._hash,
            first_bad_seq=first[0] if first else None,
            reason=first[1] if first else None,
            checkpoints=len(self._checkpoints),
            anchors=self._anchors,
            keys_source=self.keys_source,
            retention_floor=self.retention_floor,
        )

    def _break(self, seq: int, reason: str) -> None:
        self._broken = True
        self._problem(seq, reason)

    def _problem(self, seq: int, reason: str) -> None:
        self._problems.append((seq, reason))


async def load_public_keys(conn: AsyncConnection) -> dict[str, bytes]:
    """Return the receipt public keys by key id from the ``receipt_keys`` table, if any."""
    has_table = await conn.run_sync(lambda sync: inspect(sync).has_table("receipt_keys"))
    if not has_table:
        return {}
    rows = await conn.execute(text("SELECT key_id, public_key FROM receipt_keys"))
    return {str(row.key_id): key_bytes(row.public_key) for row in rows}


async def _rows(conn: AsyncConnection, table: Any, order: Any) -> list[dict[str, Any]]:
    return [dict(row._mapping) for row in await conn.execute(select(table).order_by(order))]


def _floor(retention_floor: datetime | None) -> str | None:
    return format_timestamp(retention_floor) if retention_floor is not None else None


async def verify_connection(
    conn: AsyncConnection,
    public_keys: Mapping[str, bytes] | None = None,
    held: Checkpoint | None = None,
    retention_floor: datetime | None = None,
) -> VerifyReport:
    """Verify the retained chain as seen by ``conn`` (use one snapshot transaction).
    Without ``public_keys`` the keys come from the database itself, and the report says so."""
    source: KeysSource = "pinned" if public_keys is not None else "database"
    keys = dict(public_keys) if public_keys is not None else await load_public_keys(conn)
    verifier = ChainVerifier(keys, keys_source=source, retention_floor=_floor(retention_floor))
    verifier.add_anchors(await _rows(conn, audit_anchors, audit_anchors.c.through_seq))
    verifier.add_checkpoints(await _rows(conn, audit_checkpoints, audit_checkpoints.c.seq))
    if held is not None:
        verifier.add_held_checkpoint(held)
    result = await conn.stream(
        select(audit_events).order_by(audit_events.c.seq).execution_options(yield_per=2000)
    )
    async for row in result.mappings():
        verifier.add_record(row["seq"], row["prev_hash"], row["hash"], fields_from_row(row))
    head = (
        await conn.execute(select(audit_chain_head).where(audit_chain_head.c.id == HEAD_ID))
    ).one_or_none()
    return verifier.finish(
        head.seq if head is not None else None, head.hash if head is not None else None
    )


async def verify_database(
    engine: AsyncEngine,
    public_keys: Mapping[str, bytes] | None = None,
    held: Checkpoint | None = None,
    retention_floor: datetime | None = None,
) -> VerifyReport:
    """Verify the chain stored behind ``engine``, reading one consistent snapshot; with
    ``held``, also prove that the current head extends that earlier checkpoint; with
    ``retention_floor``, refuse anchors that pruned records younger than it."""
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        else:
            await conn.exec_driver_sql("BEGIN")
        return await verify_connection(conn, public_keys, held, retention_floor)


def verify_export_lines(
    lines: Iterable[str],
    trusted_keys: Mapping[str, bytes] | None = None,
    held: Checkpoint | None = None,
    retention_floor: datetime | None = None,
) -> VerifyReport:
    """Verify an export (see ``audit.export``). ``trusted_keys``, when given, replace the
    keys the export carries, so an auditor can pin the keys they hold; ``held`` is an
    earlier checkpoint the exported chain must extend; ``retention_floor`` as for
    ``verify_database``."""
    keys: dict[str, bytes] = dict(trusted_keys or {})
    verifier: ChainVerifier | None = None
    anchors: list[dict[str, Any]] = []
    checkpoints: list[dict[str, Any]] = []
    head: dict[str, Any] | None = None

    def started() -> ChainVerifier:
        nonlocal verifier
        if verifier is None:
            verifier = ChainVerifier(
                keys,
                keys_source="pinned" if trusted_keys is not None else "export",
                retention_floor=_floor(retention_floor),
            )
            verifier.add_anchors(anchors)
            verifier.add_checkpoints(checkpoints)
            if held is not None:
                verifier.add_held_checkpoint(held)
        return verifier

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            kind = item["type"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"export line {number} is not an audit export item") from exc
        if kind == "key" and trusted_keys is None:
            keys[item["key_id"]] = key_bytes(item["public_key"])
        elif kind == "anchor":
            anchors.append(item)
        elif kind == "checkpoint":
            checkpoints.append(item)
        elif kind == "event":
            fields = {name: item.get(name) for name in EVENT_FIELDS}
            seq, prev_hash, stored_hash = (item.get(k) for k in ("seq", "prev_hash", "hash"))
            if not (
                isinstance(seq, int) and isinstance(prev_hash, str) and isinstance(stored_hash, str)
            ):
                started().add_malformed(f"export line {number} lacks seq, prev_hash or hash")
                continue
            started().add_record(seq, prev_hash, stored_hash, fields)
        elif kind == "head":
            head = item
    return started().finish(
        head["seq"] if head is not None else None, head["hash"] if head is not None else None
    )
