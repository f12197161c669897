"""Authentication, authorization and rate limiting for the gateway, plus the identity
routes and jobs. ``install(app, config)`` is what the app factory calls.

Authentication accepts ``X-API-Key`` (machines) or ``Authorization: Bearer <JWT>``
(people, after password + TOTP); on ``/console/`` paths only, the same JWT in the
console's session cookie. Authorization maps the route name to one permission
(``policies/rbac.toml``) and denies anything not listed. Decisions are recorded by the
audit middleware that wraps these: the principal, a keyed reference of the credential,
and the reason of a refusal (never the credential).

Failed credentials spend a budget per client (an IPv4 address or an IPv6 /64), checked
before any verification: once spent, attempts are answered 429 without costing argon2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import Gauge
from sqlalchemy.exc import SQLAlchemyError

from audit.events import parse_timestamp
from auth.api_keys import address_in
from auth.credentials import parse_api_key
from auth.errors import NotFound
from auth.hashing import HashingBusy
from auth.policy import PolicyError, RbacPolicy, SecurityPolicy
from auth.principal import Principal
from auth.ratelimit import RateLimiter, UsageExchange, client_group
from auth.service import AuthError, AuthService
from gateway.appkeys import CONFIG, DB_ENGINE, MASTER_KEY, METRICS, PUBLIC_ROUTES, STATE
from gateway.config import Config
from gateway.console.session import session_token
from gateway.context import REQUEST_CONTEXT
from gateway.errors import ApiError
from gateway.identity import (
    AUTH_SERVICE,
    count_logins,
    policies_for,
    to_api_error,
)
from gateway.pool import ENGINE_SHARE, EngineShare
from gateway.receipts import list_log_keys
from gateway.routes import admin as admin_routes
from gateway.routes import auth as auth_routes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RBAC: web.AppKey[RbacPolicy] = web.AppKey("rbac_policy", RbacPolicy)
SECURITY_POLICY: web.AppKey[SecurityPolicy] = web.AppKey("security_policy", SecurityPolicy)
RATE_LIMITER: web.AppKey[RateLimiter] = web.AppKey("rate_limiter", RateLimiter)
KEY_AGE: web.AppKey[Gauge] = web.AppKey("signing_key_age", Gauge)
KEY_MAX_AGE: web.AppKey[Gauge] = web.AppKey("signing_key_max_age", Gauge)

# Answered from memory at a fixed small cost; a 429 to kubelet (probes share the node's
# address with other clients) would restart a healthy pod or take it out of service.
_PROBES = frozenset({"healthz", "readyz"})
log = logging.getLogger(__name__)


def _cached_scraper(request: web.Request, api_key: str | None) -> Principal | None:
    """The principal of a /metrics scrape whose API key was verified before, without the
    database: scrapes keep working through an outage (metrics hold no secrets; every
    other route fails closed)."""
    if request[REQUEST_CONTEXT].route_name != "metrics" or api_key is None:
        return None
    return request.app[AUTH_SERVICE].cached_api_key_principal(
        api_key, request[REQUEST_CONTEXT].client_addr
    )


def _is_public(request: web.Request, route: str | None) -> bool:
    return request.match_info.http_exception is not None or route in request.app[PUBLIC_ROUTES]


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[REQUEST_CONTEXT]
    rules = request.app[CONFIG].auth
    if address_in(ctx.client_addr, rules.deny_cidrs) or (
        rules.allow_cidrs and not address_in(ctx.client_addr, rules.allow_cidrs)
    ):
        ctx.detail["reason"] = "client address refused by the IP rules"
        raise ApiError(403, "address_not_allowed", "requests from this address are not allowed")
    if _is_public(request, ctx.route_name):
        return await handler(request)
    service = request.app[AUTH_SERVICE]
    api_key = request.headers.get("X-API-Key")
    authorization = request.headers.get("Authorization")
    # The console's session cookie counts on /console/ only: the JSON API stays cookie-free.
    session = session_token(request)
    if authorization is not None and api_key is None:
        # Scrapers send an API key as a bearer token (Prometheus' credentials_file).
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and parse_api_key(token.strip()) is not None:
            api_key, authorization = token.strip(), None
    try:
        if api_key is not None and authorization is not None:
            raise ApiError(
                400, "invalid_request", "send one credential: X-API-Key or Authorization"
            )
        if api_key is not None:
            # The failure budget is checked before argon2 is paid, not before a cached
            # key: a flood from a shared (NAT) address cannot lock out verified keys.
            # While the audit store fails (breaker not closed) a scrape does not even try
            # the database: a locked SQLite would hold it for the busy timeout.
            cached = None
            if request.app[STATE].breaker.state != "closed":
                cached = _cached_scraper(request, api_key)
            try:
                # Otherwise a scrape waits at most a second for a database that hangs.
                async with asyncio.timeout(1.0 if ctx.route_name == "metrics" else None):
                    principal = cached or await service.authenticate_api_key(
                        api_key, ctx.client_addr, lambda: _refuse_spent_failure_budget(request)
                    )
            except (SQLAlchemyError, OSError, HashingBusy):  # a timeout is an OSError
                principal = _cached_scraper(request, api_key)
                if principal is None:
                    raise
            ctx.credential_ref = service.credential_ref("api_key", principal.id)
        elif authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError(
                    401, "invalid_credentials", "Authorization: expected Bearer <token>"
                )
            principal = await service.authenticate_token(token.strip())
            ctx.credential_ref = service.credential_ref("user", principal.id)
        elif session is not None:
            ctx.detail["console_session"] = True
            principal = await service.authenticate_token(session)
            ctx.credential_ref = service.credential_ref("user", principal.id)
        else:
            raise AuthError(
                401, "unauthenticated", "credentials are required: X-API-Key or Bearer token"
            )
    except (AuthError, PolicyError, NotFound, SQLAlchemyError, OSError, HashingBusy) as exc:
        if isinstance(exc, AuthError):
            ctx.detail["reason"] = exc.reason
            _charge_failure(request)
        elif isinstance(exc, HashingBusy):
            ctx.detail["reason"] = "argon2 threads saturated: refused, not queued"
        raise to_api_error(exc) from exc
    ctx.principal = principal
    return await handler(request)


def client_bucket(kind: str, addr: str | None) -> str:
    """The rate-limit key of a client that is not (yet) a principal: per IPv4 address or
    IPv6 /64, so walking through the addresses of one's own /64 buys no new budget."""
    return f"{kind}:{client_group(addr)}"


def _failure_bucket(request: web.Request) -> tuple[str, float, float]:
    """The client's failed-credential bucket, at the anonymous rate."""
    rate, burst = request.app[SECURITY_POLICY].rate("anonymous")
    return client_bucket("fail", request[REQUEST_CONTEXT].client_addr), rate, burst


def _too_many_failures(wait: float) -> ApiError:
    return ApiError(
        429, "rate_limited", "too many failed attempts", {"Retry-After": str(math.ceil(wait))}
    )


def _refuse_spent_failure_budget(request: web.Request) -> None:
    """Checked before verifying anything: charging only after a verification would let
    every refused attempt of a flood still cost an argon2 run."""
    wait = request.app[RATE_LIMITER].wait(*_failure_bucket(request))
    if wait > 0:
        request[REQUEST_CONTEXT].detail["reason"] = "failed-credential budget spent"
        raise _too_many_failures(wait)


def _charge_failure(request: web.Request) -> None:
    """A failed credential spends one token of the client's failure budget."""
    wait = request.app[RATE_LIMITER].take(*_failure_bucket(request))
    if wait > 0:
        raise _too_many_failures(wait)


@web.middleware
async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request[REQUEST_CONTEXT]
    if _is_public(request, ctx.route_name):
        return await handler(request)
    principal = ctx.principal
    rbac = request.app[RBAC]
    if principal is None:  # authenticate() refuses first; kept as a second lock
        raise ApiError(401, "unauthenticated", "credentials are required")
    if principal.kind == "user" and rbac.needs_mfa(principal.roles) and not principal.mfa:
        # A refusal spends the caller's budget like any request (429 once it is spent):
        # probing routes one may not call is not free.
        _spend_rate_limit(request)
        ctx.detail["reason"] = "role requires MFA, token lacks it"
        raise ApiError(403, "mfa_required", "your role requires logging in with a one-time code")
    if not rbac.allows(principal.roles, ctx.route_name):
        _spend_rate_limit(request)
        needed = rbac.permission_for(ctx.route_name) or "a permission no role holds"
        ctx.detail["reason"] = f"missing {needed}"
        raise ApiError(403, "forbidden", f"role {','.join(principal.roles)} lacks {needed}")
    return await handler(request)


def _spend_rate_limit(request: web.Request) -> None:
    """Take one token of the caller's bucket (the principal's, else the address's); 429
    with Retry-After when it is spent."""
    ctx = request[REQUEST_CONTEXT]
    if ctx.route_name in _PROBES:
        return
    policy = request.app[SECURITY_POLICY]
    if ctx.principal is not None:
        key = f"principal:{ctx.principal.id}"
        rate, burst = max(policy.rate(role) for role in ctx.principal.roles)
    else:
        key = client_bucket("addr", ctx.client_addr)
        rate, burst = policy.rate("anonymous")
    wait = request.app[RATE_LIMITER].take(key, rate, burst)
    if wait > 0:
        raise ApiError(
            429, "rate_limited", "rate limit exceeded", {"Retry-After": str(math.ceil(wait))}
        )


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Spend the caller's token, and leave a principal's share of the engine (the highest
    cap among its roles) for the KZG routes."""
    _spend_rate_limit(request)
    principal = request[REQUEST_CONTEXT].principal
    if principal is not None:
        # [engine_share.<role>] max_in_flight: the engine calls one principal of the role
        # may have in flight at once (the rate limit counts requests, not CPU seconds).
        shares = request.app[SECURITY_POLICY].engine_share
        caps = [s.max_in_flight for role, s in shares.items() if role in principal.roles]
        if caps:
            request[ENGINE_SHARE] = EngineShare(f"principal:{principal.id}", max(caps))
    return await handler(request)


async def update_key_age_metrics(app: web.Application) -> None:
    """Export the age of the current JWT and log keys against their rotation age."""
    service = app[AUTH_SERVICE]
    policy = app[SECURITY_POLICY]
    jwt_age = await service.jwt_key_age()
    if jwt_age is not None:
        app[KEY_AGE].labels("jwt").set(jwt_age)
    app[KEY_MAX_AGE].labels("jwt").set(policy.tokens.jwt_key_max_age_days * 86400)
    current = [k for k in await list_log_keys(app[DB_ENGINE]) if k.status == "current"]
    if current:
        age = (datetime.now(UTC) - parse_timestamp(current[0].not_before)).total_seconds()
        app[KEY_AGE].labels("log").set(age)
    app[KEY_MAX_AGE].labels("log").set(policy.log_keys.max_age_days * 86400)


async def _share_rate_limits(exchange: UsageExchange, interval: float) -> None:
    """Exchange rate-limit spending with the other instances until cancelled. While the
    database is away each instance keeps limiting on its own."""
    while True:
        await asyncio.sleep(interval)
        try:
            await exchange.sync()
        except (SQLAlchemyError, OSError) as exc:
            log.warning("rate-limit exchange failed: %r", exc)


def install(app: web.Application, config: Config) -> list[Any]:
    """Register the identity routes and resources; return the middlewares, in order."""
    rbac, policy = policies_for(config)
    app[RBAC] = rbac
    app[SECURITY_POLICY] = policy
    app[RATE_LIMITER] = RateLimiter()
    # How often instances exchange spending, and how long an idle key is remembered.
    sharing = policy.ratelimit_sharing

    async def resources(app: web.Application) -> Any:
        verifications = app[METRICS].password_hash_verifications
        service = AuthService(
            app[DB_ENGINE],
            app[MASTER_KEY],
            rbac,
            policy,
            on_verify=lambda kind: verifications.labels(kind).inc(),
        )
        app[AUTH_SERVICE] = service
        registry = app[METRICS].registry
        count_logins(service, registry)
        app[KEY_AGE] = Gauge(
            "kzg_signing_key_age_seconds",
            "Age of the current signing key",
            ["kind"],
            registry=registry,
        )
        app[KEY_MAX_AGE] = Gauge(
            "kzg_signing_key_max_age_seconds",
            "Rotation age of signing keys",
            ["kind"],
            registry=registry,
        )
        # Without the database the gauges appear at the next rotation job; /readyz says why.
        with contextlib.suppress(SQLAlchemyError, OSError):
            await update_key_age_metrics(app)
        exchange = UsageExchange(app[DB_ENGINE], app[RATE_LIMITER], horizon=sharing.horizon_seconds)
        exchanging = asyncio.create_task(_share_rate_limits(exchange, sharing.sync_seconds))
        yield
        exchanging.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await exchanging
        service.close()

    app.cleanup_ctx.append(resources)
    auth_routes.add_routes(app)
    admin_routes.add_routes(app)
    return [authenticate, authorize, rate_limit]
