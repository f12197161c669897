"""JSON Lines export of the audit log, carrying everything offline verification needs.

Format ``kzg-gateway-audit-export``, version 2 (the Merkle tree log). UTF-8, one JSON
object per line, each line ending in a newline; every object has a ``type`` and is
written as canonical JSON (sorted keys, no spaces, non-ASCII kept). All of it is read
from one database snapshot (REPEATABLE READ on PostgreSQL, one transaction on SQLite).
Lines, in this order:

1. ``header``: ``{"type": "header", "format": "kzg-gateway-audit-export", "version": 2,
   "exported_at": <canonical UTC timestamp>, "origin": <the log's origin line, from the
   latest signed tree head, or null while there is none>}``.
2. ``log_key``, one per log key (Ed25519, current and retired, oldest first):
   ``{"key_id", "vkey" (C2SP verifier key <name>+<8 hex>+<base64(0x01 || key)>),
   "status" ("current" | "retired"), "not_before", "not_after" (null while current)}``.
3. ``key``, one per BLS receipt key of the first release, by key id:
   ``{"key_id", "public_key" (hex)}``; they verify the legacy checkpoints.
4. ``legacy_chain`` (once, when the log had a first-release hash chain):
   ``{"through_seq", "hash" (hex)}``: that chain's head when the tree took over.
5. ``legacy_checkpoint``, one per BLS checkpoint of that chain, by seq:
   ``{"seq", "hash", "issued_at", "key_id", "message", "signature"}``.
6. ``anchor``, one per retention anchor, by ``through_seq``: ``{"through_seq",
   "tree_size", "pruned", "newest_occurred_at", "issued_at", "compact" (the base64
   hashes of the pruned prefix's compact range, single spaces between them), "key_id",
   "note" (the log key's signed note of ``audit.signing.anchor_text`` of the columns)}``.
7. ``event``, one per retained record in seq order, up to the latest signed tree head:
   ``{"type": "event", "seq": n, "entry": "<entry>"}``, where the entry is the record's
   canonical JSON text exactly as the tree hashes it (leaf index ``seq - 1``, leaf hash
   ``SHA-256(0x00 || UTF-8 entry)``).
8. ``checkpoint``, the last line: ``{"size", "note", "issued_at"}``, the latest signed
   tree head (a C2SP checkpoint signed note) whose size the events end at, and when it
   was stored (a retired key's ``not_after`` bounds what it can have signed);
   ``{"size": 0, "note": null, "issued_at": null}`` for an empty log. A truncated file
   lacks it, and a rewritten tail no longer leads to its root.

A verifier (``audit.verify.verify_export_lines``) rebuilds the tree from the newest
anchor's compact range and the entries, and checks the roots and every signature. It
takes anchors and checkpoints wherever their lines stand (a file is read twice): every
checkpoint's root is compared at its size, and the events must end at the largest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import canonical_json
from audit.checkpoints import legacy_checkpoints
from audit.events import format_timestamp
from audit.log import latest_tree_head
from audit.models import (
    StoredRow,
    audit_anchors,
    audit_events,
    audit_legacy_chain,
    entry_from_row,
)
from audit.note import NoteError, NoteVerifier, parse_note
from audit.tlog import parse_checkpoint
from audit.verify import (
    EXPORT_FORMAT,
    EXPORT_VERSION,
    begin_snapshot,
    load_public_keys,
    log_key_rows,
)

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "export_lines"]

_PAGE = 5000


def _line(kind: str, values: StoredRow) -> str:
    return canonical_json({"type": kind, **values}) + "\n"


def _given_log_key(vkey: str) -> dict[str, Any]:
    NoteVerifier.from_vkey(vkey)  # refuses anything that is not a verifier key
    return {
        "key_id": vkey,
        "vkey": vkey,
        "status": "current",
        "not_before": None,
        "not_after": None,
    }


def _origin(note: str) -> str | None:
    try:
        return parse_checkpoint(parse_note(note).text).origin
    except NoteError:
        return None


async def export_lines(
    engine: AsyncEngine,
    now: datetime,
    public_keys: Mapping[str, bytes] | None = None,
    log_keys: Iterable[str] | None = None,
) -> AsyncIterator[str]:
    """Yield the export line by line (each ends with a newline). ``public_keys`` (legacy
    BLS keys by id) and ``log_keys`` (verifier keys) replace the keys read from the
    database, for a database that does not hold them."""
    async with engine.connect() as conn:
        await begin_snapshot(conn)
        latest = await latest_tree_head(conn)
        yield _line(
            "header",
            {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "exported_at": format_timestamp(now),
                "origin": _origin(latest.note) if latest is not None else None,
            },
        )
        if log_keys is not None:
            key_rows = [_given_log_key(vkey) for vkey in log_keys]
        else:
            key_rows = await log_key_rows(conn)
        for key_row in key_rows:
            yield _line("log_key", key_row)
        keys = dict(public_keys) if public_keys is not None else await load_public_keys(conn)
        for key_id in sorted(keys):
            yield _line("key", {"key_id": key_id, "public_key": keys[key_id].hex()})
        legacy = (await conn.execute(select(audit_legacy_chain))).first()
        if legacy is not None and legacy.through_seq > 0:
            yield _line("legacy_chain", {"through_seq": legacy.through_seq, "hash": legacy.hash})
        for checkpoint in await legacy_checkpoints(conn):
            yield _line("legacy_checkpoint", checkpoint.to_dict())
        anchors = await conn.execute(select(audit_anchors).order_by(audit_anchors.c.through_seq))
        for anchor in anchors.mappings():
            yield _line("anchor", anchor)
        size = latest.size if latest is not None else 0
        last = 0
        while last < size:
            # Keyset pages within the snapshot: no server-side cursor held across yields.
            rows = (
                await conn.execute(
                    select(audit_events)
                    .where(audit_events.c.seq > last, audit_events.c.seq <= size)
                    .order_by(audit_events.c.seq)
                    .limit(_PAGE)
                )
            ).mappings()
            count = 0
            for row in rows:
                seq = row["seq"]
                yield _line("event", {"seq": seq, "entry": entry_from_row(row)})
                last = seq
                count += 1
            if count < _PAGE:
                break
        yield _line(
            "checkpoint",
            {
                "size": size,
                "note": latest.note if latest is not None else None,
                "issued_at": latest.issued_at if latest is not None else None,
            },
        )
