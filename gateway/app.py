"""The app factory: resources in ``cleanup_ctx``, the middleware chain, the routes.

Middlewares, outermost first: request id (and the access log line) → TLS facts → audit
(records every request exactly once and releases the response only after the commit) →
the console's pages (HTML refusals and security headers, on /console/ only) → the
security middlewares of ``gateway.security`` (authentication, authorization, rate
limit) → handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.breaker import STATE_VALUES, CircuitBreaker
from audit.checkpoints import sign_head
from audit.errors import AuditUnavailable
from audit.events import parse_timestamp
from audit.writer import AuditWriter
from auth.crypto import MasterKey, load_master_key
from auth.service import master_key_is_current
from gateway.appkeys import (
    AUDIT_WRITER,
    CONFIG,
    DB_ENGINE,
    KZG_POOL,
    LOG_SIGNER,
    MASTER_KEY,
    METRICS,
    PUBLIC_ROUTES,
    STATE,
)
from gateway.config import Config
from gateway.console import routes as console
from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.db import check_schema, make_engine
from gateway.errors import AUDIT_DOWN, ApiError, envelope
from gateway.identity import policies_for, public_routes
from gateway.jobs import JobContext, Scheduler, run_job
from gateway.limits import SERVER_LIMITS, ServerLimits
from gateway.logs import REQUEST_ID
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.openapi import RouteDoc, document_route, openapi_document
from gateway.pool import EnginePool, pool_settings
from gateway.receipts import LogKeySigner, ReceiptResponse, list_log_keys, list_receipt_keys
from gateway.routes import audit as audit_routes
from gateway.routes import kzg as kzg_routes
from gateway.routes.audit import record
from gateway.security import install
from gateway.sqlite_guard import guard_runtime
from gateway.state import PROBE_ROUTES, ProbeSettings, ServerState, free_bytes
from gateway.tls import certificate_not_after, tls_files

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SecurityInstaller = Callable[[web.Application, Config], list[Any]]

access_log = logging.getLogger("kzg_gateway.access")
log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def error_response(
    request_id: str, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """Return the error envelope every refusal uses."""
    response = web.json_response(
        envelope(request_id, code, message), status=status, headers=headers
    )
    if status == 408:
        # The rest of a body that came too slowly is still on the wire: close the connection.
        response.force_close()
    return response


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request its id and context, stamp X-Request-ID on whatever answers, and
    write one JSON access line (no bodies, no credentials, no query strings)."""
    request_id = uuid.uuid4().hex
    ctx = RequestContext(
        request_id=request_id, method=request.method, path=request.path, client_addr=request.remote
    )
    supplied = request.headers.get("X-Request-ID")
    if supplied and _CLIENT_REQUEST_ID.match(supplied):
        ctx.detail["client_request_id"] = supplied
    request[REQUEST_CONTEXT] = ctx
    REQUEST_ID.set(request_id)  # the task's own context: every log line of this request
    state = request.app[STATE]
    metrics = request.app[METRICS]
    state.enter()
    metrics.inflight.inc()
    try:
        try:
            response = await handler(request)
        except Exception:
            log.exception("unhandled error outside the audit middleware")
            response = error_response(request_id, 500, "internal_error", "internal error")
        response.headers["X-Request-ID"] = request_id
        route = ctx.route_name or "unmatched"
        metrics.requests.labels(route, str(response.status)).inc()
        fields = {
            "request_id": request_id,
            "method": ctx.method,
            "path": ctx.path,
            "route": route,
            "status": response.status,
            "latency_ms": round((time.perf_counter() - ctx.started) * 1000, 3),
            "client": ctx.client_addr,
            "tls": ctx.tls_version,
            "actor": ctx.principal.id if ctx.principal else None,
            "audit_seq": ctx.audit_seq,
        }
        # The text is the JSON object; the JSON log format lifts the fields to its top level.
        access_log.info(
            json.dumps(fields, separators=(",", ":")),
            extra={"fields": fields, "summary": f"{ctx.method} {ctx.path} {response.status}"},
        )
        return response
    finally:
        metrics.inflight.dec()
        state.leave()


@web.middleware
async def tls_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record the negotiated TLS version and, under mTLS, the client certificate's subject."""
    ctx = request[REQUEST_CONTEXT]
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is not None:
        ctx.tls_version = ssl_object.version()
        peer = ssl_object.getpeercert()
        if peer:
            subject = ", ".join("=".join(pair) for rdn in peer.get("subject", ()) for pair in rdn)
            ctx.detail["client_cert_subject"] = subject
    return await handler(request)


def _envelope_for(ctx: RequestContext, exc: BaseException) -> web.Response:
    if isinstance(exc, ApiError):
        status, code, message, headers = exc.status, exc.code, exc.message, exc.headers
    elif isinstance(exc, AuditUnavailable):
        return error_response(ctx.request_id, *AUDIT_DOWN)
    elif isinstance(exc, web.HTTPException):
        status, message = exc.status, exc.reason
        code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    else:
        log.error("unhandled error in %s", ctx.route_name, exc_info=exc)
        status, code, message, headers = 500, "internal_error", "internal error", None
    # The auditor sees why, as the client did (messages name fields, never their values).
    ctx.detail.setdefault("error", {"code": code, "message": message[:200]})
    return error_response(ctx.request_id, status, code, message, headers)


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record the request exactly once, whatever happened inside, and release the answer
    only after the record is committed; the store down means 503 and no result."""
    ctx = request[REQUEST_CONTEXT]
    route = request.match_info.route
    ctx.route_name = route.name if route.resource is not None else None
    state = request.app[STATE]
    unrecorded = ctx.route_name in PROBE_ROUTES and not state.record_probes
    # With the store failing, refuse before any work (no engine call, no argon2, no wait
    # for the commit timeout). Probes that are not recorded need no store.
    if not unrecorded and not state.breaker.allow():
        return _breaker_refusal(request.app, ctx)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc if exc.status < 400 else _envelope_for(ctx, exc)
    except Exception as exc:
        response = _envelope_for(ctx, exc)
    # A streamed answer (the audit export) was recorded before its first byte went out.
    if ctx.audit_seq is not None:
        return response
    if unrecorded:
        # A credential refused on /metrics is a security event and stays recorded.
        if response.status not in (401, 403, 429):
            request.app[METRICS].probes_unrecorded.labels(ctx.route_name).inc()
            return response
        if not state.breaker.allow():
            return _breaker_refusal(request.app, ctx)
    appended = await record(request.app, ctx, response.status)
    if appended is None:
        return error_response(ctx.request_id, *AUDIT_DOWN, {"Retry-After": "1"})
    if isinstance(response, ReceiptResponse):
        response.complete(appended)
    return response


def _breaker_refusal(app: web.Application, ctx: RequestContext) -> web.Response:
    app[METRICS].breaker_rejections.inc()
    retry = max(1, round(app[STATE].breaker.recovery_timeout))
    return error_response(ctx.request_id, *AUDIT_DOWN, {"Retry-After": str(retry)})


@web.middleware
async def deny_by_default(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stands in for authentication when no security module is installed: only the
    public routes answer."""
    public = request[REQUEST_CONTEXT].route_name in request.app[PUBLIC_ROUTES]
    if not public and request.match_info.http_exception is None:
        raise ApiError(401, "unauthenticated", "credentials are required for this route")
    return await handler(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _probe(check: Awaitable[bool], timeout: float = 2.0) -> bool:
    """A readiness check: False on any failure or after ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await check
    except Exception:
        return False


async def _database_answers(engine: AsyncEngine) -> bool:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    return True


def _sqlite_dir(config: Config) -> Path | None:
    """The directory of the SQLite database file; None on PostgreSQL."""
    if not config.database_url.startswith("sqlite"):
        return None
    return Path(config.database_url.partition(":///")[2]).parent


async def _database_checks(app: web.Application) -> dict[str, bool]:
    """The readiness checks that need the database or the disk, run concurrently."""
    engine = app[DB_ENGINE]
    database, writer, master_key = await asyncio.gather(
        _probe(_database_answers(engine)),
        _probe(app[AUDIT_WRITER].ready()),
        # False once the master key was rotated under this process. Reported, not gating:
        # it still serves all that needs no secret (KZG, tokens, API keys) and answers 503
        # only to what does, so a rolling restart has no outage.
        _probe(master_key_is_current(engine, app[MASTER_KEY])),
    )
    checks = {"database": database, "audit_writer": writer, "master_key": master_key}
    directory = _sqlite_dir(app[CONFIG])
    if directory is not None:
        minimum = app[STATE].settings.min_free_disk_mib * 2**20
        try:
            checks["disk"] = free_bytes(directory) >= minimum
        except OSError:
            checks["disk"] = False
    return checks


async def _refresh_readiness(app: web.Application) -> None:
    """Keep the readiness checks current, so /readyz never waits on the database."""
    state = app[STATE]
    while True:
        await asyncio.sleep(state.settings.readiness_interval_seconds)
        try:
            state.store_checks(await _database_checks(app))
        except Exception as exc:  # the loop must outlive any one failure
            log.warning("readiness checks failed: %r", exc)
            state.store_checks({"database": False})


def readiness(app: web.Application) -> tuple[bool, dict[str, Any]]:
    """The cached checks plus those that live in memory; stale cached checks fail."""
    state = app[STATE]
    age = state.checks_age()
    # A refresher stuck longer than its own timeouts allow says nothing about now.
    fresh = age is not None and age <= state.settings.readiness_interval_seconds + 10
    breaker = state.breaker.state
    cached = dict(state.checks) if fresh else {"database": False}
    writer = app.get(AUDIT_WRITER)
    if writer is not None and writer.last_failure is not None and state.checked_at is not None:
        # A commit failed since the last check: not ready now, not at the next refresh.
        cached["audit_writer"] = cached.get("audit_writer", False) and (
            writer.last_failure < state.checked_at
        )
    checks: dict[str, bool] = {
        "accepting": not state.draining,
        **cached,
        "pool": app[KZG_POOL].ready if KZG_POOL in app else False,
        "keys": app[LOG_SIGNER].ready if LOG_SIGNER in app else False,
        # Half-open stays ready: the trial commit needs a request to carry it.
        "audit_breaker": breaker != "open",
    }
    metrics = app[METRICS]
    for name, passing in checks.items():
        metrics.readiness.labels(name).set(1 if passing else 0)
    detail = {"breaker": breaker, "checked_seconds_ago": None if age is None else round(age, 3)}
    ready = all(passing for name, passing in checks.items() if name != "master_key")
    return ready, {"checks": checks, **detail}


async def readyz(request: web.Request) -> web.Response:
    ready, detail = readiness(request.app)
    return web.json_response({"ready": ready, **detail}, status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    metrics.queue_depth.set(app[KZG_POOL].queue_depth)
    metrics.breaker_state.set(STATE_VALUES[app[STATE].breaker.state])
    directory = _sqlite_dir(app[CONFIG])
    if directory is not None:
        with contextlib.suppress(OSError):
            metrics.disk_free.labels(str(directory)).set(free_bytes(directory))
    readiness(app)  # the readiness gauges, from the cached checks
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app))


async def receipt_keys_handler(request: web.Request) -> web.Response:
    keys = await list_receipt_keys(request.app[DB_ENGINE])
    return web.json_response({"keys": [k.to_dict() for k in keys]})


async def log_keys_handler(request: web.Request) -> web.Response:
    keys = await list_log_keys(request.app[DB_ENGINE])
    return web.json_response({"keys": [k.to_dict() for k in keys]})


def _operational_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics_handler, name="metrics")
    app.router.add_get("/openapi.json", openapi_handler, name="openapi")
    app.router.add_get("/v1/keys/receipts", receipt_keys_handler, name="receipt_keys")
    app.router.add_get("/v1/log/keys", log_keys_handler, name="log_keys")
    for name, summary in (
        ("healthz", "The process is alive"),
        ("readyz", "Database, audit writer, worker pool, log key and master key are ready"),
        ("openapi", "This document"),
    ):
        document_route(app, name, RouteDoc(summary=summary, tags=("operations",), errors=(503,)))
    document_route(
        app,
        "metrics",
        RouteDoc(
            summary="Prometheus metrics; needs metrics:read (the monitor role) unless "
            "[metrics] public = true",
            tags=("operations",),
            errors=(400, 401, 503),
            response_schema={"type": "string"},
            response_type="text/plain",
        ),
    )
    key = {
        "type": "object",
        "properties": {
            "key_id": {"type": "string"},
            "public_key": {"type": "string"},
            "not_before": {"type": "string"},
            "not_after": {"type": ["string", "null"]},
            "status": {"enum": ["current", "retired"]},
        },
    }
    log_key = {
        "type": "object",
        "properties": {
            "key_id": {"type": "string"},
            "vkey": {"type": "string", "description": "C2SP signed-note verifier key"},
            "not_before": {"type": "string"},
            "not_after": {"type": ["string", "null"]},
            "status": {"enum": ["current", "retired"]},
        },
    }
    document_route(
        app,
        "log_keys",
        RouteDoc(
            summary="Log verifier keys (C2SP vkeys), current and retired",
            tags=("log",),
            errors=(503,),
            response_schema={
                "type": "object",
                "properties": {"keys": {"type": "array", "items": log_key}},
            },
        ),
    )
    document_route(
        app,
        "receipt_keys",
        RouteDoc(
            summary="First-release BLS receipt public keys (retired, for old receipts)",
            tags=("keys",),
            errors=(503,),
            response_schema={
                "type": "object",
                "properties": {"keys": {"type": "array", "items": key}},
            },
        ),
    )


async def _resources(app: web.Application) -> AsyncIterator[None]:
    """Open everything the app needs and close it again, in reverse order."""
    config = app[CONFIG]
    settings = config.audit
    pool = EnginePool(pool_settings(config))
    await pool.start()
    app[KZG_POOL] = pool
    app[METRICS].workers.pids = lambda: pool.pids
    # No statement waits on SQLite's lock longer than an answer may wait for its audit
    # record: a timed-out commit would otherwise hold its connection until the lock frees.
    # The runtime's SQLite connections may not touch the retention floor nor the schema.
    engine = guard_runtime(
        make_engine(config.database_url, busy_timeout=settings.commit_timeout_seconds)
    )
    app[DB_ENGINE] = engine
    # The writer's own connections: each group commit saves the pre-ping round trip.
    writer_engine = guard_runtime(
        make_engine(
            config.database_url, busy_timeout=settings.commit_timeout_seconds, pre_ping=False
        )
    )
    signer = LogKeySigner(engine, app[MASTER_KEY], settings.origin)
    writer = AuditWriter(
        writer_engine,
        signer,
        max_batch=settings.max_batch,
        commit_timeout=settings.commit_timeout_seconds,
        metrics=app[METRICS].audit,
        breaker=app[STATE].breaker,
    )
    scheduler: Scheduler | None = None
    refresher: asyncio.Task[None] | None = None
    ready_task: asyncio.Task[None] | None = None
    with contextlib.suppress(OSError, ValueError):
        cert_file, _ = tls_files(config.tls, config.data_dir)
        app[METRICS].tls_not_after.set(certificate_not_after(cert_file))
    try:
        await check_schema(engine)
        await signer.refresh()
        app[LOG_SIGNER] = signer
        # A tree built by a migration has no signed head yet; sign it before serving.
        head = await sign_head(engine, signer, datetime.now(UTC))
        if head is not None:
            # The alerts read these: a process that has not committed yet is not stale.
            app[METRICS].audit.tree_size.set(head.size)
            app[METRICS].audit.checkpoint_time.set(parse_timestamp(head.issued_at).timestamp())
        await writer.start()
        app[AUDIT_WRITER] = writer
        jobs = JobContext(config, engine, writer, app[MASTER_KEY], signer)
        # A checkpoint signed at every start: verifiers see a fresh head from minute one.
        await run_job("checkpoint", jobs)
        scheduler = Scheduler(jobs)
        if config.jobs.enabled:
            scheduler.start()
        refresher = asyncio.create_task(_refresh_log_key(signer, config))
        app[STATE].store_checks(await _database_checks(app))
        ready_task = asyncio.create_task(_refresh_readiness(app))
        yield
    finally:
        for task in (ready_task, refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if scheduler is not None:
            await scheduler.stop()
        await writer.stop()
        await writer_engine.dispose()
        await engine.dispose()
        await pool.stop()


async def _refresh_log_key(signer: LogKeySigner, config: Config) -> None:
    """Pick up a log key rotated by another process or instance."""
    interval = config.server.log_key_refresh_seconds
    while True:
        await asyncio.sleep(interval)
        try:
            await signer.refresh()
        except Exception as exc:
            log.warning("log key refresh failed: %r", exc)


def create_app(
    config: Config,
    master_key: MasterKey | None = None,
    security: SecurityInstaller | None = None,
) -> web.Application:
    """Return the gateway app. ``security`` installs authentication, authorization and
    rate limiting (default ``gateway.security.install``; ``lambda app, config:
    [deny_by_default]`` leaves only the public routes open)."""
    ops = kzg_routes.operations(
        max_batch=config.server.max_batch_blobs,
        max_cells=config.server.max_batch_cells,
    )
    app = web.Application(
        middlewares=[request_id_middleware, tls_middleware, audit_middleware],
        client_max_size=max(op.body_limit for op in ops),
    )
    app[CONFIG] = config
    app[SERVER_LIMITS] = ServerLimits.from_config(config)
    app[MASTER_KEY] = master_key or load_master_key(config.data_dir)
    app[METRICS] = GatewayMetrics.create()
    audit = config.audit
    app[STATE] = ServerState(
        breaker=CircuitBreaker(
            audit.breaker_failure_threshold, audit.breaker_recovery_timeout_seconds
        ),
        record_probes=audit.record_probes,
        settings=ProbeSettings.from_settings(config.server),
    )
    app[PUBLIC_ROUTES] = public_routes(policies_for(config)[0], config)
    app.cleanup_ctx.append(_resources)
    app.middlewares.append(console.console_pages)
    app.middlewares.extend((security or install)(app, config))
    _operational_routes(app)
    audit_routes.add_routes(app, DB_ENGINE)
    kzg_routes.add_routes(app, ops)
    console.add_routes(app)
    return app
