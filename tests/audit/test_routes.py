"""The auditor routes over a bare aiohttp app (the full gateway stack is tested in
tests/gateway/test_audit_*.py)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import issue_checkpoint
from audit.verify import verify_export_lines
from audit.writer import AuditWriter
from auth.principal import Principal
from gateway.appkeys import AUDIT_WRITER
from gateway.audit_routes import (
    EXPORT_CONTENT_TYPE,
    add_routes,
    event_from_context,
    outcome_for_status,
)
from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.errors import ApiError
from tests.audit.conftest import AuditStore
from tests.audit.helpers import BlsSigner, make_event, tamper

ENGINE: web.AppKey[AsyncEngine] = web.AppKey("engine")
DAY0 = datetime(2026, 4, 1, tzinfo=UTC)


@web.middleware
async def render_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(
            {"error": {"code": exc.code, "message": exc.message}}, status=exc.status
        )


@web.middleware
async def with_context(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # What the gateway's middleware provides: the export records itself before streaming.
    request[REQUEST_CONTEXT] = RequestContext("req", request.method, request.path, None)
    return await handler(request)


@pytest.fixture
async def client(aiohttp_client, app_engine: AsyncEngine, writer: AuditWriter) -> TestClient:
    app = web.Application(middlewares=[render_errors, with_context])
    app[ENGINE] = app_engine
    app[AUDIT_WRITER] = writer
    add_routes(app, ENGINE)
    return await aiohttp_client(app)


@pytest.fixture
async def records(writer: AuditWriter) -> None:
    for n in range(12):
        await writer.append(
            make_event(
                n, occurred_at=DAY0 + timedelta(hours=n), outcome="denied" if n % 5 else "success"
            )
        )


def test_route_names_are_the_permission_keys(app_engine: AsyncEngine) -> None:
    app = web.Application()
    add_routes(app, ENGINE)
    assert {"audit_events", "audit_verify", "audit_checkpoint_latest", "audit_export"} <= set(
        app.router.named_resources()
    )


@pytest.mark.usefixtures("records")
async def test_events_filter_and_page(client: TestClient) -> None:
    response = await client.get(
        "/v1/audit/events",
        params={"outcome": "denied", "since": "2026-04-01T02:00:00Z", "limit": "3"},
    )
    assert response.status == 200
    body = await response.json()
    assert [e["seq"] for e in body["events"]] == [3, 4, 5]
    assert body["next_after_seq"] == 5
    rest = await (
        await client.get("/v1/audit/events", params={"outcome": "denied", "after_seq": "5"})
    ).json()
    assert [e["seq"] for e in rest["events"]] == [n + 1 for n in range(5, 12) if n % 5]
    assert rest["next_after_seq"] is None


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "x"},
        {"since": "yesterday"},
        {"after_seq": "-1"},
        {"colour": "red"},
        {"outcome": "bogus"},
    ],
)
async def test_bad_queries_are_400_naming_the_parameter(client: TestClient, query: dict) -> None:
    response = await client.get("/v1/audit/events", params=query)
    assert response.status == 400
    body = await response.json()
    assert body["error"]["code"] == "invalid_query"
    assert next(iter(query)) in body["error"]["message"]


@pytest.mark.usefixtures("records")
async def test_verify_reports_the_chain_and_tampering(
    client: TestClient, audit_store: AuditStore
) -> None:
    body = await (await client.get("/v1/audit/verify")).json()
    assert body["valid"] is True and body["checked"] == 12 and body["head"]["seq"] == 12

    await tamper(audit_store, "DELETE FROM audit_events WHERE seq = 8")
    body = await (await client.get("/v1/audit/verify")).json()
    assert body["valid"] is False and body["first_bad_seq"] == 8


@pytest.mark.usefixtures("records")
async def test_latest_checkpoint_and_export(client: TestClient, app_engine: AsyncEngine) -> None:
    missing = await client.get("/v1/audit/checkpoints/latest")
    assert missing.status == 404
    signer = BlsSigner()
    checkpoint = await issue_checkpoint(app_engine, signer, DAY0)
    assert checkpoint is not None

    latest = await (await client.get("/v1/audit/checkpoints/latest")).json()
    assert latest == checkpoint.to_dict()
    assert json.loads(latest["message"]) == {
        "seq": 12,
        "hash": checkpoint.hash,
        "issued_at": checkpoint.issued_at,
    }

    response = await client.get("/v1/audit/export")
    assert response.status == 200
    assert response.headers["Content-Type"] == EXPORT_CONTENT_TYPE
    lines = (await response.text()).splitlines()
    assert sum(1 for line in lines if json.loads(line)["type"] == "event") == 12
    report = verify_export_lines(lines, trusted_keys=signer.keys)
    assert report.valid and report.checkpoints == 1


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, "success"),
        (400, "invalid"),
        (401, "unauthenticated"),
        (403, "denied"),
        (413, "too_large"),
        (429, "rate_limited"),
        (500, "error"),
        (503, "unavailable"),
    ],
)
def test_outcome_follows_the_status(status: int, outcome: str) -> None:
    assert outcome_for_status(status) == outcome


def test_record_of_a_request_carries_references_never_secrets() -> None:
    ctx = RequestContext(
        request_id="req-1",
        method="POST",
        path="/v1/kzg/verify-proof",
        client_addr="127.0.0.1",
        tls_version="TLSv1.3",
        route_name="verify_kzg_proof",
        principal=Principal(id="key-7", kind="api_key", name="ci", roles=("client",)),
        credential_ref="hmac:ab12",
        input_digests={"commitment": "11" * 32},
        result_digest="22" * 32,
    )

    event = event_from_context(ctx, 200)

    assert (event.actor, event.role, event.action, event.outcome) == (
        "key-7",
        "client",
        "verify_kzg_proof",
        "success",
    )
    assert event.detail == {
        "credential_ref": "hmac:ab12",
        "principal_kind": "api_key",
        "mfa": False,
    }
    assert event.occurred_at == ctx.received_at and event.latency_ms is not None
    anonymous = event_from_context(
        RequestContext(request_id="req-2", method="GET", path="/nowhere", client_addr=None), 404
    )
    assert (anonymous.actor, anonymous.action, anonymous.outcome) == (
        None,
        "unmatched",
        "not_found",
    )
    assert anonymous.fields()["http_status"] == 404
