"""C2SP signed notes (c2sp.org/signed-note) with Ed25519 keys.

A signed note is a text ending in a newline, a blank line, then one or more signature lines
``— <key name> base64(key ID || signature)``. The audit log signs its checkpoints as notes so that
any verifier of the format (Go's ``golang.org/x/mod/sumdb/note``, witnesses, monitors) can check
them; parsing is strict because a note is only trusted after its signature is checked, and every
accepted variation is a place where two implementations could disagree.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "ALG_ED25519",
    "MAX_SIGNATURES",
    "Note",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "Signature",
    "add_signature",
    "b64decode_strict",
    "check_key_name",
    "key_hash",
    "open_note",
    "parse_note",
]

ALG_ED25519 = 0x01
# The spec leaves the cap to verifiers ("SHOULD apply a maximum limit ... MUST accept at least up
# to 16 signatures"); 100 leaves room for many witnesses while bounding the work per note.
MAX_SIGNATURES = 100

_SIG_PREFIX = "\u2014 "  # em dash, space
_SKEY_PREFIX = "PRIVATE+KEY+"
_KEY_ID_SIZE = 4
_ED25519_KEY_SIZE = 32
_ED25519_SIG_SIZE = 64
_HEX = frozenset("0123456789abcdef")
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f]")  # ASCII controls other than newline


class NoteError(ValueError):
    """A malformed or unverifiable note, key, checkpoint or proof text."""


def b64decode_strict(text: str, what: str) -> bytes:
    """Decode standard padded base64 (RFC 4648 section 4), refusing any other spelling.

    Non-canonical encodings (stray bits in the padding, whitespace, URL alphabet) are refused so
    that one value has exactly one accepted text.
    """
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise NoteError(f"{what}: not standard base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise NoteError(f"{what}: not canonical base64")
    return raw


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _check_chars(text: str, what: str) -> None:
    """Notes MUST be valid UTF-8 with no ASCII control character other than newline."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteError(f"{what}: not valid UTF-8") from None
    found = _CONTROL.search(text)
    if found:
        raise NoteError(f"{what}: control character U+{ord(found.group()):04X}")


def check_key_name(name: str) -> None:
    """Key names MUST be non-empty with no Unicode space or '+' (and, being note text, no
    control characters)."""
    if not isinstance(name, str) or not name:
        raise NoteError("key name: empty")
    _check_chars(name, "key name")
    if "+" in name or any(ch.isspace() for ch in name):
        raise NoteError(f"key name {name!r}: contains a space or '+'")


def _check_text(text: str) -> None:
    """A note text is non-empty, ends in a newline and obeys the note character rules."""
    if not isinstance(text, str) or not text.endswith("\n"):
        raise NoteError("note text: must be non-empty and end in a newline")
    _check_chars(text, "note text")


def key_hash(name: str, public_key: bytes) -> bytes:
    """The Ed25519 key ID: SHA-256(key name || 0x0A || 0x01 || public key)[:4]."""
    data = name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + bytes(public_key)
    return hashlib.sha256(data).digest()[:_KEY_ID_SIZE]


def _parse_key_id(text: str, what: str) -> bytes:
    # "the fixed length lowercase Base 16 encoding": exactly eight lowercase hex digits.
    if len(text) != 2 * _KEY_ID_SIZE or not set(text) <= _HEX:
        raise NoteError(f"{what}: key ID must be 8 lowercase hex digits")
    return bytes.fromhex(text)


def _parse_key_data(text: str, what: str) -> bytes:
    """Decode base64(signature type || key) and return the Ed25519 key bytes."""
    raw = b64decode_strict(text, what)
    if not raw or raw[0] != ALG_ED25519:
        kind = f"0x{raw[0]:02x}" if raw else "missing"
        raise NoteError(f"{what}: unsupported signature type {kind}")
    if len(raw) != 1 + _ED25519_KEY_SIZE:
        raise NoteError(f"{what}: Ed25519 key must be {_ED25519_KEY_SIZE} bytes")
    return raw[1:]


class NoteVerifier:
    """An Ed25519 note verifier key: checks signatures by one (name, key ID)."""

    __slots__ = ("_key", "key_hash", "name", "public_key")

    def __init__(self, name: str, public_key: bytes) -> None:
        check_key_name(name)
        public_key = bytes(public_key)
        if len(public_key) != _ED25519_KEY_SIZE:
            raise NoteError(f"verifier key: Ed25519 key must be {_ED25519_KEY_SIZE} bytes")
        self.name = name
        self.public_key = public_key
        self.key_hash = key_hash(name, public_key)
        self._key = Ed25519PublicKey.from_public_bytes(public_key)

    @classmethod
    def from_vkey(cls, vkey: str) -> NoteVerifier:
        """Parse ``<name>+<hex key ID>+<base64(0x01 || public key)>``; the ID must match."""
        # The name and key ID hold no '+'; the base64 key data may.
        parts = vkey.split("+", 2)
        if len(parts) != 3:
            raise NoteError("verifier key: expected <name>+<key ID>+<key data>")
        name, hex_id, data = parts
        check_key_name(name)
        key_id = _parse_key_id(hex_id, "verifier key")
        verifier = cls(name, _parse_key_data(data, "verifier key"))
        if verifier.key_hash != key_id:
            raise NoteError("verifier key: key ID does not match the name and key")
        return verifier

    @property
    def vkey(self) -> str:
        return f"{self.name}+{self.key_hash.hex()}+{_b64(bytes([ALG_ED25519]) + self.public_key)}"

    def verify(self, text: str, signature: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of the UTF-8 ``text``."""
        if len(signature) != _ED25519_SIG_SIZE:
            return False
        try:
            self._key.verify(bytes(signature), text.encode("utf-8"))
        except (InvalidSignature, UnicodeEncodeError):
            return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NoteVerifier):
            return NotImplemented
        return (self.name, self.public_key) == (other.name, other.public_key)

    def __hash__(self) -> int:
        return hash((self.name, self.public_key))

    def __repr__(self) -> str:
        return f"NoteVerifier({self.vkey!r})"


class NoteSigner:
    """An Ed25519 note signing key. Its repr never shows the private key."""

    __slots__ = ("_key", "_seed", "key_hash", "name", "public_key")

    def __init__(self, name: str, private_key: bytes) -> None:
        check_key_name(name)
        seed = bytes(private_key)
        if len(seed) != _ED25519_KEY_SIZE:
            raise NoteError(f"signer key: Ed25519 seed must be {_ED25519_KEY_SIZE} bytes")
        self._seed = seed
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.name = name
        self.public_key = self._key.public_key().public_bytes_raw()
        self.key_hash = key_hash(name, self.public_key)

    @classmethod
    def generate(cls, name: str) -> NoteSigner:
        return cls(name, Ed25519PrivateKey.generate().private_bytes_raw())

    @classmethod
    def from_skey(cls, skey: str) -> NoteSigner:
        """Parse ``PRIVATE+KEY+<name>+<hex key ID>+<base64(0x01 || seed)>`` (the Go format)."""
        if not skey.startswith(_SKEY_PREFIX):
            raise NoteError("signer key: must start with PRIVATE+KEY+")
        parts = skey[len(_SKEY_PREFIX) :].split("+", 2)
        if len(parts) != 3:
            raise NoteError("signer key: expected PRIVATE+KEY+<name>+<key ID>+<key data>")
        name, hex_id, data = parts
        check_key_name(name)
        key_id = _parse_key_id(hex_id, "signer key")
        signer = cls(name, _parse_key_data(data, "signer key"))
        if signer.key_hash != key_id:
            raise NoteError("signer key: key ID does not match the name and key")
        return signer

    @property
    def skey(self) -> str:
        data = _b64(bytes([ALG_ED25519]) + self._seed)
        return f"{_SKEY_PREFIX}{self.name}+{self.key_hash.hex()}+{data}"

    @property
    def vkey(self) -> str:
        return self.verifier().vkey

    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.name, self.public_key)

    def signature_line(self, text: str) -> str:
        """The line ``— <name> base64(key ID || Ed25519 signature of text)``, newline-ended."""
        _check_text(text)
        signature = self._key.sign(text.encode("utf-8"))
        return f"{_SIG_PREFIX}{self.name} {_b64(self.key_hash + signature)}\n"

    def sign(self, text: str) -> str:
        """The signed note: the text, a blank line and this key's signature line."""
        return text + "\n" + self.signature_line(text)

    def __repr__(self) -> str:
        return f"NoteSigner(vkey={self.vkey!r})"


@dataclass(frozen=True)
class Signature:
    """One signature line: the key's name and ID and the signature bytes after the ID."""

    name: str
    key_hash: bytes
    signature: bytes

    def line(self) -> str:
        return f"{_SIG_PREFIX}{self.name} {_b64(self.key_hash + self.signature)}\n"


@dataclass(frozen=True)
class Note:
    """A parsed, not yet verified, note: its text (with the final newline) and signatures."""

    text: str
    signatures: tuple[Signature, ...]


def _parse_signature_line(line: str) -> Signature:
    if not line.startswith(_SIG_PREFIX):
        raise NoteError("signature line: must start with an em dash and a space")
    name, sep, data = line[len(_SIG_PREFIX) :].partition(" ")
    if not sep:
        raise NoteError("signature line: expected '— <key name> <signature>'")
    check_key_name(name)
    raw = b64decode_strict(data, "signature line")
    if len(raw) <= _KEY_ID_SIZE:
        raise NoteError("signature line: shorter than a key ID and a signature")
    return Signature(name, raw[:_KEY_ID_SIZE], raw[_KEY_ID_SIZE:])


def parse_note(note: str) -> Note:
    """Split a signed note into text and signature lines, checking the syntax only.

    The text ends at the last blank line; everything after it must be signature lines, each
    ending in a newline, and at least one, at most MAX_SIGNATURES.
    """
    if not isinstance(note, str):
        raise NoteError("note: must be text")
    _check_chars(note, "note")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise NoteError("note: no blank line between the text and the signatures")
    text, block = note[: cut + 1], note[cut + 2 :]
    if not block:
        raise NoteError("note: no signature lines after the last blank line")
    if not block.endswith("\n"):
        raise NoteError("note: the last signature line does not end in a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note: more than {MAX_SIGNATURES} signatures")
    return Note(text, tuple(_parse_signature_line(line) for line in lines))


def open_note(note: str, verifiers: Iterable[NoteVerifier]) -> tuple[str, list[NoteVerifier]]:
    """Verify a note; return its text and the verifiers whose signatures verified (note order).

    Signatures whose (name, key ID) matches no verifier are ignored, as the spec requires. A
    matching signature that fails rejects the whole note, and so does having no verified one.
    """
    parsed = parse_note(note)
    known: dict[tuple[str, bytes], NoteVerifier] = {}
    for verifier in verifiers:
        other = known.setdefault((verifier.name, verifier.key_hash), verifier)
        if other != verifier:
            raise NoteError(f"verifiers: two keys share the name {verifier.name!r} and key ID")
    verified: list[NoteVerifier] = []
    for sig in parsed.signatures:
        match = known.get((sig.name, sig.key_hash))
        if match is None:
            continue
        if not match.verify(parsed.text, sig.signature):
            raise NoteError(f"note: signature by {sig.name}+{sig.key_hash.hex()} does not verify")
        if match not in verified:
            verified.append(match)
    if not verified:
        raise NoteError("note: no signature by a known key")
    return parsed.text, verified


def add_signature(note: str, signature_line: str) -> str:
    """Append a (co)signature line to a signed note, e.g. a witness's cosignature.

    The line is checked for syntax only (its key may be one the caller cannot verify), and a
    second signature by the same name and key ID is refused.
    """
    if not signature_line.endswith("\n") or "\n" in signature_line[:-1]:
        raise NoteError("signature line: must be one line ending in a newline")
    parse_note(note)
    added = _parse_signature_line(signature_line[:-1])
    result = note + signature_line
    signatures = parse_note(result).signatures
    if sum((s.name, s.key_hash) == (added.name, added.key_hash) for s in signatures) > 1:
        raise NoteError(f"note: already signed by {added.name}+{added.key_hash.hex()}")
    return result
