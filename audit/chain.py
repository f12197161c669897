"""Audit entries: the canonical JSON bytes of a record (its fields plus ``seq``), which
are the leaves of the Merkle tree, and the first release's hash chain over the same bytes
(``hash_n = SHA-256(hash_{n-1} || entry_n)``, ``hash_{n-1}`` as 32 raw bytes, from
``GENESIS_HASH``), still used to verify that release's BLS checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

GENESIS_HASH = "00" * 32
# The record key that sorts right after "seq": a record's canonical JSON text is split
# there so that ``seq`` (known only under the head lock) is spliced in, not re-serialised.
_AFTER_SEQ = ',"tls_version":'


# One encoder for every call: json.dumps would build a new one each time, which costs
# more than encoding a record.
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def canonical_json(value: Any) -> str:
    """Return the canonical JSON text: sorted keys, no spaces, non-ASCII kept as UTF-8."""
    return _ENCODER.encode(value)


def canonical_bytes(value: Any) -> bytes:
    """Return the UTF-8 bytes of ``canonical_json(value)``: what gets hashed and signed."""
    return canonical_json(value).encode("utf-8")


def record_for(seq: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return the logged record of an event: its fields plus its position."""
    return {**fields, "seq": seq}


class EntryTemplate:
    """An event's entry before its seq is known: ``entry(seq)`` equals
    ``canonical_json(record_for(seq, fields))``. ``tls_version`` is the last top-level key
    and sorts right after ``seq``, and no JSON string holds an unescaped quote, so the last
    ``,"tls_version":`` is where ``seq`` goes."""

    __slots__ = ("_head", "_tail")

    def __init__(self, fields: Mapping[str, Any]) -> None:
        text = canonical_json(fields)
        cut = text.rfind(_AFTER_SEQ)
        if cut < 0 or "seq" in fields:
            raise ValueError("an audit record needs tls_version and must not carry seq")
        self._head, self._tail = text[:cut], text[cut:]

    def entry(self, seq: int) -> str:
        return f'{self._head},"seq":{seq}{self._tail}'


def chain_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    """Return the hex hash of ``record`` chained onto ``prev_hash`` (hex): the first
    release's chain, kept to verify its checkpoints."""
    digest = hashlib.sha256(bytes.fromhex(prev_hash))
    digest.update(canonical_bytes(record))
    return digest.hexdigest()
