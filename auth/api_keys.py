"""Machine identities: API keys, created and shown once, stored only as argon2id hashes,
verified once per ``cache_seconds`` and refused at once when revoked anywhere."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.events import format_timestamp, parse_timestamp
from auth import credentials
from auth.core import Committer, ServiceCore
from auth.errors import AuthError, NotFound, invalid_key
from auth.models import api_keys, users
from auth.policy import PolicyError
from auth.principal import Principal


@dataclass(frozen=True)
class _CachedKey:
    digest: bytes
    principal: Principal
    expires_at: datetime
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    cached_at: float


class ApiKeysMixin(ServiceCore):
    """Creating, listing, revoking, rotating, expiring and verifying API keys."""

    def _networks(self, cidrs: object) -> list[str]:
        if cidrs is None:
            return []
        if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
            raise PolicyError("allowed_cidrs: expected a list of CIDR strings")
        try:
            return [str(ipaddress.ip_network(c, strict=False)) for c in cidrs]
        except ValueError as exc:
            raise PolicyError(f"allowed_cidrs: {exc}") from exc

    async def create_api_key(
        self,
        name: str,
        role: str,
        created_by: str,
        expires_in_days: object = None,
        allowed_cidrs: object = None,
        commit: Committer | None = None,
    ) -> dict[str, Any]:
        """A new machine identity; the key is returned once and stored only hashed."""
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            raise PolicyError("name: 1-128 characters")
        await self._check_issuable(role, created_by)
        created, row = await self._new_api_key(
            name, role, created_by, expires_in_days, allowed_cidrs, None
        )

        async def change(conn: AsyncConnection) -> None:
            await conn.execute(insert(api_keys).values(**row))

        await self._commit(change, {"target": created["id"], "role": role}, commit)
        return created

    async def _new_api_key(
        self,
        name: str,
        role: str,
        created_by: str,
        expires_in_days: object,
        allowed_cidrs: object,
        rotated_from: str | None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A new key (what its creator is shown once) and its row, hashed already: argon2
        runs before any transaction, never inside one."""
        default_days = self.policy.api_keys.default_expiry_days
        max_days = self.policy.api_keys.max_expiry_days
        days = default_days if expires_in_days is None else expires_in_days
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= max_days:
            raise PolicyError(f"expires_in_days: an integer from 1 to {max_days}")
        networks = self._networks(allowed_cidrs)
        presented, parts = credentials.new_api_key()
        now = self.now()
        expires_at = format_timestamp(now + timedelta(days=days))
        row = {
            "id": parts.key_id,
            "name": name,
            "role": role,
            "secret_hash": await self.hashing.hash(parts.secret),
            "created_at": format_timestamp(now),
            "created_by": created_by,
            "expires_at": expires_at,
            "allowed_cidrs": json.dumps(networks),
            "rotated_from": rotated_from,
        }
        created = {
            "id": parts.key_id,
            "api_key": presented,
            "name": name,
            "role": role,
            "expires_at": expires_at,
            "allowed_cidrs": networks,
        }
        return created, row

    async def _check_issuable(self, role: str, created_by: str) -> None:
        """Refuse an API key for ``role`` that the policy or its creator may not issue."""
        self.rbac.check_roles([role], for_api_key=True)
        grantor = await self._principal_roles(created_by)
        if grantor is not None and not self.rbac.may_grant(grantor, role):
            raise AuthError(
                403,
                "forbidden",
                f"you may not issue API keys for role {role!r}: it holds permissions you lack",
                f"API key for {role} refused to {','.join(grantor) or 'no role'}",
            )

    async def _principal_roles(self, ident: str) -> tuple[str, ...] | None:
        """The current roles of principal ``ident`` (a user or an API key); None for an
        operator (the CLI, ``init``), who is no principal and holds the database itself."""
        async with self.engine.connect() as conn:
            user_roles = (
                await conn.execute(select(users.c.roles).where(users.c.id == ident))
            ).scalar()
            if user_roles is not None:
                return tuple(r for r in user_roles.split(",") if r)
            key_role = (
                await conn.execute(select(api_keys.c.role).where(api_keys.c.id == ident))
            ).scalar()
        return None if key_role is None else (key_role,)

    async def list_api_keys(self) -> list[dict[str, Any]]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(api_keys).order_by(api_keys.c.created_at))).all()
        return [
            {
                "id": r.id,
                "name": r.name,
                "role": r.role,
                "created_at": r.created_at,
                "created_by": r.created_by,
                "expires_at": r.expires_at,
                "allowed_cidrs": json.loads(r.allowed_cidrs),
                "revoked_at": r.revoked_at,
                "last_used_at": r.last_used_at,
                "rotated_from": r.rotated_from,
            }
            for r in rows
        ]

    async def _revoke(self, conn: AsyncConnection, key_id: str) -> None:
        result = await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=format_timestamp(self.now()))
        )
        if result.rowcount != 1:
            raise NotFound(f"no active API key {key_id!r}")
        await self._bump_revision(conn)

    async def revoke_api_key(self, key_id: str, commit: Committer | None = None) -> None:
        async def change(conn: AsyncConnection) -> None:
            await self._revoke(conn, key_id)

        await self._commit(change, {"target": key_id}, commit)
        self._forget()

    async def rotate_api_key(
        self, key_id: str, actor: str, commit: Committer | None = None
    ) -> dict[str, Any]:
        """Revoke ``key_id`` and issue its replacement (same name, role, networks): the
        new secret is hashed first, then the revocation and the insertion commit in one
        transaction, so the old key works until its replacement does."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None or row.revoked_at is not None:
            raise NotFound(f"no active API key {key_id!r}")
        await self._check_issuable(row.role, actor)
        created, new_row = await self._new_api_key(
            row.name, row.role, actor, None, json.loads(row.allowed_cidrs), key_id
        )

        async def change(conn: AsyncConnection) -> None:
            await self._revoke(conn, key_id)
            await conn.execute(insert(api_keys).values(**new_row))

        await self._commit(change, {"target": key_id, "replacement": created["id"]}, commit)
        self._forget()
        return created

    async def authenticate_api_key(
        self,
        presented: str,
        client_addr: str | None,
        before_hashing: Callable[[], None] | None = None,
    ) -> Principal:
        """The key's principal. ``before_hashing`` runs only when argon2 is about to be
        paid (a key not in the cache), so a caller can refuse there, e.g. a client whose
        failure budget is spent, without turning away keys already verified."""
        await self.check_revision()
        digest = hmac.new(self._cache_key, presented.encode(), hashlib.sha256).digest()
        ttl = self.policy.api_keys.cache_seconds
        cached = self._key_cache.get(digest)
        fresh = (
            cached is None
            or not hmac.compare_digest(cached.digest, digest)
            or self._clock() - cached.cached_at >= ttl
        )
        if cached is None or fresh:
            cached = await self._verify_api_key(presented, digest, before_hashing)
        if cached.expires_at <= self.now():
            self._key_cache.pop(digest, None)
            raise invalid_key("expired API key")
        if not all(self.rbac.allows_api_key(r) for r in cached.principal.roles):
            raise invalid_key("the policy no longer allows API keys for this role")
        if cached.networks and not address_in(client_addr, cached.networks):
            raise AuthError(
                403, "address_not_allowed", "this API key is not allowed from this address"
            )
        if fresh:
            # Last use means accepted use, recorded at the cache's granularity.
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(api_keys)
                    .where(api_keys.c.id == cached.principal.id)
                    .values(last_used_at=format_timestamp(self.now()))
                )
        return cached.principal

    def cached_api_key_principal(self, presented: str, client_addr: str | None) -> Principal | None:
        """The principal of a key verified earlier and still in the cache, without the
        revision check or the cache's freshness (both need the database); None when the
        key was never verified here or has expired. For read-only routes while the
        database is away."""
        digest = hmac.new(self._cache_key, presented.encode(), hashlib.sha256).digest()
        cached: _CachedKey | None = self._key_cache.get(digest)
        if cached is None or cached.expires_at <= self.now():
            return None
        if cached.networks and not address_in(client_addr, cached.networks):
            return None
        return cached.principal

    async def _verify_api_key(
        self, presented: str, digest: bytes, before_hashing: Callable[[], None] | None
    ) -> _CachedKey:
        parts = credentials.parse_api_key(presented)
        if parts is None:
            raise invalid_key("malformed API key")
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(api_keys).where(api_keys.c.id == parts.key_id))
            ).first()
        if row is None:
            # No argon2 for an id that does not exist: the id is public (it is part of
            # every key and of the admin listing), so answering at once tells nothing
            # secret, and a flood of made-up keys costs a database lookup each.
            raise invalid_key("unknown API key")
        # Refused before argon2: a key that could not be accepted whatever its secret
        # costs a lookup, not ~200 ms of hashing (its id is public).
        if row.revoked_at is not None:
            raise invalid_key("revoked API key")
        if parse_timestamp(row.expires_at) <= self.now():
            raise invalid_key("expired API key")
        if not self.rbac.allows_api_key(row.role):
            raise invalid_key("the policy no longer allows API keys for this role")
        if before_hashing is not None:
            before_hashing()
        generation = self._cache_generation
        if not await self.hashing.verify(row.secret_hash, parts.secret, "api_key"):
            raise invalid_key("wrong API key secret")
        entry = _CachedKey(
            digest,
            Principal(row.id, "api_key", row.name, (row.role,), mfa=False),
            parse_timestamp(row.expires_at),
            tuple(ipaddress.ip_network(c) for c in json.loads(row.allowed_cidrs)),
            self._clock(),
        )
        # Not cached when the caches were dropped meanwhile (a revocation seen while
        # argon2 ran): the next request reads the key again.
        if generation == self._cache_generation:
            self._key_cache[digest] = entry
        return entry

    async def expire_api_keys(self, commit: Committer | None = None) -> list[str]:
        """Mark keys past their expiry as revoked (they were already refused)."""
        now = format_timestamp(self.now())
        async with self.engine.connect() as conn:
            ids = list(
                (
                    await conn.execute(
                        select(api_keys.c.id).where(
                            api_keys.c.revoked_at.is_(None), api_keys.c.expires_at <= now
                        )
                    )
                ).scalars()
            )
        if not ids:
            return []

        async def change(conn: AsyncConnection) -> None:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.id.in_(ids), api_keys.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            await self._bump_revision(conn)

        await self._commit(change, {"targets": ids}, commit)
        self._forget()
        return ids


def address_in(addr: str | None, networks: tuple[Any, ...]) -> bool:
    """Whether the address ``addr`` (None or not an address: no) is in one of ``networks``."""
    if addr is None:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in networks)
