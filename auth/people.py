"""People: their accounts and roles, and their enrolment.

An admin never learns a person's secrets: creating (or resetting) a person issues a
single-use enrolment token, kept only as its SHA-256; the person redeems it, choosing the
password, and alone receives the TOTP secret. ``create_user`` (the operator's ``init``)
is the one path that generates both and shows them, once, to the first admin.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.events import format_timestamp, parse_timestamp
from auth import credentials
from auth.core import Committer
from auth.errors import AuthError, NotFound
from auth.jwt_keys import TokensMixin
from auth.master_key import TOTP_SEALED, claim_master_key
from auth.models import users
from auth.policy import PolicyError

_USERNAME = r"^[a-z][a-z0-9_.-]{2,63}$"


def _token_hash(token: str) -> str:
    # The token is 256 random bits: a plain hash suffices, and costs a guesser nothing
    # the gateway pays for.
    return hashlib.sha256(token.encode()).hexdigest()


def _invalid_enrolment(reason: str) -> AuthError:
    # One answer for unknown user, wrong, used or expired token: the reason is audited.
    return AuthError(
        401, "invalid_enrollment", "username or enrollment_token is wrong or expired", reason
    )


class PeopleMixin(TokensMixin):
    """Creating, enrolling and changing people."""

    def _check_username(self, username: object) -> str:
        if not isinstance(username, str) or not re.fullmatch(_USERNAME, username):
            raise PolicyError(
                "username: 3-64 characters, lower-case letters, digits, '_', '.', '-', "
                "starting with a letter"
            )
        return username

    def check_password(self, username: str, password: object, field: str = "password") -> str:
        """The password policy: at least ``min_length`` characters, not the username."""
        min_length = self.policy.passwords.min_length
        if not isinstance(password, str) or len(password) < min_length:
            raise PolicyError(f"{field}: at least {min_length} characters")
        if password.strip().lower() == username.lower():
            raise PolicyError(f"{field}: must not be the username")
        return password

    def _new_enrolment(self) -> tuple[str, str, str]:
        """A fresh token, its hash and its expiry."""
        hours = self.policy.enrollment.token_hours
        token = secrets.token_urlsafe(32)
        return token, _token_hash(token), format_timestamp(self.now() + timedelta(hours=hours))

    async def create_user(self, username: str, roles: list[str]) -> dict[str, str]:
        """Create a person with a generated password and TOTP secret, returned once: for
        the operator who is that person (``init``'s first admin)."""
        self._check_username(username)
        self.rbac.check_roles(roles)
        password = credentials.new_password(self.policy.passwords.min_length)
        secret = credentials.new_totp_secret()
        user_id = f"usr_{secrets.token_hex(8)}"
        values = {
            **self._new_row(user_id, username, roles),
            "password_hash": await self.hashing.hash(password),
            "sealed_totp_secret": self._master_key.seal(secret.encode(), TOTP_SEALED.aad(user_id)),
        }

        async def change(conn: AsyncConnection) -> None:
            await claim_master_key(conn, self._master_key)
            await self._insert_user(conn, values)

        await self._commit(change, {"target": user_id, "roles": roles}, None)
        return {
            "id": user_id,
            "username": username,
            "password": password,
            "totp_secret": secret,
            "totp_uri": credentials.totp_uri(secret, username),
        }

    async def invite_user(
        self, username: object, roles: list[str], commit: Committer | None = None
    ) -> dict[str, Any]:
        """Create a person who enrols themselves: {username, roles, enrollment_token,
        expires_at}. No password or TOTP secret exists until they enrol."""
        name = self._check_username(username)
        self.rbac.check_roles(roles)
        token, token_hash, expires_at = self._new_enrolment()
        user_id = f"usr_{secrets.token_hex(8)}"
        values = {
            **self._new_row(user_id, name, roles),
            "enrollment_token_hash": token_hash,
            "enrollment_expires_at": expires_at,
        }

        async def change(conn: AsyncConnection) -> None:
            await self._insert_user(conn, values)

        await self._commit(
            change, {"target": user_id, "target_username": name, "roles": roles}, commit
        )
        return {
            "id": user_id,
            "username": name,
            "roles": roles,
            "enrollment_token": token,
            "expires_at": expires_at,
        }

    def _new_row(self, user_id: str, username: str, roles: list[str]) -> dict[str, Any]:
        stamp = format_timestamp(self.now())
        return {
            "id": user_id,
            "username": username,
            "roles": ",".join(roles),
            "disabled": False,
            "failed_logins": 0,
            "last_totp_step": 0,
            "created_at": stamp,
            "password_changed_at": stamp,
        }

    async def _insert_user(self, conn: AsyncConnection, values: dict[str, Any]) -> None:
        exists = (
            await conn.execute(select(users.c.id).where(users.c.username == values["username"]))
        ).first()
        if exists is not None:
            raise PolicyError(f"username: {values['username']!r} already exists")
        await conn.execute(insert(users).values(**values))

    async def reset_user(self, username: str, commit: Committer | None = None) -> dict[str, Any]:
        """Revoke the person's password and TOTP at once (their tokens stop working
        within the revocation bound) and issue a new enrolment token."""
        token, token_hash, expires_at = self._new_enrolment()

        async def change(conn: AsyncConnection) -> None:
            row = await self._user_row(conn, username)
            await conn.execute(
                update(users)
                .where(users.c.id == row.id)
                .values(
                    password_hash=None,
                    sealed_totp_secret=None,
                    last_totp_step=0,
                    enrollment_token_hash=token_hash,
                    enrollment_expires_at=expires_at,
                    password_changed_at=format_timestamp(self.now()),
                )
            )
            await self._bump_revision(conn)

        await self._commit(change, {"target_username": username}, commit)
        self._forget()
        return {"username": username, "enrollment_token": token, "expires_at": expires_at}

    async def enroll(
        self, username: object, token: object, password: object, commit: Committer | None = None
    ) -> dict[str, str]:
        """Redeem an enrolment token: set the chosen password, seal a new TOTP secret,
        return its URI (shown only to the person). The token works once."""
        if not isinstance(username, str) or not isinstance(token, str):
            raise PolicyError("username and enrollment_token: expected strings")
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.username == username))).first()
        if row is None or row.enrollment_token_hash is None:
            raise _invalid_enrolment("no enrolment pending")
        if not hmac.compare_digest(row.enrollment_token_hash, _token_hash(token)):
            raise _invalid_enrolment("wrong enrolment token")
        if parse_timestamp(row.enrollment_expires_at) <= self.now():
            raise _invalid_enrolment("expired enrolment token")
        chosen = self.check_password(username, password)
        secret = credentials.new_totp_secret()
        password_hash = await self.hashing.hash(chosen)

        async def change(conn: AsyncConnection) -> None:
            await claim_master_key(conn, self._master_key)
            # Guarded by the token's hash: of two racing redemptions one wins.
            result = await conn.execute(
                update(users)
                .where(users.c.id == row.id, users.c.enrollment_token_hash == _token_hash(token))
                .values(
                    password_hash=password_hash,
                    sealed_totp_secret=self._master_key.seal(
                        secret.encode(), TOTP_SEALED.aad(row.id)
                    ),
                    last_totp_step=0,
                    failed_logins=0,
                    enrollment_token_hash=None,
                    enrollment_expires_at=None,
                    password_changed_at=format_timestamp(self.now()),
                )
            )
            if result.rowcount != 1:
                raise _invalid_enrolment("enrolment token used concurrently")
            await self._bump_revision(conn)

        await self._commit(change, {"target": row.id}, commit)
        self._forget()
        return {"totp_uri": credentials.totp_uri(secret, username)}

    async def change_password(
        self,
        user_id: str,
        current: object,
        new: object,
        commit: Committer | None = None,
    ) -> None:
        """The person's own change, proving the current password."""
        if not isinstance(current, str):
            raise PolicyError("current_password: expected a string")
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.id == user_id))).first()
        if row is None or row.password_hash is None:
            raise AuthError(403, "forbidden", "only an enrolled person may change a password")
        if not await self.hashing.verify(row.password_hash, current, "password"):
            raise AuthError(
                403, "wrong_password", "current_password is wrong", "wrong current password"
            )
        chosen = self.check_password(row.username, new, "new_password")
        if await self.hashing.verify(row.password_hash, chosen, "password"):
            raise PolicyError("new_password: must differ from the current one")
        new_hash = await self.hashing.hash(chosen)

        async def change(conn: AsyncConnection) -> None:
            # Guarded by the hash that was verified: a reset or another change meanwhile wins.
            result = await conn.execute(
                update(users)
                .where(users.c.id == user_id, users.c.password_hash == row.password_hash)
                .values(password_hash=new_hash, password_changed_at=format_timestamp(self.now()))
            )
            if result.rowcount != 1:
                raise AuthError(409, "conflict", "the password changed meanwhile: try again")
            await self._bump_revision(conn)

        await self._commit(change, {"target": user_id}, commit)
        self._forget()

    async def _user_row(self, conn: AsyncConnection, username: str) -> Any:
        row = (await conn.execute(select(users).where(users.c.username == username))).first()
        if row is None:
            raise NotFound(f"no user {username!r}")
        return row

    async def set_roles(
        self, username: str, roles: list[str], commit: Committer | None = None
    ) -> None:
        self.rbac.check_roles(roles)

        async def change(conn: AsyncConnection) -> None:
            row = await self._user_row(conn, username)
            await conn.execute(
                update(users).where(users.c.id == row.id).values(roles=",".join(roles))
            )
            await self._keep_an_admin(conn, row)
            await self._bump_revision(conn)

        await self._commit(change, {"target_username": username, "roles": roles}, commit)
        self._forget()

    async def disable_user(self, username: str, commit: Committer | None = None) -> None:
        await self._set_disabled(username, True, commit)

    async def enable_user(self, username: str, commit: Committer | None = None) -> None:
        """Undo a disable; the failure counter starts again from zero."""
        await self._set_disabled(username, False, commit)

    async def _set_disabled(self, username: str, disabled: bool, commit: Committer | None) -> None:
        async def change(conn: AsyncConnection) -> None:
            row = await self._user_row(conn, username)
            values: dict[str, Any] = {"disabled": disabled}
            if not disabled:
                values["failed_logins"] = 0
            await conn.execute(update(users).where(users.c.id == row.id).values(**values))
            if disabled:
                await self._keep_an_admin(conn, row)
            await self._bump_revision(conn)

        await self._commit(change, {"target_username": username}, commit)
        self._forget()

    async def _keep_an_admin(self, conn: AsyncConnection, before: Any) -> None:
        """Refuse a change to ``before`` (the user's row as it was) that took away the
        last enabled, enrolled person able to manage people: nobody could undo it through
        the API. The rows are locked (FOR UPDATE, on PostgreSQL) so two admins demoting
        each other at once cannot both succeed."""
        if before.disabled or not self.rbac.manages_people(before.roles.split(",")):
            return
        query = (
            select(users.c.roles)
            .where(users.c.disabled.is_(False), users.c.password_hash.is_not(None))
            .with_for_update()
        )
        for (roles,) in await conn.execute(query):
            if self.rbac.manages_people(roles.split(",")):
                return
        raise AuthError(
            409, "last_admin", "refused: no enabled user would be left who can manage users"
        )
