"""Transparency-log texts: C2SP checkpoints (c2sp.org/tlog-checkpoint) and inclusion proofs
in the c2sp.org/tlog-proof@v1 format, over the RFC 9162 Merkle tree of the audit log.

A tlog proof is a self-contained receipt: anyone holding the log's verifier key can check that an
entry is in the tree the log signed, without asking the log.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass

from audit.merkle import leaf_hash, verify_inclusion
from audit.note import NoteError, NoteVerifier, b64decode_strict, open_note, parse_note

__all__ = [
    "HASH_SIZE",
    "MAX_TREE_SIZE",
    "PROOF_HEADER",
    "Checkpoint",
    "InclusionError",
    "ReceiptCheck",
    "TlogProof",
    "open_checkpoint",
    "parse_checkpoint",
    "parse_tlog_proof",
    "verify_inclusion_proof",
]

HASH_SIZE = 32
# Sizes and indexes are int64 in the Go implementation; larger values could not round-trip there.
MAX_TREE_SIZE = 2**63 - 1
# An inclusion proof in a tree of at most MAX_TREE_SIZE leaves has at most 63 hashes.
MAX_PROOF_HASHES = 63
PROOF_HEADER = "c2sp.org/tlog-proof@v1"

# ASCII decimal without sign or leading zeroes (re's \d would accept other scripts' digits).
_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class InclusionError(NoteError):
    """A well-formed, properly signed proof that does not prove the entry's inclusion."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _decimal(text: str, what: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise NoteError(f"{what}: not a decimal number without leading zeroes")
    value = int(text)
    if value > MAX_TREE_SIZE:
        raise NoteError(f"{what}: larger than 2^63 - 1")
    return value


def _hash(text: str, what: str) -> bytes:
    raw = b64decode_strict(text, what)
    if len(raw) != HASH_SIZE:
        raise NoteError(f"{what}: not a {HASH_SIZE}-byte hash")
    return raw


def _check_line(line: str, what: str) -> None:
    """A checkpoint line: non-empty, one line, and allowed in a signed note."""
    if not isinstance(line, str) or not line:
        raise NoteError(f"checkpoint {what}: empty")
    if any(ch < " " for ch in line):
        raise NoteError(f"checkpoint {what}: contains a newline or control character")
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteError(f"checkpoint {what}: not valid UTF-8") from None


@dataclass(frozen=True)
class Checkpoint:
    """A signed tree head: the log's origin line, tree size and RFC 9162 root hash.

    Extension lines are opaque; the spec discourages them (monitors cannot audit them).
    """

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_line(self.origin, "origin")
        if isinstance(self.size, bool) or not isinstance(self.size, int):
            raise NoteError("checkpoint size: not an integer")
        if not 0 <= self.size <= MAX_TREE_SIZE:
            raise NoteError("checkpoint size: out of range")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise NoteError(f"checkpoint root: not a {HASH_SIZE}-byte hash")
        object.__setattr__(self, "extensions", tuple(self.extensions))
        for line in self.extensions:
            _check_line(line, "extension line")

    def text(self) -> str:
        """The note text: origin, size, base64 root and extension lines, each newline-ended."""
        lines = [self.origin, str(self.size), _b64(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint note text: at least three non-empty lines, each ending in a newline."""
    if not text.endswith("\n"):
        raise NoteError("checkpoint: must end in a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError("checkpoint: needs origin, tree size and root hash lines")
    if "" in lines:
        raise NoteError("checkpoint: empty line")
    origin, size, root, *extensions = lines
    return Checkpoint(
        origin,
        _decimal(size, "checkpoint size"),
        _hash(root, "checkpoint root"),
        tuple(extensions),
    )


def _open_checkpoint(
    signed_note: str, verifiers: Iterable[NoteVerifier], origin: str | None
) -> tuple[Checkpoint, list[NoteVerifier]]:
    # The signature is checked before the text is interpreted: unverified text must be ignored.
    text, signers = open_note(signed_note, verifiers)
    checkpoint = parse_checkpoint(text)
    if origin is not None and checkpoint.origin != origin:
        raise NoteError(f"checkpoint origin {checkpoint.origin!r} is not {origin!r}")
    return checkpoint, signers


def open_checkpoint(
    signed_note: str, verifiers: Iterable[NoteVerifier], origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint with the log's keys and parse it; check the origin if given.

    The spec only says the key name SHOULD match the origin, so the name is not compared; pass
    ``origin`` to pin the log identity.
    """
    return _open_checkpoint(signed_note, verifiers, origin)[0]


@dataclass(frozen=True)
class TlogProof:
    """A c2sp.org/tlog-proof@v1: entry index, inclusion proof (leaf level first), the signed
    checkpoint note verbatim, and optional unauthenticated extra data."""

    index: int
    hashes: tuple[bytes, ...]
    checkpoint: str
    extra: bytes | None = None

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int):
            raise NoteError("proof index: not an integer")
        if not 0 <= self.index <= MAX_TREE_SIZE:
            raise NoteError("proof index: out of range")
        object.__setattr__(self, "hashes", tuple(self.hashes))
        if len(self.hashes) > MAX_PROOF_HASHES:
            raise NoteError(f"proof: more than {MAX_PROOF_HASHES} hashes")
        for node in self.hashes:
            if not isinstance(node, bytes) or len(node) != HASH_SIZE:
                raise NoteError(f"proof: not a {HASH_SIZE}-byte hash")
        # "If no extra data is present, this line is omitted": empty extra data has no spelling.
        if self.extra is not None and (not isinstance(self.extra, bytes) or not self.extra):
            raise NoteError("proof extra: must be None or non-empty bytes")
        parse_checkpoint(parse_note(self.checkpoint).text)

    def text(self) -> str:
        lines = [PROOF_HEADER]
        if self.extra is not None:
            lines.append(f"extra {_b64(self.extra)}")
        lines.append(f"index {self.index}")
        lines.extend(_b64(node) for node in self.hashes)
        return "".join(line + "\n" for line in lines) + "\n" + self.checkpoint


def parse_tlog_proof(text: str) -> TlogProof:
    """Parse a tlog-proof@v1 text; the embedded checkpoint is checked for syntax, not signature."""
    lines = iter(text.split("\n"))
    if next(lines) != PROOF_HEADER:
        raise NoteError(f"proof: the first line must be {PROOF_HEADER}")
    line = next(lines, None)
    extra = None
    if line is not None and line.startswith("extra "):
        extra = b64decode_strict(line[len("extra ") :], "proof extra")
        if not extra:
            raise NoteError("proof extra: empty (the line must be omitted instead)")
        line = next(lines, None)
    if line is None or not line.startswith("index "):
        raise NoteError("proof: expected an 'index <n>' line")
    index = _decimal(line[len("index ") :], "proof index")
    hashes: list[bytes] = []
    for line in lines:
        if not line:
            break
        if len(hashes) == MAX_PROOF_HASHES:
            raise NoteError(f"proof: more than {MAX_PROOF_HASHES} hashes")
        hashes.append(_hash(line, "proof hash"))
    else:
        raise NoteError("proof: no blank line before the checkpoint")
    return TlogProof(index, tuple(hashes), "\n".join(lines), extra)


@dataclass(frozen=True)
class ReceiptCheck:
    """What a verified proof established: the entry's index, the checkpoint and who signed it."""

    index: int
    checkpoint: Checkpoint
    signers: tuple[str, ...]


def verify_inclusion_proof(
    entry: bytes, proof_text: str, verifiers: Iterable[NoteVerifier], origin: str | None = None
) -> ReceiptCheck:
    """Check a tlog proof for ``entry``: the checkpoint's signature (and origin, if given), then
    the RFC 9162 inclusion of the entry's leaf hash under the checkpoint's root."""
    proof = parse_tlog_proof(proof_text)
    checkpoint, signers = _open_checkpoint(proof.checkpoint, verifiers, origin)
    if proof.index >= checkpoint.size:
        raise InclusionError(
            f"inclusion: index {proof.index} is not below the tree size {checkpoint.size}"
        )
    if not verify_inclusion(
        leaf_hash(entry), proof.index, checkpoint.size, proof.hashes, checkpoint.root
    ):
        raise InclusionError(
            f"inclusion: the proof for index {proof.index} does not lead to the root of the "
            f"checkpoint at size {checkpoint.size}"
        )
    return ReceiptCheck(proof.index, checkpoint, tuple(v.name for v in signers))
