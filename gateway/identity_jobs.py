"""The identity jobs: ``rotate-keys`` (JWT and log keys past their policy age, API
keys past their expiry, login-throttle rows past ``forget_after_seconds``) and
``access-review``. Each audits its own run, and each change
it makes commits together with its own record (``job:rotate-keys:<what>``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from audit.events import parse_timestamp
from audit.jobs import job_event
from auth.core import Committer
from auth.service import AuthService
from gateway.identity import policies_for
from gateway.receipts import list_log_keys, rotate_log_key

if TYPE_CHECKING:  # gateway.jobs lists these jobs: importing it here would be a cycle
    from gateway.jobs import JobContext

T = TypeVar("T")


def job_commit(ctx: JobContext, job: str, what: str) -> Committer:
    """Commit a job's change with its audit record ``job:<job>:<what>``, or neither."""

    async def commit(
        change: Callable[[AsyncConnection], Awaitable[T]], detail: Mapping[str, Any]
    ) -> T:
        event = job_event(f"{job}:{what}", "success", ctx.now(), dict(detail))
        return (await ctx.writer.commit_change(event, change))[1]

    return commit


def service_for(ctx: JobContext) -> AuthService:
    rbac, policy = policies_for(ctx.config)
    return AuthService(
        ctx.engine, ctx.master_key, rbac, policy, clock=lambda: ctx.now().timestamp()
    )


async def rotate_keys(ctx: JobContext) -> dict[str, Any]:
    service = service_for(ctx)
    now = ctx.now()
    summary: dict[str, Any] = {"jwt_rotated": None, "log_key_rotated": None}
    jwt_age = await service.jwt_key_age()
    jwt_max = service.policy.tokens.jwt_key_max_age_days * 86400
    if jwt_age is None or jwt_age >= jwt_max:
        summary["jwt_rotated"] = await service.rotate_jwt_key(
            job_commit(ctx, "rotate-keys", "jwt_key")
        )
    log_key_max = service.policy.log_keys.max_age_days * 86400
    current = [k for k in await list_log_keys(ctx.engine) if k.status == "current"]
    if not current or (now - parse_timestamp(current[0].not_before)).total_seconds() >= log_key_max:
        rotated = await rotate_log_key(
            ctx.engine,
            ctx.master_key,
            ctx.signer.origin,
            now,
            job_commit(ctx, "rotate-keys", "log_key"),
        )
        summary["log_key_rotated"] = rotated.key_id
        await ctx.signer.refresh()
    summary["login_throttle_forgotten"] = await service.forget_login_failures()
    summary["api_keys_expired"] = await service.expire_api_keys(
        job_commit(ctx, "rotate-keys", "api_keys_expired")
    )
    await ctx.writer.append(job_event("rotate-keys", "success", now, summary))
    return summary


async def access_review(ctx: JobContext) -> dict[str, Any]:
    review = await service_for(ctx).access_review()
    flagged = [
        p
        for p in review["principals"]
        if {"stale", "never_used", "expiring", "expired", "failed_logins", "disabled"}
        & set(p["flags"])
    ]
    summary = {
        "principals": len(review["principals"]),
        "flagged": [{"principal": p["principal"], "flags": p["flags"]} for p in flagged],
    }
    await ctx.writer.append(job_event("access-review", "success", ctx.now(), summary))
    return {**summary, "review": review}
