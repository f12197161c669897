"""The hash chain, shared by the writer and every verifier:
``hash_n = SHA-256(hash_{n-1} || canonical_json(record_n))``.

``hash_{n-1}`` enters as its 32 raw bytes; ``record_n`` is the event's fields plus its
``seq``, so moving a record to another position changes its hash. The first record
chains from ``GENESIS_HASH``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

GENESIS_HASH = "00" * 32


def canonical_json(value: Any) -> str:
    """Return the canonical JSON text: sorted keys, no spaces, non-ASCII kept as UTF-8."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def canonical_bytes(value: Any) -> bytes:
    """Return the UTF-8 bytes of ``canonical_json(value)``: what gets hashed and signed."""
    return canonical_json(value).encode("utf-8")


def record_for(seq: int, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return the hashed record of an event: its fields plus its position."""
    return {**fields, "seq": seq}


def chain_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    """Return the hex hash of ``record`` chained onto ``prev_hash`` (hex)."""
    digest = hashlib.sha256(bytes.fromhex(prev_hash))
    digest.update(canonical_bytes(record))
    return digest.hexdigest()
