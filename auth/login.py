"""People's login: password, then TOTP for roles that need it, then a short-lived JWT.

No lockout by strangers: failures are counted per (account, source address or IPv6 /64)
and only that source waits, with delays that grow with its failures; its 429 comes before
any argon2, even for the right credentials. The right credentials from another source log
in. Failures also count per account (``users.failed_logins``): crossing a multiple of
``account_alert_failures`` is reported to ``on_account_alert`` for the metric and alert,
never a lock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from audit.events import format_timestamp
from auth import credentials
from auth.errors import AuthError, invalid_login
from auth.master_key import TOTP_SEALED
from auth.models import login_throttle, users
from auth.people import PeopleMixin
from auth.principal import Principal
from auth.ratelimit import client_group


@dataclass(frozen=True)
class LoginResult:
    access_token: str
    expires_in: int
    principal: Principal


class LoginMixin(PeopleMixin):
    """Login, its throttling, and the account counters."""

    on_account_alert: Callable[[], None] | None = None
    on_login_failure: Callable[[str], None] | None = None

    def throttle_delay(self, failures: int) -> float:
        """Seconds a source waits after its ``failures``-th consecutive failure."""
        free = self.policy.login_throttle.free_failures
        if failures < free:
            return 0.0
        factor: int = 2 ** min(failures - free, 32)  # typeshed: int ** int may be a float
        return min(
            self.policy.login_throttle.base_delay_seconds * factor,
            self.policy.login_throttle.max_delay_seconds,
        )

    async def _check_throttle(self, account: str, source: str, now: float) -> None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    select(login_throttle.c.failures, login_throttle.c.last_failure_at).where(
                        login_throttle.c.account == account, login_throttle.c.source == source
                    )
                )
            ).first()
        if (
            row is None
            or now - row.last_failure_at >= self.policy.login_throttle.forget_after_seconds
        ):
            return
        wait = row.last_failure_at + self.throttle_delay(int(row.failures)) - now
        if wait > 0:
            if self.on_login_failure:
                self.on_login_failure("throttled")
            raise AuthError(
                429,
                "too_many_attempts",
                "too many failed logins from this address for this account: retry later",
                f"throttled after {row.failures} failures from this source",
                retry_after=math.ceil(wait),
            )

    async def login(
        self, username: object, password: object, totp: object, source: str | None = None
    ) -> LoginResult:
        """Password, then TOTP for roles that need it; a short-lived JWT on success.
        ``source`` is the client's address (throttled per address or IPv6 /64)."""
        if not isinstance(username, str) or not isinstance(password, str):
            raise AuthError(400, "invalid_request", "username and password must be strings")
        if totp is not None and not isinstance(totp, str):
            raise AuthError(400, "invalid_request", "totp: must be a string of 6 digits")
        now = self.now()
        account = self.credential_ref("username", username)
        group = client_group(source)
        await self._check_throttle(account, group, now.timestamp())
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.username == username))).first()
        if row is None or row.password_hash is None:
            await self.hashing.verify(self._dummy_hash, password, "password")
            await self._record_failure(account, group, None, now.timestamp())
            raise invalid_login("unknown user" if row is None else "not enrolled")
        password_ok = await self.hashing.verify(row.password_hash, password, "password")
        roles = tuple(r for r in row.roles.split(",") if r)
        step = None
        if totp:
            secret = self._master_key.open(row.sealed_totp_secret, TOTP_SEALED.aad(row.id)).decode()
            step = credentials.totp_step(secret, totp, self._clock(), int(row.last_totp_step))
        reason = None
        if row.disabled:
            reason = "disabled"
        elif not password_ok:
            reason = "wrong password"
        elif totp and step is None:
            reason = "wrong or replayed one-time code"
        elif self.rbac.needs_mfa(roles) and step is None:
            reason = "one-time code required"
        if reason is not None:
            await self._record_failure(account, group, row.id, now.timestamp())
            raise invalid_login(reason)
        async with self.engine.begin() as conn:
            values: dict[str, Any] = {"failed_logins": 0, "last_login_at": format_timestamp(now)}
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
            await conn.execute(
                delete(login_throttle).where(
                    login_throttle.c.account == account, login_throttle.c.source == group
                )
            )
        amr = ["pwd", "otp"] if step is not None else ["pwd"]
        principal = Principal(row.id, "user", row.username, roles, mfa=step is not None)
        token, ttl = await self._issue_token(principal, amr, now)
        return LoginResult(token, ttl, principal)

    async def _record_failure(
        self, account: str, source: str, user_id: str | None, now: float
    ) -> None:
        """Count the failure for (account, source) and, for a person, for the account;
        in the database itself, so concurrent failures each count."""
        if self.on_login_failure:
            self.on_login_failure("failed")
        forget = self.policy.login_throttle.forget_after_seconds
        async with self.engine.begin() as conn:
            await self._count_source_failure(conn, account, source, now, forget)
            # Unknown users pay the same write, matching no row: same timing.
            failures = (
                await conn.execute(
                    update(users)
                    .where(users.c.id == (user_id or ""))
                    .values(failed_logins=users.c.failed_logins + 1)
                    .returning(users.c.failed_logins)
                )
            ).scalar()
        alert_every = self.policy.login_throttle.account_alert_failures
        if failures and failures % alert_every == 0 and self.on_account_alert:
            self.on_account_alert()

    async def _count_source_failure(
        self, conn: AsyncConnection, account: str, source: str, now: float, forget: float
    ) -> None:
        dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
        table = login_throttle
        stale = table.c.last_failure_at < now - forget
        statement = dialect.insert(table).values(
            account=account, source=source, failures=1, last_failure_at=now
        )
        # A source idle past forget_after_seconds starts again from one.
        excluded = statement.excluded
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.account, table.c.source],
            set_={
                "failures": case((stale, 1), else_=table.c.failures + 1),
                "last_failure_at": excluded.last_failure_at,
            },
        )
        await conn.execute(statement)

    async def forget_login_failures(self) -> int:
        """Delete the throttle rows of sources quiet for ``forget_after_seconds`` (they
        no longer count); returns how many."""
        cutoff = self._clock() - self.policy.login_throttle.forget_after_seconds
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(login_throttle).where(login_throttle.c.last_failure_at < cutoff)
            )
        return int(result.rowcount or 0)
