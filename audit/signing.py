"""Signed statements about the chain (checkpoints and retention anchors).

They are signed by the gateway's receipt key (blspy AugSchemeMPL, like receipts). The
signer is handed in by the caller, so the audit package never holds a private key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from blspy import AugSchemeMPL, G1Element, G2Element

from audit.chain import canonical_json


class Signer(Protocol):
    """The receipt signer: ``sign`` returns an AugSchemeMPL signature over ``message``."""

    key_id: str
    public_key: Any

    def sign(self, message: bytes) -> bytes: ...


def key_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    """Return raw key or signature bytes from bytes or (0x-prefixed) hex text."""
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x"))
    return bytes(value)


def checkpoint_message(seq: int, head_hash: str, issued_at: str) -> str:
    """Return the signed text of a checkpoint: canonical JSON of {seq, hash, issued_at}."""
    return canonical_json({"seq": seq, "hash": head_hash, "issued_at": issued_at})


def anchor_message(
    through_seq: int,
    head_hash: str,
    checkpoint_seq: int,
    pruned: int,
    issued_at: str,
    newest_occurred_at: str | None = None,
) -> str:
    """Return the signed text of a retention anchor (typed, so it never reads as a checkpoint).

    ``newest_occurred_at`` (the newest pruned record's time) lets a verifier check the
    range's age; anchors written before it existed sign without it."""
    statement: dict[str, Any] = {
        "type": "audit_anchor",
        "through_seq": through_seq,
        "hash": head_hash,
        "checkpoint_seq": checkpoint_seq,
        "pruned": pruned,
        "issued_at": issued_at,
    }
    if newest_occurred_at is not None:
        statement["newest_occurred_at"] = newest_occurred_at
    return canonical_json(statement)


def sign_message(signer: Signer, message: str) -> str:
    """Return the hex signature of ``message`` (its UTF-8 bytes) by ``signer``."""
    return key_bytes(signer.sign(message.encode("utf-8"))).hex()


def signature_valid(
    public_keys: Mapping[str, bytes], key_id: str, message: str, signature: str
) -> bool:
    """True when ``signature`` (hex) is key ``key_id``'s signature over ``message``."""
    public_key = public_keys.get(key_id)
    if public_key is None:
        return False
    try:
        return bool(
            AugSchemeMPL.verify(
                G1Element.from_bytes(public_key),
                message.encode("utf-8"),
                G2Element.from_bytes(key_bytes(signature)),
            )
        )
    except (ValueError, RuntimeError):
        return False
