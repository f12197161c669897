"""Identity and access: people (password + TOTP → JWT), machines (API keys), their roles,
the signing keys of tokens, and the access review.

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
import ipaddress
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.events import format_timestamp, parse_timestamp
from audit.writer import begin_write
from auth import credentials, tokens
from auth.crypto import MasterKey, MasterKeyMismatch
from auth.hashing import HashingPool
from auth.models import api_keys, auth_revision, jwt_keys, master_key_check, users
from auth.policy import PolicyError, RbacPolicy, SecurityPolicy
from auth.principal import Principal
from auth.rewrap import SealedColumn

CURRENT, RETIRED = "current", "retired"
_USERNAME = r"^[a-z][a-z0-9_.-]{2,63}$"


class AuthError(Exception):
    """A refused credential or request: HTTP status, stable code, message for the caller
    and, for the audit record only, the reason."""

    def __init__(self, status: int, code: str, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.reason = reason or code


def _invalid_login(reason: str) -> AuthError:
    # One answer for unknown user, wrong password, wrong or replayed code, locked or
    # disabled account: the reason goes to the audit log only.
    return AuthError(
        401,
        "invalid_credentials",
        "username, password or one-time code is wrong (every role but client needs the code)",
        reason,
    )


def _invalid_key(reason: str) -> AuthError:
    return AuthError(401, "invalid_credentials", "the credential is not valid", reason)


@dataclass(frozen=True)
class _CachedKey:
    digest: bytes
    principal: Principal
    expires_at: datetime
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    cached_at: float


@dataclass(frozen=True)
class LoginResult:
    access_token: str
    expires_in: int
    principal: Principal


class AuthService:
    """All identity operations over one database; ``clock`` returns Unix seconds."""

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
        self._key_cache: dict[bytes, _CachedKey] = {}
        self._user_cache: dict[str, tuple[float, Any]] = {}
        self._jwt_public: dict[str, Any] = {}
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

    async def _bump_revision(self, conn: AsyncConnection) -> None:
        await conn.execute(
            update(auth_revision)
            .where(auth_revision.c.id == 1)
            .values(revision=auth_revision.c.revision + 1)
        )

    def _forget(self) -> None:
        self._key_cache.clear()
        self._user_cache.clear()
        self._jwt_public.clear()

    async def check_revision(self, force: bool = False) -> None:
        """Drop cached credentials when another process revoked or changed one."""
        interval = float(self.policy.get("api_keys", "revocation_check_seconds"))
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

    # -- users --------------------------------------------------------------------------

    def _check_username(self, username: object) -> str:
        if not isinstance(username, str) or not re.fullmatch(_USERNAME, username):
            raise PolicyError(
                "username: 3-64 characters, lower-case letters, digits, '_', '.', '-', "
                "starting with a letter"
            )
        return username

    async def create_user(self, username: str, roles: list[str]) -> dict[str, str]:
        """Create a person; returns the generated password and TOTP secret, shown once."""
        self._check_username(username)
        self.rbac.check_roles(roles)
        password = credentials.new_password(int(self.policy.get("passwords", "min_length")))
        secret = credentials.new_totp_secret()
        user_id = f"usr_{secrets.token_hex(8)}"
        stamp = format_timestamp(self.now())
        values = {
            "id": user_id,
            "username": username,
            "password_hash": await self.hashing.hash(password),
            "sealed_totp_secret": self._master_key.seal(secret.encode(), f"totp:{user_id}"),
            "roles": ",".join(roles),
            "disabled": False,
            "failed_logins": 0,
            "last_totp_step": 0,
            "created_at": stamp,
            "password_changed_at": stamp,
        }
        async with self.engine.begin() as conn:
            await claim_master_key(conn, self._master_key)
            exists = (
                await conn.execute(select(users.c.id).where(users.c.username == username))
            ).first()
            if exists is not None:
                raise PolicyError(f"username: {username!r} already exists")
            await conn.execute(insert(users).values(**values))
        return {
            "id": user_id,
            "username": username,
            "password": password,
            "totp_secret": secret,
            "totp_uri": credentials.totp_uri(secret, username),
        }

    async def _user_row(self, conn: AsyncConnection, username: str) -> Any:
        row = (await conn.execute(select(users).where(users.c.username == username))).first()
        if row is None:
            raise LookupError(f"no user {username!r}")
        return row

    async def set_roles(self, username: str, roles: list[str]) -> None:
        self.rbac.check_roles(roles)
        async with self.engine.begin() as conn:
            row = await self._user_row(conn, username)
            await conn.execute(
                update(users).where(users.c.id == row.id).values(roles=",".join(roles))
            )
            await self._keep_an_admin(conn, row)
            await self._bump_revision(conn)

    async def reset_mfa(self, username: str) -> dict[str, str]:
        secret = credentials.new_totp_secret()
        async with self.engine.begin() as conn:
            await claim_master_key(conn, self._master_key)
            row = await self._user_row(conn, username)
            await conn.execute(
                update(users)
                .where(users.c.id == row.id)
                .values(
                    sealed_totp_secret=self._master_key.seal(secret.encode(), f"totp:{row.id}"),
                    last_totp_step=0,
                )
            )
            await self._bump_revision(conn)
        return {
            "username": username,
            "totp_secret": secret,
            "totp_uri": credentials.totp_uri(secret, username),
        }

    async def disable_user(self, username: str) -> None:
        await self._set_disabled(username, True)

    async def enable_user(self, username: str) -> None:
        """Undo a disable; the lockout counter starts again from zero."""
        await self._set_disabled(username, False)

    async def _set_disabled(self, username: str, disabled: bool) -> None:
        async with self.engine.begin() as conn:
            row = await self._user_row(conn, username)
            values: dict[str, Any] = {"disabled": disabled}
            if not disabled:
                values.update(failed_logins=0, locked_until=None)
            await conn.execute(update(users).where(users.c.id == row.id).values(**values))
            if disabled:
                await self._keep_an_admin(conn, row)
            await self._bump_revision(conn)

    async def _keep_an_admin(self, conn: AsyncConnection, before: Any) -> None:
        """Refuse a change to ``before`` (the user's row as it was) that took away the
        last enabled person able to manage people: nobody could undo it through the API.
        The rows are locked (FOR UPDATE, on PostgreSQL) so two admins demoting each
        other at once cannot both succeed."""
        if before.disabled or not self.rbac.manages_people(before.roles.split(",")):
            return
        query = select(users.c.roles).where(users.c.disabled.is_(False)).with_for_update()
        for (roles,) in await conn.execute(query):
            if self.rbac.manages_people(roles.split(",")):
                return
        raise AuthError(
            409, "last_admin", "refused: no enabled user would be left who can manage users"
        )

    async def login(self, username: object, password: object, totp: object) -> LoginResult:
        """Password, then TOTP for roles that need it; a short-lived JWT on success."""
        if not isinstance(username, str) or not isinstance(password, str):
            raise AuthError(400, "invalid_request", "username and password must be strings")
        if totp is not None and not isinstance(totp, str):
            raise AuthError(400, "invalid_request", "totp: must be a string of 6 digits")
        now = self.now()
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.username == username))).first()
        if row is None:
            await self.hashing.verify(self._dummy_hash, password, "password")
            # The write a known user's failure costs, matching no row: same timing.
            async with self.engine.begin() as conn:
                await conn.execute(
                    update(users)
                    .where(users.c.username == username)
                    .values(failed_logins=users.c.failed_logins)
                )
            raise _invalid_login("unknown user")
        password_ok = await self.hashing.verify(row.password_hash, password, "password")
        roles = tuple(r for r in row.roles.split(",") if r)
        step = None
        if totp:
            secret = self._master_key.open(row.sealed_totp_secret, f"totp:{row.id}").decode()
            step = credentials.totp_step(secret, totp, self._clock(), int(row.last_totp_step))
        reason = None
        if row.disabled:
            reason = "disabled"
        elif row.locked_until and parse_timestamp(row.locked_until) > now:
            reason = "locked"
        elif not password_ok:
            reason = "wrong password"
        elif totp and step is None:
            reason = "wrong or replayed one-time code"
        elif self.rbac.needs_mfa(roles) and step is None:
            reason = "one-time code required"
        if reason is not None:
            await self._record_failure(row, now)
            raise _invalid_login(reason)
        async with self.engine.begin() as conn:
            values: dict[str, Any] = {
                "failed_logins": 0,
                "locked_until": None,
                "last_login_at": format_timestamp(now),
            }
            if step is not None:
                values["last_totp_step"] = step
            # The step guard makes a code single-use even across racing logins.
            result = await conn.execute(
                update(users)
                .where(users.c.id == row.id, users.c.last_totp_step == row.last_totp_step)
                .values(**values)
            )
            if result.rowcount != 1:
                raise _invalid_login("one-time code replayed concurrently")
        amr = ["pwd", "otp"] if step is not None else ["pwd"]
        principal = Principal(row.id, "user", row.username, roles, mfa=step is not None)
        token, ttl = await self._issue_token(principal, amr, now)
        return LoginResult(token, ttl, principal)

    async def _record_failure(self, row: Any, now: datetime) -> None:
        """Count the failure in the database itself (concurrent failures each count) and
        lock the account when the count reaches the policy, unless it is locked already."""
        max_failures = int(self.policy.get("lockout", "max_failures"))
        lock_seconds = int(self.policy.get("lockout", "lock_seconds"))
        async with self.engine.begin() as conn:
            # The increment holds the row's write lock until commit, so the lock
            # decision below is made on the current count, not on ``row``'s old one.
            failures, locked_until = (
                await conn.execute(
                    update(users)
                    .where(users.c.id == row.id)
                    .values(failed_logins=users.c.failed_logins + 1)
                    .returning(users.c.failed_logins, users.c.locked_until)
                )
            ).one()
            locked = locked_until is not None and parse_timestamp(locked_until) > now
            if failures >= max_failures and not locked:
                await conn.execute(
                    update(users)
                    .where(users.c.id == row.id)
                    .values(
                        locked_until=format_timestamp(now + timedelta(seconds=lock_seconds)),
                        failed_logins=0,
                    )
                )

    # -- JWT ----------------------------------------------------------------------------

    async def _current_signing_key(self) -> tokens.SigningKey:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(jwt_keys).where(jwt_keys.c.status == CURRENT))).first()
        if row is None:
            await self.rotate_jwt_key()
            return await self._current_signing_key()
        raw = self._master_key.open(row.sealed_private_key, f"jwt-key:{row.kid}")
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
                        key.private_bytes(), f"jwt-key:{key.kid}"
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
            raise _invalid_key(f"token: {exc}") from exc
        user = await self._cached_user(str(claims["sub"]))
        if user is None or user.disabled:
            raise _invalid_key("token of a disabled or unknown user")
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

    # -- API keys -----------------------------------------------------------------------

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
        rotated_from: str | None = None,
    ) -> dict[str, Any]:
        """A new machine identity; the key is returned once and stored only hashed."""
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            raise PolicyError("name: 1-128 characters")
        await self._check_issuable(role, created_by)
        return await self._insert_api_key(
            name, role, created_by, expires_in_days, allowed_cidrs, rotated_from
        )

    async def _insert_api_key(
        self,
        name: str,
        role: str,
        created_by: str,
        expires_in_days: object,
        allowed_cidrs: object,
        rotated_from: str | None,
    ) -> dict[str, Any]:
        default_days = int(self.policy.get("api_keys", "default_expiry_days"))
        max_days = int(self.policy.get("api_keys", "max_expiry_days"))
        days = default_days if expires_in_days is None else expires_in_days
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= max_days:
            raise PolicyError(f"expires_in_days: an integer from 1 to {max_days}")
        networks = self._networks(allowed_cidrs)
        presented, parts = credentials.new_api_key()
        now = self.now()
        expires_at = format_timestamp(now + timedelta(days=days))
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=parts.key_id,
                    name=name,
                    role=role,
                    secret_hash=await self.hashing.hash(parts.secret),
                    created_at=format_timestamp(now),
                    created_by=created_by,
                    expires_at=expires_at,
                    allowed_cidrs=json.dumps(networks),
                    rotated_from=rotated_from,
                )
            )
        return {
            "id": parts.key_id,
            "api_key": presented,
            "name": name,
            "role": role,
            "expires_at": expires_at,
            "allowed_cidrs": networks,
        }

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

    async def revoke_api_key(self, key_id: str) -> None:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=format_timestamp(self.now()))
            )
            if result.rowcount != 1:
                raise LookupError(f"no active API key {key_id!r}")
            await self._bump_revision(conn)
        self._forget()

    async def rotate_api_key(self, key_id: str, actor: str) -> dict[str, Any]:
        """Revoke ``key_id`` and issue its replacement (same name, role, networks)."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        if row is None or row.revoked_at is not None:
            raise LookupError(f"no active API key {key_id!r}")
        # Before revoking: a refused rotation leaves the old key working.
        await self._check_issuable(row.role, actor)
        await self.revoke_api_key(key_id)
        return await self._insert_api_key(
            row.name, row.role, actor, None, json.loads(row.allowed_cidrs), key_id
        )

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
        ttl = float(self.policy.get("api_keys", "cache_seconds"))
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
            raise _invalid_key("expired API key")
        if not all(self.rbac.allows_api_key(r) for r in cached.principal.roles):
            raise _invalid_key("the policy no longer allows API keys for this role")
        if cached.networks and not _address_in(client_addr, cached.networks):
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
        cached = self._key_cache.get(digest)
        if cached is None or cached.expires_at <= self.now():
            return None
        if cached.networks and not _address_in(client_addr, cached.networks):
            return None
        return cached.principal

    async def _verify_api_key(
        self, presented: str, digest: bytes, before_hashing: Callable[[], None] | None
    ) -> _CachedKey:
        parts = credentials.parse_api_key(presented)
        if parts is None:
            raise _invalid_key("malformed API key")
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(select(api_keys).where(api_keys.c.id == parts.key_id))
            ).first()
        if row is None:
            # No argon2 for an id that does not exist: the id is public (it is part of
            # every key and of the admin listing), so answering at once tells nothing
            # secret, and a flood of made-up keys costs a database lookup each.
            raise _invalid_key("unknown API key")
        if before_hashing is not None:
            before_hashing()
        if not await self.hashing.verify(row.secret_hash, parts.secret, "api_key"):
            raise _invalid_key("wrong API key secret")
        if row.revoked_at is not None:
            raise _invalid_key("revoked API key")
        entry = _CachedKey(
            digest,
            Principal(row.id, "api_key", row.name, (row.role,), mfa=False),
            parse_timestamp(row.expires_at),
            tuple(ipaddress.ip_network(c) for c in json.loads(row.allowed_cidrs)),
            self._clock(),
        )
        self._key_cache[digest] = entry
        return entry

    # -- jobs ---------------------------------------------------------------------------

    async def expire_api_keys(self) -> list[str]:
        """Mark keys past their expiry as revoked (they were already refused)."""
        now = format_timestamp(self.now())
        async with self.engine.begin() as conn:
            ids = (
                (
                    await conn.execute(
                        select(api_keys.c.id).where(
                            api_keys.c.revoked_at.is_(None), api_keys.c.expires_at <= now
                        )
                    )
                )
                .scalars()
                .all()
            )
            if ids:
                await conn.execute(
                    update(api_keys).where(api_keys.c.id.in_(ids)).values(revoked_at=now)
                )
                await self._bump_revision(conn)
        return list(ids)

    async def jwt_key_age(self) -> float | None:
        async with self.engine.connect() as conn:
            created = (
                await conn.execute(
                    select(jwt_keys.c.created_at).where(jwt_keys.c.status == CURRENT)
                )
            ).scalar()
        return None if created is None else (self.now() - parse_timestamp(created)).total_seconds()

    async def access_review(self) -> dict[str, Any]:
        """Every principal with its roles, last use, age and what needs attention."""
        now = self.now()
        stale = timedelta(days=float(self.policy.get("access_review", "stale_after_days")))
        soon = timedelta(days=float(self.policy.get("access_review", "expiring_within_days")))
        async with self.engine.connect() as conn:
            people = (await conn.execute(select(users).order_by(users.c.username))).all()
            machines = (await conn.execute(select(api_keys).order_by(api_keys.c.id))).all()
            total = (await conn.execute(select(func.count()).select_from(users))).scalar_one()
        entries: list[dict[str, Any]] = []

        def age_days(stamp: str) -> float:
            return round((now - parse_timestamp(stamp)).total_seconds() / 86400, 2)

        def stale_since(created: str, last: str | None) -> bool:
            return parse_timestamp(last or created) + stale < now

        for u in people:
            flags = []
            if u.disabled:
                flags.append("disabled")
            if u.locked_until and parse_timestamp(u.locked_until) > now:
                flags.append("locked")
            if u.last_login_at is None:
                flags.append("never_used")
            if not u.disabled and stale_since(u.created_at, u.last_login_at):
                flags.append("stale")
            entries.append(
                {
                    "principal": u.id,
                    "kind": "user",
                    "name": u.username,
                    "roles": [r for r in u.roles.split(",") if r],
                    "created_at": u.created_at,
                    "age_days": age_days(u.created_at),
                    "last_used_at": u.last_login_at,
                    "mfa_enrolled": True,
                    "flags": flags,
                }
            )
        for k in machines:
            flags = []
            expires = parse_timestamp(k.expires_at)
            if k.revoked_at:
                flags.append("revoked")
            elif expires <= now:
                flags.append("expired")
            elif expires - soon <= now:
                flags.append("expiring")
            if k.last_used_at is None:
                flags.append("never_used")
            if not k.revoked_at and stale_since(k.created_at, k.last_used_at):
                flags.append("stale")
            entries.append(
                {
                    "principal": k.id,
                    "kind": "api_key",
                    "name": k.name,
                    "roles": [k.role],
                    "created_at": k.created_at,
                    "age_days": age_days(k.created_at),
                    "last_used_at": k.last_used_at,
                    "expires_at": k.expires_at,
                    "flags": flags,
                }
            )
        return {
            "generated_at": format_timestamp(now),
            "users": total,
            "api_keys": len(machines),
            "principals": entries,
        }


# -- the master key on record (migration auth_0003) -------------------------------------

_RECORD = master_key_check.c.id == 1


def _record_stamp() -> str:
    return format_timestamp(datetime.now(UTC))


async def _has_record(conn: AsyncConnection) -> bool:
    return (await conn.execute(select(master_key_check.c.id).where(_RECORD))).first() is not None


async def _mismatch(conn: AsyncConnection) -> MasterKeyMismatch:
    if not await _has_record(conn):
        return MasterKeyMismatch(
            "no master key is recorded for the stored secrets: run 'kzg-gateway init' "
            "with the key that opens them"
        )
    return MasterKeyMismatch(
        "the stored secrets are sealed under another master key than this process holds "
        "(was it rotated?): restart with the current key"
    )


async def claim_master_key(conn: AsyncConnection, key: MasterKey) -> None:
    """Call first in every transaction that seals a secret: lock the master-key record
    and raise MasterKeyMismatch (the caller writes nothing) unless it names ``key``; a
    database that has sealed nothing yet records ``key`` now. Rotation updates the record
    before it reads any secret, so a sealing either commits before rotation reads (and is
    re-sealed by it) or waits for it, sees the new key and refuses."""
    mine = key.check_value()
    # One statement for both cases: on PostgreSQL a waiting UPDATE re-evaluates its
    # condition on the row as committed, so two first sealings with one key both pass.
    claimed = await conn.execute(
        update(master_key_check)
        .where(
            _RECORD,
            or_(master_key_check.c.check_value == mine, master_key_check.c.check_value.is_(None)),
        )
        .values(
            check_value=mine,
            recorded_at=func.coalesce(master_key_check.c.recorded_at, _record_stamp()),
        )
    )
    if claimed.rowcount != 1:
        raise await _mismatch(conn)


async def replace_master_key(conn: AsyncConnection, old: MasterKey, new: MasterKey) -> None:
    """Rotation, inside its write transaction and before it reads any secret: record
    ``new`` where ``old`` was (MasterKeyMismatch if another key is recorded). With no
    record (secrets older than auth_0003), one is created: the re-sealing that follows
    opens every secret with ``old``, which verifies it."""
    replaced = await conn.execute(
        update(master_key_check)
        .where(
            _RECORD,
            or_(
                master_key_check.c.check_value == old.check_value(),
                master_key_check.c.check_value.is_(None),
            ),
        )
        .values(check_value=new.check_value(), recorded_at=_record_stamp())
    )
    if replaced.rowcount == 1:
        return
    if await _has_record(conn):
        raise MasterKeyMismatch(
            "the stored secrets are sealed under another master key than the one given"
        )
    await conn.execute(
        insert(master_key_check).values(
            id=1, check_value=new.check_value(), recorded_at=_record_stamp()
        )
    )


async def record_master_key(
    engine: AsyncEngine, key: MasterKey, sealed: Iterable[SealedColumn]
) -> None:
    """For ``init`` and ``serve``: raise MasterKeyMismatch unless the database records
    ``key``. Where none is recorded yet, every secret of ``sealed`` must open with ``key``
    (MasterKeyError otherwise) and ``key`` is recorded."""
    mine = key.check_value()
    async with engine.connect() as conn:
        await begin_write(conn)
        query = select(master_key_check.c.check_value).where(_RECORD).with_for_update()
        row = (await conn.execute(query)).first()
        if row is not None and row.check_value == mine:
            await conn.rollback()
            return
        if row is not None and row.check_value is not None:
            raise await _mismatch(conn)
        for column in sealed:
            for ident, value in (await conn.execute(select(column.key, column.sealed))).all():
                key.open(value, column.aad(ident))
        values = {"check_value": mine, "recorded_at": _record_stamp()}
        try:
            if row is None:
                await conn.execute(insert(master_key_check).values(id=1, **values))
            else:
                await conn.execute(update(master_key_check).where(_RECORD).values(**values))
            await conn.commit()
        except IntegrityError:
            # Another instance recorded it first: compare with what it recorded.
            await conn.rollback()
            return await record_master_key(engine, key, sealed)


async def master_key_is_current(engine: AsyncEngine, key: MasterKey) -> bool:
    """Whether ``key`` may still seal: the database records it, or nothing yet."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(master_key_check.c.check_value).where(_RECORD))).first()
    return row is not None and row.check_value in (None, key.check_value())


def _address_in(addr: str | None, networks: tuple[Any, ...]) -> bool:
    if addr is None:
        return False
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in networks)
