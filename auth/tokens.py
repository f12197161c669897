"""JWT access tokens: EdDSA (Ed25519) only, keys identified by ``kid``.

Verification pins the algorithm list to ["EdDSA"] and takes the key from our own key
table by ``kid``, so neither ``alg: none`` nor an HMAC token keyed with a public key can
pass. Issuer, audience, expiry, not-before and issued-at are all required.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "EdDSA"
REQUIRED_CLAIMS = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]


class TokenError(ValueError):
    """The token is malformed, forged, expired or not for us."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, now: datetime) -> SigningKey:
        return cls(f"jwt-{now:%Y%m%d}-{secrets.token_hex(4)}", Ed25519PrivateKey.generate())

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_private_bytes(cls, kid: str, raw: bytes) -> SigningKey:
        return cls(kid, Ed25519PrivateKey.from_private_bytes(raw))

    def public_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )


def load_public_key(pem: str) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, Ed25519PublicKey):
        raise TokenError("JWT key is not Ed25519")
    return key


def jwk(kid: str, key: Ed25519PublicKey) -> dict[str, str]:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": ALGORITHM, "use": "sig"}


def issue(key: SigningKey, claims: dict[str, Any]) -> str:
    return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})


def unverified_kid(token: str) -> str:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError("malformed token") from exc
    kid = header.get("kid")
    if header.get("alg") != ALGORITHM or not isinstance(kid, str):
        raise TokenError("token algorithm or key id not accepted")
    return kid


def verify(token: str, public_key: Ed25519PublicKey, issuer: str, audience: str) -> dict[str, Any]:
    """Return the verified claims; TokenError for anything else."""
    try:
        return jwt.decode(
            token,
            public_key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            options={"require": REQUIRED_CLAIMS},
            leeway=0,
        )
    except jwt.PyJWTError as exc:
        raise TokenError(str(exc)) from exc
