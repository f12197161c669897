"""Receipts: what the gateway hands back with every result, and their offline check.

A receipt is ``{"entry", "proof"}``: the logged audit entry (canonical JSON) and its C2SP
tlog-proof against a checkpoint the log signed. Verifying it needs only the log's pinned
verifier keys; this is the same code (``audit.tlog``) the auditor's CLI runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.chain import canonical_json
from audit.note import NoteError, NoteVerifier, open_note
from audit.tlog import (
    PROOF_HEADER,
    Checkpoint,
    TlogProof,
    parse_checkpoint,
    parse_tlog_proof,
    verify_inclusion_proof,
)
from gateway.client._errors import ReceiptError

__all__ = [
    "Receipt",
    "VerifiedReceipt",
    "input_digest",
    "kzg_to_versioned_hash",
    "load_verifiers",
    "open_log_checkpoint",
    "result_digest",
    "verify_receipt",
]

VERSIONED_HASH_VERSION_KZG = b"\x01"
StrPath = str | os.PathLike[str]


def kzg_to_versioned_hash(commitment: bytes) -> bytes:
    """EIP-4844 ``kzg_to_versioned_hash``: ``0x01 || SHA-256(commitment)[1:]``."""
    return VERSIONED_HASH_VERSION_KZG + hashlib.sha256(commitment).digest()[1:]


def input_digest(value: bytes | Sequence[bytes] | Sequence[int]) -> str:
    """SHA-256 (hex) of one input as the audit entry names it: bytes as they are, a list of
    byte strings concatenated, a list of cell indices as 8-byte big-endian integers."""
    digest = hashlib.sha256()
    if isinstance(value, bytes):
        digest.update(value)
    else:
        for item in value:
            digest.update(item.to_bytes(8, "big") if isinstance(item, int) else item)
    return digest.hexdigest()


def result_digest(answer: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of an answer without its ``receipt``."""
    body = {k: v for k, v in answer.items() if k != "receipt"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def load_verifiers(log_keys: Iterable[str | NoteVerifier]) -> tuple[NoteVerifier, ...]:
    """Parse C2SP verifier keys (``<name>+<key id>+<base64 key>``); ValueError if malformed."""
    if isinstance(log_keys, str):
        raise TypeError("log_keys is a list of verifier keys, not one string")
    verifiers = []
    for key in log_keys:
        if isinstance(key, NoteVerifier):
            verifiers.append(key)
            continue
        try:
            verifiers.append(NoteVerifier.from_vkey(key.strip()))
        except NoteError as exc:
            raise ValueError(f"log key {key!r}: {exc}") from None
    return tuple(verifiers)


def _check_origin(checkpoint: Checkpoint, signers: Sequence[str], origin: str | None) -> None:
    """With ``origin`` the checkpoint must be that log's; without, the log is identified
    by its key, whose name must be the checkpoint's origin."""
    if origin is not None and checkpoint.origin != origin:
        raise ReceiptError(f"the checkpoint's origin {checkpoint.origin!r} is not {origin!r}")
    if origin is None and checkpoint.origin not in signers:
        raise ReceiptError(
            f"the checkpoint's origin {checkpoint.origin!r} is not the name of a key that signed it"
        )


def open_log_checkpoint(
    note: str, verifiers: Sequence[NoteVerifier], origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint (C2SP note) with the pinned keys and parse it."""
    try:
        text, signers = open_note(note, verifiers)
        checkpoint = parse_checkpoint(text)
    except NoteError as exc:
        raise ReceiptError(f"the checkpoint does not verify: {exc}") from None
    _check_origin(checkpoint, [v.name for v in signers], origin)
    return checkpoint


@dataclass(frozen=True)
class Receipt:
    """A receipt as the gateway issued it: ``entry`` (canonical JSON text) and ``proof``
    (C2SP tlog-proof text)."""

    entry: str
    proof: str

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Receipt:
        """From ``{"entry", "proof"}``, or from a whole answer that carries ``receipt``."""
        if "receipt" in data and isinstance(data["receipt"], Mapping):
            data = data["receipt"]
        entry, proof = data.get("entry"), data.get("proof")
        if not isinstance(entry, str) or not isinstance(proof, str):
            raise ReceiptError('a receipt holds the strings "entry" and "proof"')
        return cls(entry, proof)

    def to_dict(self) -> dict[str, str]:
        return {"entry": self.entry, "proof": self.proof}

    def save(self, path: StrPath) -> Path:
        """Write one self-contained ``.tlog-proof`` file: the proof with the entry as its
        ``extra`` data (C2SP tlog-proof's application-specific line; unauthenticated by
        itself, the inclusion proof is what authenticates the entry)."""
        try:
            proof = parse_tlog_proof(self.proof)
            text = TlogProof(
                proof.index, proof.hashes, proof.checkpoint, self.entry.encode("utf-8")
            ).text()
        except NoteError as exc:
            raise ReceiptError(f"cannot save a malformed receipt: {exc}") from None
        target = Path(path)
        target.write_text(text, encoding="utf-8", newline="")
        return target

    def save_json(self, path: StrPath) -> Path:
        """Write ``{"entry", "proof"}`` as JSON: the form ``kzg-gateway audit
        verify-receipt FILE --key VKEY`` reads."""
        target = Path(path)
        target.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: StrPath) -> Receipt:
        """Read what ``save`` or ``save_json`` wrote (or a whole saved answer)."""
        text = Path(path).read_text(encoding="utf-8")
        if text.startswith(PROOF_HEADER + "\n"):
            return cls._from_tlog_proof(text)
        try:
            data = json.loads(text)
        except ValueError:
            raise ReceiptError(f"{path}: neither a tlog-proof nor JSON") from None
        if not isinstance(data, dict):
            raise ReceiptError(f"{path}: expected a JSON object")
        return cls.from_dict(data)

    @classmethod
    def _from_tlog_proof(cls, text: str) -> Receipt:
        try:
            proof = parse_tlog_proof(text)
        except NoteError as exc:
            raise ReceiptError(f"malformed tlog-proof: {exc}") from None
        if proof.extra is None:
            raise ReceiptError("the tlog-proof carries no entry (no extra line)")
        try:
            entry = proof.extra.decode("utf-8")
        except UnicodeDecodeError:
            raise ReceiptError("the tlog-proof's extra data is not a UTF-8 entry") from None
        # The proof as the gateway issued it: the same text without the extra line.
        return cls(entry, TlogProof(proof.index, proof.hashes, proof.checkpoint).text())


@dataclass(frozen=True)
class VerifiedReceipt:
    """What a verified receipt proves: the entry (parsed) is leaf ``index`` of the tree
    ``checkpoint`` that ``signers`` signed (``checkpoint_note`` is the signed text)."""

    receipt: Receipt
    index: int
    checkpoint: Checkpoint
    checkpoint_note: str
    signers: tuple[str, ...]
    entry: dict[str, Any] = field(repr=False)

    @property
    def request_id(self) -> str | None:
        return self.entry.get("request_id")

    @property
    def action(self) -> str | None:
        return self.entry.get("action")

    @property
    def seq(self) -> int:
        return int(self.entry["seq"])


def _verify(
    receipt: Receipt, verifiers: Sequence[NoteVerifier], origin: str | None
) -> VerifiedReceipt:
    try:
        check = verify_inclusion_proof(receipt.entry.encode("utf-8"), receipt.proof, verifiers)
        note = parse_tlog_proof(receipt.proof).checkpoint
    except NoteError as exc:
        raise ReceiptError(f"the receipt does not verify: {exc}") from None
    _check_origin(check.checkpoint, check.signers, origin)
    try:
        entry = json.loads(receipt.entry)
    except ValueError:
        raise ReceiptError("the entry is not JSON") from None
    if not isinstance(entry, dict):
        raise ReceiptError("the entry is not a JSON object")
    # One text per record: a non-canonical entry (duplicate keys, say) could read one way
    # here and another way to a different parser.
    if canonical_json(entry) != receipt.entry:
        raise ReceiptError("the entry is not canonical JSON")
    if entry.get("seq") != check.index + 1:
        raise ReceiptError(
            f"the entry says seq {entry.get('seq')!r}, but the proof is for index {check.index}"
        )
    return VerifiedReceipt(receipt, check.index, check.checkpoint, note, check.signers, entry)


def verify_receipt(
    receipt: Receipt | Mapping[str, Any],
    log_keys: Iterable[str | NoteVerifier],
    origin: str | None = None,
    *,
    answer: Mapping[str, Any] | None = None,
    request_id: str | None = None,
) -> VerifiedReceipt:
    """Verify a receipt offline against pinned log keys; raise ReceiptError if it fails.

    Checks the checkpoint's signature (and ``origin`` when given; otherwise that the
    origin is the name of a key that signed), the entry's inclusion under the checkpoint's
    root, and that the entry is the canonical record at ``seq = index + 1``. With
    ``answer`` (the body the receipt came with), the entry's ``result_digest`` must be its
    digest; with ``request_id``, the entry must be that request's.
    """
    if not isinstance(receipt, Receipt):
        receipt = Receipt.from_dict(receipt)
    verifiers = load_verifiers(log_keys)
    if not verifiers:
        raise ValueError("verify_receipt needs at least one pinned log key")
    verified = _verify(receipt, verifiers, origin)
    entry = verified.entry
    if request_id is not None and entry.get("request_id") != request_id:
        raise ReceiptError(
            f"the entry is for request {entry.get('request_id')!r}, not {request_id!r}",
            request_id=request_id,
        )
    if answer is not None and entry.get("result_digest") != result_digest(answer):
        raise ReceiptError(
            "the answer is not the result its audit entry logged (result_digest differs)",
            request_id=entry.get("request_id"),
        )
    return verified
