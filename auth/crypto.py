"""Secrets at rest: AES-256-GCM envelope under the gateway's master key."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASTER_KEY_ENV = "KZG_GATEWAY_MASTER_KEY"
MASTER_KEY_FILE = "master.key"
_NONCE_BYTES = 12
_VERSION = b"\x01"
_CHECK_MESSAGE = b"kzg-gateway master-key check"


class MasterKeyError(RuntimeError):
    """The master key is missing, malformed, readable by others, or not the key the
    stored secrets were sealed with."""


class MasterKeyMismatch(MasterKeyError):
    """The database records another master key than this process holds (it was rotated,
    or this is the wrong key): nothing may be sealed, and the process needs the current key."""


class MasterKey:
    """Seals and opens secrets; ``purpose`` is bound as associated data so a
    ciphertext sealed for one use cannot be replayed as another."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise MasterKeyError("master key must be 32 bytes (AES-256)")
        self._key = key
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, purpose.encode())

    def open(self, sealed: bytes, purpose: str) -> bytes:
        if sealed[:1] != _VERSION:
            raise MasterKeyError("sealed secret has an unknown format version")
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, purpose.encode())
        except InvalidTag:
            raise MasterKeyError(
                f"a sealed secret ({purpose.split(':')[0]}) does not open with this master "
                "key: is KZG_GATEWAY_MASTER_KEY the one the database was set up with?"
            ) from None

    def derive(self, purpose: str) -> bytes:
        """Return a 32-byte key for ``purpose`` (HKDF-SHA256), e.g. the HMAC key that turns
        credential ids into references auditors can correlate but not reverse."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(
            self._key
        )

    def check_value(self) -> str:
        """HMAC-SHA256 of a fixed message (hex): what the database records to name the key
        its secrets are sealed under, without revealing it."""
        return hmac.new(self._key, _CHECK_MESSAGE, hashlib.sha256).hexdigest()

    def rewrap(self, sealed: bytes, purpose: str, new: MasterKey) -> bytes:
        """Return ``sealed`` re-encrypted under ``new`` (master-key rotation)."""
        return new.seal(self.open(sealed, purpose), purpose)

    @staticmethod
    def generate() -> bytes:
        return secrets.token_bytes(32)

    @classmethod
    def from_text(cls, text: str) -> MasterKey:
        """Accept the key as 64 hex characters or urlsafe base64 of 32 bytes."""
        text = text.strip()
        try:
            raw = bytes.fromhex(text) if len(text) == 64 else base64.urlsafe_b64decode(text)
        except ValueError as exc:
            raise MasterKeyError("master key is neither hex nor base64") from exc
        return cls(raw)


def write_master_key_file(path: Path) -> None:
    """Create a fresh 0600 key file unless one exists (idempotent)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(MasterKey.generate().hex() + "\n")


def load_master_key(data_dir: Path, environ: dict[str, str] | None = None) -> MasterKey:
    """The key from KZG_GATEWAY_MASTER_KEY, else from ``data_dir/master.key`` (must be 0600)."""
    env = os.environ if environ is None else environ
    if env.get(MASTER_KEY_ENV):
        return MasterKey.from_text(env[MASTER_KEY_ENV])
    path = data_dir / MASTER_KEY_FILE
    if not path.exists():
        raise MasterKeyError(f"no master key: set {MASTER_KEY_ENV} or run 'kzg-gateway init'")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise MasterKeyError(f"{path} must not be readable by group or others (mode {mode:o})")
    return MasterKey.from_text(path.read_text())
