"""People's bearer tokens: short-lived JWTs signed by the current JWT key, whose private
part lives sealed under the master key; retired keys stay published until their tokens
have expired."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update

from audit.events import format_timestamp, parse_timestamp
from auth import tokens
from auth.core import CURRENT, RETIRED, ServiceCore
from auth.errors import invalid_key
from auth.master_key import JWT_SEALED, claim_master_key
from auth.models import jwt_keys, users
from auth.principal import Principal


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
        ttl = int(self.policy.get("tokens", "ttl_seconds"))
        issued = int(now.timestamp())
        claims = {
            "iss": self.policy.get("tokens", "issuer"),
            "aud": self.policy.get("tokens", "audience"),
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

    async def rotate_jwt_key(self) -> str:
        """A new current signing key; the old one is retired and stays in the JWKS for
        ``jwt_key_retain_days`` so tokens it signed verify until they expire."""
        now = self.now()
        key = tokens.SigningKey.generate(now)
        async with self.engine.begin() as conn:
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
        return key.kid

    async def _valid_jwt_keys(self) -> list[Any]:
        retain = timedelta(days=float(self.policy.get("tokens", "jwt_key_retain_days")))
        now = self.now()
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(jwt_keys))).all()
        return [
            r
            for r in rows
            if r.status == CURRENT
            or (r.retired_at and parse_timestamp(r.retired_at) + retain > now)
        ]

    async def jwks(self) -> dict[str, Any]:
        return {"keys": [tokens.jwk(r.kid, r.public_key) for r in await self._valid_jwt_keys()]}

    async def authenticate_token(self, token: str) -> Principal:
        await self.check_revision()
        try:
            kid = tokens.unverified_kid(token)
            key = self._jwt_public.get(kid)
            if key is None:
                valid = {r.kid: r.public_key for r in await self._valid_jwt_keys()}
                if kid not in valid:
                    raise tokens.TokenError("unknown key id")
                key = self._jwt_public[kid] = tokens.load_public_key(valid[kid])
            claims = tokens.verify(
                token,
                key,
                issuer=self.policy.get("tokens", "issuer"),
                audience=self.policy.get("tokens", "audience"),
            )
        except tokens.TokenError as exc:
            raise invalid_key(f"token: {exc}") from exc
        user = await self._cached_user(str(claims["sub"]))
        if user is None or user.disabled:
            raise invalid_key("token of a disabled or unknown user")
        roles = tuple(r for r in user.roles.split(",") if r)
        mfa = "otp" in (claims.get("amr") or [])
        return Principal(user.id, "user", user.username, roles, mfa=mfa)

    async def _cached_user(self, user_id: str) -> Any:
        ttl = float(self.policy.get("api_keys", "cache_seconds"))
        hit = self._user_cache.get(user_id)
        if hit is not None and time.monotonic() - hit[0] < ttl:
            return hit[1]
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
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
