"""Auditor routes (events, verify, latest checkpoint, JSON Lines export) and the
mapping from a finished request's context to its audit record.

Thin handlers over ``audit``: parse, call one service, shape the response. Permission
checks and the audit record of each request come from the middleware chain.
"""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import aclosing
from datetime import UTC, datetime

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.errors import AuditUnavailable
from audit.events import AuditEvent, parse_timestamp
from audit.export import export_lines
from audit.log import ProofUnavailable, consistency_proof, inclusion_proof, latest_tree_head
from audit.query import MAX_LIMIT, EventQuery, query_events
from audit.verify import VerifyReport, verify_database
from audit.writer import AppendResult
from gateway.appkeys import AUDIT_WRITER, CONFIG, METRICS
from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.errors import ApiError
from gateway.openapi import RouteDoc, document_route

EXPORT_CONTENT_TYPE = "application/jsonl"
_OUTCOMES = {
    401: "unauthenticated",
    403: "denied",
    404: "not_found",
    408: "timeout",
    413: "too_large",
    429: "rate_limited",
    503: "unavailable",
}
# Every outcome a record can carry: requests (by status), CLI commands and jobs.
OUTCOMES = frozenset({"success", "invalid", "error", "failure", *_OUTCOMES.values()})
_ENGINE_KEY: web.AppKey[web.AppKey[AsyncEngine]] = web.AppKey("audit_engine_key")


def outcome_for_status(status: int) -> str:
    """Return the audit outcome of an HTTP status."""
    if status < 400:
        return "success"
    return _OUTCOMES.get(status, "invalid" if status < 500 else "error")


def event_from_context(ctx: RequestContext, http_status: int) -> AuditEvent:
    """Return the audit record of a finished request. Holds no secret: the credential
    appears only as its keyed HMAC reference, inputs only as their digests."""
    principal = ctx.principal
    detail = dict(ctx.detail)
    if ctx.credential_ref is not None:
        detail["credential_ref"] = ctx.credential_ref
    if principal is not None:
        detail["principal_kind"] = principal.kind
        detail["mfa"] = principal.mfa
    return AuditEvent(
        request_id=ctx.request_id,
        occurred_at=ctx.received_at,
        actor=principal.id if principal is not None else None,
        role=",".join(principal.roles) if principal is not None else None,
        action=ctx.action or ctx.route_name or "unmatched",
        outcome=outcome_for_status(http_status),
        http_status=http_status,
        client_addr=ctx.client_addr,
        tls_version=ctx.tls_version,
        method=ctx.method,
        path=ctx.path,
        input_digests=dict(ctx.input_digests),
        result_digest=ctx.result_digest,
        latency_ms=(time.perf_counter() - ctx.started) * 1000,
        detail=detail,
    )


async def record(app: web.Application, ctx: RequestContext, status: int) -> AppendResult | None:
    """Commit the request's audit record and return it (its seq is also kept in ``ctx``);
    None when the audit store is down, and the request must then be answered with
    AUDIT_DOWN."""
    try:
        appended = await app[AUDIT_WRITER].append(event_from_context(ctx, status))
    except AuditUnavailable:
        return None
    ctx.audit_seq = appended.seq
    return appended


def add_routes(app: web.Application, engine_key: web.AppKey[AsyncEngine]) -> None:
    """Register the auditor and log routes (and their documentation); ``engine_key`` is
    where the app keeps its database engine (read at request time, so it may be opened in
    ``cleanup_ctx``)."""
    app[_ENGINE_KEY] = engine_key
    app.router.add_get("/v1/audit/events", events, name="audit_events")
    app.router.add_get("/v1/audit/verify", verify, name="audit_verify")
    app.router.add_get(
        "/v1/audit/checkpoints/latest", checkpoint_latest, name="audit_checkpoint_latest"
    )
    app.router.add_get("/v1/audit/export", export, name="audit_export")
    app.router.add_get("/v1/log/checkpoint", log_checkpoint, name="log_checkpoint")
    app.router.add_get("/v1/log/proof/inclusion", log_inclusion, name="log_proof_inclusion")
    app.router.add_get("/v1/log/proof/consistency", log_consistency, name="log_proof_consistency")
    _document_routes(app)


def _document_routes(app: web.Application) -> None:
    for name, summary in (
        ("audit_events", "Audit events with filters and cursor pagination"),
        ("audit_verify", "Verify the retained audit log"),
        ("audit_checkpoint_latest", "The latest signed checkpoint, its tree size and age"),
    ):
        document_route(app, name, RouteDoc(summary=summary, tags=("audit",)))
    document_route(
        app,
        "log_checkpoint",
        RouteDoc(
            summary="The latest signed checkpoint (C2SP signed note)",
            tags=("log",),
            response_schema={"type": "string"},
            response_type="text/plain",
        ),
    )
    hashes = {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}}
    for name, summary, first in (
        ("log_proof_inclusion", "RFC 9162 inclusion proof at a checkpointed size", "index"),
        ("log_proof_consistency", "RFC 9162 consistency proof between checkpointed sizes", "old"),
    ):
        document_route(
            app,
            name,
            RouteDoc(
                summary=summary,
                tags=("log",),
                parameters=tuple(
                    {
                        "name": name,
                        "in": "query",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 0 if name == "index" else 1},
                    }
                    for name in (first, "size")
                ),
                response_schema={
                    "type": "object",
                    "properties": {
                        first: {"type": "integer"},
                        "size": {"type": "integer"},
                        "hashes": hashes,
                    },
                },
            ),
        )
    document_route(
        app,
        "audit_export",
        RouteDoc(
            summary="JSON Lines export for offline verification",
            tags=("audit",),
            response_schema={"type": "string"},
            response_type=EXPORT_CONTENT_TYPE,
        ),
    )


def _engine(request: web.Request) -> AsyncEngine:
    return request.app[request.app[_ENGINE_KEY]]


def _invalid(name: str, why: str) -> ApiError:
    return ApiError(400, "invalid_query", f"query parameter {name!r} {why}")


def _outcome(query: Mapping[str, str]) -> str | None:
    value = query.get("outcome")
    if value is not None and value not in OUTCOMES:
        raise _invalid("outcome", f"must be one of {', '.join(sorted(OUTCOMES))}")
    return value


def _time(query: Mapping[str, str], name: str) -> datetime | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        return parse_timestamp(value)
    except ValueError:
        raise _invalid(name, "must be an ISO 8601 timestamp") from None


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise _invalid(name, "must be an integer") from None
    if not low <= number <= high:
        raise _invalid(name, f"must be between {low} and {high}")
    return number


def parse_event_query(query: Mapping[str, str]) -> EventQuery:
    """Return the filters and cursor of GET /v1/audit/events (its query string), or raise
    a 400."""
    known = {"since", "until", "actor", "action", "outcome", "after_seq", "limit"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise _invalid(unknown[0], "is not a filter of this route")
    return EventQuery(
        since=_time(query, "since"),
        until=_time(query, "until"),
        actor=query.get("actor"),
        action=query.get("action"),
        outcome=_outcome(query),
        after_seq=_int(query, "after_seq", 0, 0, 2**63 - 1),
        limit=_int(query, "limit", 100, 1, MAX_LIMIT),
    )


async def events(request: web.Request) -> web.Response:
    page = await query_events(_engine(request), parse_event_query(request.query))
    return web.json_response(page.to_dict())


async def verify(request: web.Request) -> web.Response:
    return web.json_response((await verify_report(request)).to_dict())


async def verify_report(request: web.Request) -> VerifyReport:
    """The full verification of the log (GET /v1/audit/verify, the console's verify page)."""
    # Anchors must not have pruned records the gateway's retention policy still keeps.
    floor = None
    config = request.app.get(CONFIG)
    if config is not None:
        policy = config.audit.retention()
        floor = policy.cutoff(datetime.now(UTC))
    report = await verify_database(_engine(request), retention_floor=floor)
    if METRICS in request.app:  # a failed verification pages (KzgAuditVerificationFailed)
        request.app[METRICS].verifications.labels("valid" if report.valid else "invalid").inc()
    return report


async def checkpoint_latest(request: web.Request) -> web.Response:
    async with _engine(request).connect() as conn:
        head = await latest_tree_head(conn)
    if head is None:
        raise ApiError(404, "no_checkpoint", "no checkpoint has been issued yet")
    age = (datetime.now(UTC) - parse_timestamp(head.issued_at)).total_seconds()
    return web.json_response(
        {
            "tree_size": head.size,
            "root": base64.b64encode(head.root).decode(),
            "issued_at": head.issued_at,
            "age_seconds": round(max(age, 0.0), 3),
            "key_id": head.key_id,
            "checkpoint": head.note,
        }
    )


async def log_checkpoint(request: web.Request) -> web.Response:
    async with _engine(request).connect() as conn:
        head = await latest_tree_head(conn)
    if head is None:
        raise ApiError(404, "no_checkpoint", "no checkpoint has been issued yet")
    return web.Response(text=head.note, content_type="text/plain", charset="utf-8")


def _only(request: web.Request, *names: str) -> None:
    unknown = sorted(set(request.query) - set(names))
    if unknown:
        raise _invalid(unknown[0], "is not a parameter of this route")
    for name in names:
        if name not in request.query:
            raise ApiError(400, "invalid_query", f"query parameter {name!r} is required")


ProofFn = Callable[[AsyncConnection, int, int], Awaitable[list[bytes]]]


async def _proof(request: web.Request, first: str, lowest: int, prove: ProofFn) -> web.Response:
    """A proof between ``first`` (index or old) and ``size``, from stored hashes; 400
    naming the parameter when the log cannot prove it (a size never checkpointed, ...)."""
    _only(request, first, "size")
    value = _int(request.query, first, 0, lowest, 2**63 - 1)
    size = _int(request.query, "size", 0, 1, 2**63 - 1)
    try:
        async with _engine(request).connect() as conn:
            hashes = await prove(conn, value, size)
    except ProofUnavailable as exc:
        raise ApiError(400, f"invalid_{exc.parameter}", str(exc)) from None
    encoded = [base64.b64encode(h).decode() for h in hashes]
    return web.json_response({first: value, "size": size, "hashes": encoded})


async def log_inclusion(request: web.Request) -> web.Response:
    return await _proof(request, "index", 0, inclusion_proof)


async def log_consistency(request: web.Request) -> web.Response:
    return await _proof(request, "old", 1, consistency_proof)


async def export(request: web.Request) -> web.StreamResponse:
    now = datetime.now(UTC)
    async with aclosing(export_lines(_engine(request), now)) as lines:
        # The first line is read before answering, so a database failure is a clean error.
        first = await anext(lines)
        return await _stream(request, now, first, lines)


async def _stream(
    request: web.Request, now: datetime, first: str, lines: AsyncIterator[str]
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": EXPORT_CONTENT_TYPE,
            "Content-Disposition": f'attachment; filename="audit-{now:%Y%m%dT%H%M%SZ}.jsonl"',
        }
    )
    # The log leaves before the handler returns, so its record must be committed first,
    # and the request id set now rather than by the middleware on the way out.
    ctx = request[REQUEST_CONTEXT]
    if await record(request.app, ctx, response.status) is None:
        raise AuditUnavailable("the audit store is unavailable")
    response.headers["X-Request-ID"] = ctx.request_id
    await response.prepare(request)
    await response.write(first.encode())
    buffer: list[str] = []
    async for line in lines:
        buffer.append(line)
        if len(buffer) >= 256:
            await response.write("".join(buffer).encode())
            buffer.clear()
    if buffer:
        await response.write("".join(buffer).encode())
    await response.write_eof()
    return response
