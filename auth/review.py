"""The access review: every principal, its roles, last use, age and what is stale."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select

from audit.events import format_timestamp, parse_timestamp
from auth.core import ServiceCore
from auth.models import api_keys, users


class AccessReviewMixin(ServiceCore):
    """What an auditor or admin reviews."""

    async def access_review(self) -> dict[str, Any]:
        """Every principal with its roles, last use, age and what needs attention."""
        now = self.now()
        stale = timedelta(days=self.policy.access_review.stale_after_days)
        alert_failures = self.policy.login_throttle.account_alert_failures
        soon = timedelta(days=self.policy.access_review.expiring_within_days)
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
            if u.failed_logins >= alert_failures:
                flags.append("failed_logins")  # being guessed, or forgotten: ask them
            if u.password_hash is None:
                flags.append("not_enrolled")
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
                    "mfa_enrolled": u.sealed_totp_secret is not None,
                    "failed_logins": u.failed_logins,
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
