"""Passwords (argon2id), TOTP codes (single use) and the API key format."""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass

import pyotp
from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from auth.policy import SecurityPolicy

API_KEY_PREFIX = "kzg"
# kzg_<public id: 16 hex>_<secret: 43 urlsafe base64 chars = 256 bits>
_API_KEY = re.compile(r"^kzg_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
TOTP_ISSUER = "kzg-gateway"
TOTP_PERIOD = 30


def password_hasher(policy: SecurityPolicy) -> PasswordHasher:
    return PasswordHasher(
        time_cost=policy.passwords.time_cost,
        memory_cost=policy.passwords.memory_kib,
        parallelism=policy.passwords.parallelism,
        type=Type.ID,
    )


def verify_hash(hasher: PasswordHasher, stored: str, secret: str) -> bool:
    """argon2id verification (constant time in the secret); False for any mismatch."""
    try:
        return hasher.verify(stored, secret)
    except (VerificationError, InvalidHashError):
        return False


def new_password(min_length: int) -> str:
    """A generated password shown once to its owner: at least 144 random bits and
    ``min_length`` characters (each carries 6 bits)."""
    return secrets.token_urlsafe(max(18, -(-min_length * 3 // 4)))


@dataclass(frozen=True)
class ApiKeyParts:
    key_id: str
    secret: str


def new_api_key() -> tuple[str, ApiKeyParts]:
    parts = ApiKeyParts(secrets.token_hex(8), secrets.token_urlsafe(32))
    return f"{API_KEY_PREFIX}_{parts.key_id}_{parts.secret}", parts


def parse_api_key(presented: str) -> ApiKeyParts | None:
    """The public id and secret of a well-formed key; None for anything else."""
    match = _API_KEY.fullmatch(presented)
    return ApiKeyParts(match.group(1), match.group(2)) if match else None


def new_totp_secret() -> str:
    return pyotp.random_base32(32)


def totp_uri(secret: str, username: str) -> str:
    return pyotp.TOTP(secret, interval=TOTP_PERIOD).provisioning_uri(
        name=username, issuer_name=TOTP_ISSUER
    )


def totp_step(secret: str, code: str, now: float, last_step: int) -> int | None:
    """The time step ``code`` is valid for (current one ±1), if it is later than
    ``last_step``: a code is accepted once, and never an older one after a newer."""
    if not re.fullmatch(r"\d{6}", code or ""):
        return None
    totp = pyotp.TOTP(secret, interval=TOTP_PERIOD)
    current = int(now) // TOTP_PERIOD
    found = None
    for step in (current - 1, current, current + 1):
        # Compare against every candidate so timing does not reveal which one matched.
        if hmac.compare_digest(totp.generate_otp(step), code) and step > last_step:
            found = step
    return found
