"""What every part of the identity service shares: the database, the policies, the
clock, the keyed references of credentials and the revision that drops cached credentials
everywhere when one is revoked or changed.

argon2 is paid once per credential per ``cache_seconds``: a verified API key is kept in
memory under an HMAC of the presented key (never the key itself). It runs on a small
bounded pool (``auth.hashing``) that refuses rather than queues when full, and never for
an API key whose public id does not exist. Every revoke, rotate,
disable or role change bumps ``auth_revision`` in the database; each process checks that
counter at most every ``revocation_check_seconds`` and drops its caches when it moved, so
revocation reaches every process and instance within that bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from auth import credentials
from auth.crypto import MasterKey
from auth.hashing import HashingPool
from auth.models import auth_revision
from auth.policy import RbacPolicy, SecurityPolicy

CURRENT, RETIRED = "current", "retired"
T = TypeVar("T")


class Committer(Protocol):
    """Commits an identity change (a function of the open transaction) and returns what
    it returned. ``detail`` names what changes (targets, roles, never a secret) for the
    audit record that the gateway commits in the same transaction: the change and its
    record are stored together or not at all."""

    def __call__(
        self, change: Callable[[AsyncConnection], Awaitable[T]], detail: Mapping[str, Any]
    ) -> Awaitable[T]: ...


class ServiceCore:
    """State shared by the parts of ``AuthService``; ``clock`` returns Unix seconds."""

    def __init__(
        self,
        engine: AsyncEngine,
        master_key: MasterKey,
        rbac: RbacPolicy,
        policy: SecurityPolicy,
        clock: Callable[[], float] = time.time,
        on_verify: Callable[[str], None] | None = None,
    ) -> None:
        """``on_verify(kind)`` is told of every argon2 verification ("api_key", "password")."""
        self.engine = engine
        self.rbac = rbac
        self.policy = policy
        self._master_key = master_key
        self._clock = clock
        self.hashing = HashingPool.from_policy(policy, on_verify)
        # A hash to verify against when the user does not exist: same cost, same timing.
        self._dummy_hash = credentials.password_hasher(policy).hash(secrets.token_urlsafe(16))
        self._ref_key = master_key.derive("credential-ref")
        self._cache_key = secrets.token_bytes(32)
        self._key_cache: dict[bytes, Any] = {}
        self._user_cache: dict[str, tuple[float, Any]] = {}
        self._jwt_public: dict[str, Any] = {}
        # Bumped whenever the caches are dropped: a read that began under an older
        # generation must not re-cache what a revocation meanwhile invalidated.
        self._cache_generation = 0
        self._revision: int | None = None
        self._revision_checked = 0.0
        self._revision_lock = asyncio.Lock()

    # -- helpers ------------------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def credential_ref(self, kind: str, ident: str) -> str:
        """Keyed HMAC of a credential's public id: correlatable in the audit log, not
        reversible without the master key."""
        mac = hmac.new(self._ref_key, f"{kind}:{ident}".encode(), hashlib.sha256)
        return f"{kind}:{mac.hexdigest()[:32]}"

    def close(self) -> None:
        self.hashing.close()

    async def _commit(
        self,
        change: Callable[[AsyncConnection], Awaitable[T]],
        detail: Mapping[str, Any],
        commit: Committer | None,
    ) -> T:
        """Run ``change`` through ``commit``; without one (a library caller that audits
        nothing), in a transaction of its own."""
        if commit is not None:
            return await commit(change, detail)
        async with self.engine.begin() as conn:
            return await change(conn)

    async def _bump_revision(self, conn: AsyncConnection) -> None:
        await conn.execute(
            update(auth_revision)
            .where(auth_revision.c.id == 1)
            .values(revision=auth_revision.c.revision + 1)
        )

    def _forget(self) -> None:
        self._cache_generation += 1
        self._key_cache.clear()
        self._user_cache.clear()
        self._jwt_public.clear()

    async def check_revision(self, force: bool = False) -> None:
        """Drop cached credentials when another process revoked or changed one."""
        interval = self.policy.api_keys.revocation_check_seconds
        if not force and time.monotonic() - self._revision_checked < interval:
            return
        async with self._revision_lock:
            if not force and time.monotonic() - self._revision_checked < interval:
                return
            async with self.engine.connect() as conn:
                revision = (
                    await conn.execute(
                        select(auth_revision.c.revision).where(auth_revision.c.id == 1)
                    )
                ).scalar_one()
            if revision != self._revision:
                self._forget()
                self._revision = revision
            self._revision_checked = time.monotonic()
