"""People's bearer tokens: short-lived JWTs signed by the current JWT key, whose private
part lives sealed under the master key; retired keys stay published until their tokens
have expired."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.events import format_timestamp, parse_timestamp
from auth import tokens
from auth.core import CURRENT, RETIRED, Committer, ServiceCore
from auth.errors import NotFound, invalid_key
from auth.master_key import JWT_SEALED, claim_master_key
from auth.models import jwt_keys, users
from auth.principal import Principal

REVOKED = "revoked"


@dataclass(frozen=True)
class _JwtKey:
    """A JWT key as read, with its public key loaded for verification."""

    kid: str
    status: str
    retired_at: datetime | None
    verifier: Ed25519PublicKey

    @classmethod
    def from_row(cls, row: Any) -> _JwtKey:
        retired = parse_timestamp(row.retired_at) if row.retired_at else None
        return cls(row.kid, row.status, retired, tokens.load_public_key(row.public_key))


class TokensMixin(ServiceCore):
    """Issuing and verifying JWTs, and the JWT signing keys."""

    async def _current_signing_key(self) -> tokens.SigningKey:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(jwt_keys).where(jwt_keys.c.status == CURRENT))).first()
        if row is None:
            await self.rotate_jwt_key()
            return await self._current_signing_key()
        raw = self._master_key.open(row.sealed_private_key, JWT_SEALED.aad(row.kid))
        return tokens.SigningKey.from_private_bytes(row.kid, raw)

    async def _issue_token(
        self, principal: Principal, amr: list[str], now: datetime
    ) -> tuple[str, int]:
        ttl = self.policy.tokens.ttl_seconds
        issued = int(now.timestamp())
        claims = {
            "iss": self.policy.tokens.issuer,
            "aud": self.policy.tokens.audience,
            "sub": principal.id,
            "name": principal.name,
            "roles": list(principal.roles),
            "amr": amr,
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl,
            "jti": secrets.token_hex(16),
        }
        return tokens.issue(await self._current_signing_key(), claims), ttl

    async def rotate_jwt_key(self, commit: Committer | None = None) -> str:
        """A new current signing key; the old one is retired and stays in the JWKS for
        ``jwt_key_retain_days`` so tokens it signed verify until they expire."""
        now = self.now()
        key = tokens.SigningKey.generate(now)

        async def change(conn: AsyncConnection) -> None:
            await self._make_current(conn, key, now)

        await self._commit(change, {"new_key": key.kid}, commit)
        self._forget()
        return key.kid

    async def _make_current(
        self, conn: AsyncConnection, key: tokens.SigningKey, now: datetime
    ) -> None:
        await claim_master_key(conn, self._master_key)
        await conn.execute(
            update(jwt_keys)
            .where(jwt_keys.c.status == CURRENT)
            .values(status=RETIRED, retired_at=format_timestamp(now))
        )
        await conn.execute(
            insert(jwt_keys).values(
                kid=key.kid,
                alg=tokens.ALGORITHM,
                public_key=key.public_pem(),
                sealed_private_key=self._master_key.seal(
                    key.private_bytes(), JWT_SEALED.aad(key.kid)
                ),
                created_at=format_timestamp(now),
                status=CURRENT,
            )
        )
        await self._bump_revision(conn)

    async def revoke_jwt_key(self, kid: str, commit: Committer | None = None) -> dict[str, Any]:
        """Mark a JWT key ``revoked``: every token it signed is refused at once here and
        within ``revocation_check_seconds`` everywhere, and it leaves the JWKS. Revoking
        the current key puts a new one in its place, in the same transaction."""
        now = self.now()
        replacement = tokens.SigningKey.generate(now)
        replaced: list[str] = []

        async def change(conn: AsyncConnection) -> None:
            status = (
                await conn.execute(select(jwt_keys.c.status).where(jwt_keys.c.kid == kid))
            ).scalar()
            if status is None or status == REVOKED:
                raise NotFound(f"no unrevoked JWT key {kid!r}")
            if status == CURRENT:
                await self._make_current(conn, replacement, now)
                replaced.append(replacement.kid)
            await conn.execute(
                update(jwt_keys)
                .where(jwt_keys.c.kid == kid)
                .values(
                    status=REVOKED,
                    retired_at=func.coalesce(jwt_keys.c.retired_at, format_timestamp(now)),
                )
            )
            await self._bump_revision(conn)

        await self._commit(change, {"target": kid, "replacement": replacement.kid}, commit)
        self._forget()
        return {"kid": kid, "status": REVOKED, "current": replaced[0] if replaced else None}

    def _still_valid(self, key: _JwtKey) -> bool:
        """Checked on every use, cached or not: a retired key only within its window."""
        if key.status == CURRENT:
            return True
        if key.status != RETIRED or key.retired_at is None:
            return False
        retain = timedelta(days=self.policy.tokens.jwt_key_retain_days)
        return key.retired_at + retain > self.now()

    async def _jwt_key_rows(self, kid: str | None = None) -> list[_JwtKey]:
        """Every JWT key, or the one ``kid`` names (none when it names no key)."""
        query = select(jwt_keys) if kid is None else select(jwt_keys).where(jwt_keys.c.kid == kid)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_JwtKey.from_row(r) for r in rows]

    async def jwks(self) -> dict[str, Any]:
        valid = [k for k in await self._jwt_key_rows() if self._still_valid(k)]
        return {"keys": [tokens.jwk(k.kid, k.verifier) for k in valid]}

    async def _jwt_key(self, kid: str) -> _JwtKey:
        key = self._jwt_public.get(kid)
        if key is None:
            generation = self._cache_generation
            found = await self._jwt_key_rows(kid)
            if not found:
                raise tokens.TokenError("unknown key id")
            key = found[0]
            # Cached only if no revocation was seen since the read began: a revision
            # check that ran meanwhile must not be undone by this stale row.
            if generation == self._cache_generation:
                self._jwt_public[kid] = key
        if not self._still_valid(key):
            raise tokens.TokenError(f"key {key.status}, or retired past its window")
        return key

    async def authenticate_token(self, token: str) -> Principal:
        await self.check_revision()
        try:
            key = await self._jwt_key(tokens.unverified_kid(token))
            claims = tokens.verify(
                token,
                key.verifier,
                issuer=self.policy.tokens.issuer,
                audience=self.policy.tokens.audience,
            )
            issued = int(claims["iat"])
            if int(claims["exp"]) - issued > self.policy.tokens.ttl_seconds:
                raise tokens.TokenError("lifetime longer than the policy's ttl_seconds")
            if key.retired_at is not None and issued > key.retired_at.timestamp():
                raise tokens.TokenError("issued after its key was retired")
        except (tokens.TokenError, TypeError, ValueError) as exc:
            raise invalid_key(f"token: {exc}") from exc
        user = await self._cached_user(str(claims["sub"]))
        if user is None or user.disabled or user.password_hash is None:
            raise invalid_key("token of a disabled, reset or unknown user")
        if issued < int(parse_timestamp(user.password_changed_at).timestamp()):
            raise invalid_key("token issued before the password was last changed or reset")
        roles = tuple(r for r in user.roles.split(",") if r)
        mfa = "otp" in (claims.get("amr") or [])
        return Principal(user.id, "user", user.username, roles, mfa=mfa)

    async def _cached_user(self, user_id: str) -> Any:
        ttl = self.policy.api_keys.cache_seconds
        hit = self._user_cache.get(user_id)
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return hit[1]
        generation = self._cache_generation
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
        if generation == self._cache_generation:
            self._user_cache[user_id] = (time.monotonic(), row)
        return row

    async def jwt_key_age(self) -> float | None:
        async with self.engine.connect() as conn:
            created = (
                await conn.execute(
                    select(jwt_keys.c.created_at).where(jwt_keys.c.status == CURRENT)
                )
            ).scalar()
        return None if created is None else (self.now() - parse_timestamp(created)).total_seconds()
