"""People: their accounts and roles, and their login with password and TOTP."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.events import format_timestamp, parse_timestamp
from auth import credentials
from auth.errors import AuthError, invalid_login
from auth.jwt_keys import TokensMixin
from auth.master_key import TOTP_SEALED, claim_master_key
from auth.models import users
from auth.policy import PolicyError
from auth.principal import Principal

_USERNAME = r"^[a-z][a-z0-9_.-]{2,63}$"


@dataclass(frozen=True)
class LoginResult:
    access_token: str
    expires_in: int
    principal: Principal


class PeopleMixin(TokensMixin):
    """Creating and changing people, and their login."""

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
            "sealed_totp_secret": self._master_key.seal(secret.encode(), TOTP_SEALED.aad(user_id)),
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
                    sealed_totp_secret=self._master_key.seal(
                        secret.encode(), TOTP_SEALED.aad(row.id)
                    ),
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
            raise invalid_login("unknown user")
        password_ok = await self.hashing.verify(row.password_hash, password, "password")
        roles = tuple(r for r in row.roles.split(",") if r)
        step = None
        if totp:
            secret = self._master_key.open(row.sealed_totp_secret, TOTP_SEALED.aad(row.id)).decode()
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
            raise invalid_login(reason)
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
                raise invalid_login("one-time code replayed concurrently")
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
