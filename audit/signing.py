"""Signatures over the log.

The tree's checkpoints and retention anchors are C2SP signed notes by the log key
(Ed25519). The signer is handed in by the caller, so the audit package never holds a
private key of its own. The first release's checkpoints were BLS signatures by the
receipt key (blspy AugSchemeMPL); ``bls_signature_valid`` still verifies them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from blspy import AugSchemeMPL, G1Element, G2Element

from audit.chain import canonical_json
from audit.note import NoteSigner


class LogSigner(Protocol):
    """The log key: ``origin`` is its name and the log's origin line; ``key_id`` names the
    stored key; ``sign_note`` returns the C2SP signed note of ``text``. ``current()`` is
    one immutable (key id, key) pair, the one in use now: a rotation may swap the key of a
    signer, so whoever stores a key id beside a signature signs through that pair."""

    key_id: str
    origin: str

    def sign_note(self, text: str) -> str: ...

    def current(self) -> LogSigner: ...


@dataclass(frozen=True)
class NoteLogSigner:
    """A LogSigner over one Ed25519 note key."""

    signer: NoteSigner
    key_id: str

    @property
    def origin(self) -> str:
        return self.signer.name

    @property
    def vkey(self) -> str:
        return self.signer.vkey

    def sign_note(self, text: str) -> str:
        return self.signer.sign(text)

    def current(self) -> NoteLogSigner:
        return self

    @classmethod
    def generate(cls, origin: str) -> NoteLogSigner:
        """A fresh key (tests, benchmarks); its key id is its verifier key."""
        signer = NoteSigner.generate(origin)
        return cls(signer, signer.vkey)


def anchor_text(
    through_seq: int,
    tree_size: int,
    pruned: int,
    newest_occurred_at: str,
    issued_at: str,
    compact: str,
) -> str:
    """The signed text of a retention anchor: one line of canonical JSON, typed so that it
    never reads as a checkpoint (whose first line is the origin)."""
    statement = {
        "type": "audit_anchor",
        "through_seq": through_seq,
        "tree_size": tree_size,
        "pruned": pruned,
        "newest_occurred_at": newest_occurred_at,
        "issued_at": issued_at,
        "compact": compact,
    }
    return canonical_json(statement) + "\n"


def key_bytes(value: bytes | bytearray | memoryview | str) -> bytes:
    """Return raw key or signature bytes from bytes or (0x-prefixed) hex text."""
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x"))
    return bytes(value)


def legacy_checkpoint_message(seq: int, head_hash: str, issued_at: str) -> str:
    """The signed text of a first-release checkpoint: canonical JSON of {seq, hash, issued_at}."""
    return canonical_json({"seq": seq, "hash": head_hash, "issued_at": issued_at})


def bls_signature_valid(
    public_keys: Mapping[str, bytes], key_id: str, message: str, signature: str
) -> bool:
    """True when ``signature`` (hex) is BLS key ``key_id``'s signature over ``message``."""
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
