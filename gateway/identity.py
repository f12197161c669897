"""What the identity routes, middlewares and jobs share: the service's app key, the
policies a configuration selects, and the mapping of identity errors to envelopes."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from auth.core import Committer
from auth.crypto import MasterKeyError
from auth.errors import NotFound
from auth.hashing import HashingBusy
from auth.policy import PolicyError, RbacPolicy, SecurityPolicy, load_policies
from auth.service import AuthError, AuthService
from gateway.appkeys import AUDIT_WRITER
from gateway.config import Config
from gateway.context import REQUEST_CONTEXT
from gateway.errors import ApiError
from gateway.limits import JsonTooDeep, parse_json, read_body
from gateway.routes.audit import event_from_context

AUTH_SERVICE: web.AppKey[AuthService] = web.AppKey("auth_service", AuthService)
# Seconds a client waits before retrying a request this instance cannot serve with its
# master key: time for the orchestrator to restart it (or another instance answers).
MASTER_KEY_RETRY_AFTER = "30"

log = logging.getLogger(__name__)
T = TypeVar("T")


def policies_for(config: Config) -> tuple[RbacPolicy, SecurityPolicy]:
    """The policies a gateway with ``config`` enforces: ``policy_dir`` (or the shipped
    ``policies/``), with the tables of ``[auth]`` overriding security values."""
    return load_policies(config.data.get("policy_dir"), dict(config.auth.overrides))


def public_routes(rbac: RbacPolicy, config: Config) -> frozenset[str]:
    """The routes anyone may call: ``[public] routes`` of rbac.toml, the one list an
    operator edits, and /metrics when ``[metrics] public = true``."""
    return rbac.public | {"metrics"} if config.metrics.public else rbac.public


def count_logins(service: AuthService, registry: CollectorRegistry) -> None:
    """Export the service's login counters: failures (``failed``, ``throttled``) and the
    account alerts that ``KzgLoginAccountGuessed`` watches."""
    failures = Counter(
        "kzg_login_failures",
        "Failed logins (failed) and logins refused while their source waits (throttled)",
        ["outcome"],
        registry=registry,
    )
    alerts = Counter(
        "kzg_login_account_alerts",
        "Times one account reached another [login_throttle] account_alert_failures "
        "consecutive failed logins",
        registry=registry,
    )
    for outcome in ("failed", "throttled"):
        failures.labels(outcome)
    service.on_login_failure = lambda outcome: failures.labels(outcome).inc()
    service.on_account_alert = alerts.inc


def to_api_error(exc: Exception) -> ApiError:
    """Map identity errors to the error envelope."""
    if isinstance(exc, AuthError):
        headers = {"WWW-Authenticate": 'Bearer realm="kzg-gateway"'} if exc.status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return ApiError(exc.status, exc.code, exc.message, headers)
    if isinstance(exc, PolicyError):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, NotFound):
        return ApiError(404, "not_found", str(exc))
    if isinstance(exc, MasterKeyError):
        # The master key was rotated under this process (its secrets no longer open, it
        # may seal nothing): only a restart with the current key cures it.
        log.warning("master key does not match the database: %s", exc)
        return ApiError(
            503,
            "master_key_mismatch",
            "this instance holds an outdated master key and must be restarted with the "
            "current one; nothing was done",
            {"Retry-After": MASTER_KEY_RETRY_AFTER},
        )
    if isinstance(exc, SQLAlchemyError | OSError | HashingBusy):
        return ApiError(
            503, "identity_unavailable", "the identity store is unavailable", {"Retry-After": "1"}
        )
    raise exc


async def json_body(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's JSON object; 415, 413 and 400 envelopes for anything else."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    raw = await read_body(request, limit)
    try:
        body = parse_json(raw)
    except JsonTooDeep as exc:
        raise ApiError(400, "invalid_json", f"body: {exc}") from exc
    except ValueError as exc:
        raise ApiError(400, "invalid_json", "body: not valid JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "body: expected a JSON object")
    return body


def audited(request: web.Request, status: int = 200) -> Committer:
    """Commit an identity change in the same transaction as this request's audit record
    (answered ``status``): both are stored or neither. The audit writer runs the change
    under a SAVEPOINT in its batch; the store down means AuditUnavailable (503) with
    nothing changed, and a change that fails raises its own error, recorded as usual."""

    async def commit(
        change: Callable[[AsyncConnection], Awaitable[T]], detail: Mapping[str, Any]
    ) -> T:
        ctx = request[REQUEST_CONTEXT]
        ctx.detail.update(detail)
        writer = request.app[AUDIT_WRITER]
        appended, result = await writer.commit_change(event_from_context(ctx, status), change)
        # Recorded: the audit middleware releases the answer without a second record.
        ctx.audit_seq = appended.seq
        return result

    return commit
