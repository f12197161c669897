"""The auditor and log routes over a bare aiohttp app (the full gateway stack is tested in
tests/gateway/test_audit_*.py), on SQLite and PostgreSQL: every checkpoint and proof they
serve is checked with the reference verifier; and the log's verifier keys are public in
the real app, while its checkpoint and proofs need a credential."""

from __future__ import annotations

import asyncio
import base64
import json
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.log import TreeHead
from audit.signing import NoteLogSigner
from audit.verify import verify_export_lines
from audit.writer import AuditWriter
from auth.crypto import MasterKey
from auth.principal import Principal
from gateway.app import create_app
from gateway.appkeys import AUDIT_WRITER
from gateway.config import Config
from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.db import migrate
from gateway.errors import ApiError
from gateway.identity import AUTH_SERVICE
from gateway.routes.audit import (
    EXPORT_CONTENT_TYPE,
    add_routes,
    event_from_context,
    outcome_for_status,
)
from gateway.security import install
from migrations import AUDIT_TARGETS
from tests.audit import reference_tlog as ref
from tests.audit.conftest import TEST_ORIGIN, AuditStore
from tests.audit.helpers import make_event, tamper
from tests.audit.test_writer import read_entries, read_tree_heads
from tests.conftest import PgDatabase

REPO = Path(__file__).resolve().parents[2]
ENGINE: web.AppKey[AsyncEngine] = web.AppKey("engine")
DAY0 = datetime(2026, 4, 1, tzinfo=UTC)
LOG_ROUTES = {"log_checkpoint", "log_proof_inclusion", "log_proof_consistency"}
AUDIT_ROUTES = {"audit_events", "audit_verify", "audit_checkpoint_latest", "audit_export"}


@pytest.fixture(params=["sqlite", "postgresql"])
async def audit_store(request: pytest.FixtureRequest, tmp_path: Path) -> AuditStore:
    """The audit and gateway branches migrated (the log_keys table too): the routes read
    the log's keys from the database, as the gateway does."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        store, role = AuditStore("sqlite", url, url), None
    else:
        pg: PgDatabase = request.getfixturevalue("pg_database")
        store, role = AuditStore("postgresql", pg.owner_url, pg.app_url), pg.app_role
    await migrate(store.owner_url, role, target=(*AUDIT_TARGETS, "gateway@head"))
    return store


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
async def client(app_engine: AsyncEngine, writer: AuditWriter, aiohttp_client) -> TestClient:
    app = web.Application(middlewares=[render_errors, with_context])
    app[ENGINE] = app_engine
    app[AUDIT_WRITER] = writer
    add_routes(app, ENGINE)
    return await aiohttp_client(app)


@pytest.fixture
async def published(app_engine: AsyncEngine, log_signer: NoteLogSigner) -> None:
    """The test log key published as the current one (the verify route reads it)."""
    async with app_engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO log_keys (key_id, vkey, sealed_private_key, not_before, status) "
                "VALUES (:key_id, :vkey, :sealed, :not_before, 'current')"
            ),
            {
                "key_id": "log-test",
                "vkey": log_signer.vkey,
                "sealed": b"sealed elsewhere",
                "not_before": "2026-01-01T00:00:00.000000Z",
            },
        )


@pytest.fixture
async def records(writer: AuditWriter, app_engine: AsyncEngine) -> list[TreeHead]:
    """Twelve records, one group commit each (a signed head at every size 1-12), then a
    burst of five that share group commits (some of sizes 13-16 never checkpointed).
    Returns the tree heads."""
    for n in range(12):
        await writer.append(
            make_event(
                n, occurred_at=DAY0 + timedelta(hours=n), outcome="denied" if n % 5 else "success"
            )
        )
    await asyncio.gather(
        *(writer.append(make_event(n, occurred_at=DAY0 + timedelta(days=1))) for n in range(5))
    )
    heads = await read_tree_heads(app_engine)
    assert [h.size for h in heads][:12] == list(range(1, 13)) and heads[-1].size == 17
    assert len(heads) < 17  # the burst shared group commits: some sizes have no head
    return heads


async def _error(response: Any) -> dict[str, str]:
    assert response.status == 400, await response.text()
    return (await response.json())["error"]


def test_route_names_are_the_permission_keys() -> None:
    app = web.Application()
    add_routes(app, ENGINE)
    assert set(app.router.named_resources()) >= AUDIT_ROUTES | LOG_ROUTES
    rbac = tomllib.loads((REPO / "policies" / "rbac.toml").read_text())
    for name in AUDIT_ROUTES:
        assert rbac["routes"][name] == "audit:read"
    for name in LOG_ROUTES:
        assert rbac["routes"][name] == "log:read"
    # Every role may read the log's hashes; the verifier keys are public.
    assert all("log:read" in role["permissions"] for role in rbac["roles"].values())
    assert "log_keys" in rbac["public"]["routes"]
    assert not (AUDIT_ROUTES | LOG_ROUTES) & set(rbac["public"]["routes"])


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
        await client.get(
            "/v1/audit/events",
            params={"outcome": "denied", "after_seq": "5", "until": "2026-04-02T00:00:00Z"},
        )
    ).json()
    assert [e["seq"] for e in rest["events"]] == [n + 1 for n in range(5, 12) if n % 5]
    assert rest["next_after_seq"] is None


async def test_bad_queries_are_400_naming_the_parameter(client: TestClient) -> None:
    for query in (
        {"limit": "0"},
        {"limit": "x"},
        {"since": "yesterday"},
        {"after_seq": "-1"},
        {"colour": "red"},
        {"outcome": "bogus"},
    ):
        error = await _error(await client.get("/v1/audit/events", params=query))
        assert error["code"] == "invalid_query", query
        assert next(iter(query)) in error["message"], query


@pytest.mark.usefixtures("published")
async def test_verify_reports_the_tree_and_tampering(
    client: TestClient, audit_store: AuditStore, records: list[TreeHead]
) -> None:
    body = await (await client.get("/v1/audit/verify")).json()
    assert body["valid"] is True, body
    assert body["checked"] == 17 and body["tree_size"] == 17
    assert body["head"] == {"size": 17, "root": base64.b64encode(records[-1].root).decode()}
    assert body["keys_source"] == "database"

    await tamper(audit_store, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 8")
    body = await (await client.get("/v1/audit/verify")).json()
    assert body["valid"] is False and body["first_bad_seq"] == 8


async def test_latest_checkpoint_is_the_newest_signed_tree_head(
    client: TestClient, writer: AuditWriter, app_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    for path in ("/v1/audit/checkpoints/latest", "/v1/log/checkpoint"):
        missing = await client.get(path)
        assert missing.status == 404
        assert (await missing.json())["error"]["code"] == "no_checkpoint"
    for n in range(3):
        await writer.append(make_event(n))
    (*_, head) = await read_tree_heads(app_engine)

    latest = await (await client.get("/v1/audit/checkpoints/latest")).json()

    assert set(latest) == {"tree_size", "root", "issued_at", "age_seconds", "key_id", "checkpoint"}
    assert latest["tree_size"] == head.size == 3
    assert latest["root"] == base64.b64encode(head.root).decode()
    assert (latest["issued_at"], latest["key_id"]) == (head.issued_at, log_signer.key_id)
    assert latest["checkpoint"] == head.note
    assert 0 <= latest["age_seconds"] < 60
    origin, size, root = ref.open_checkpoint(latest["checkpoint"], [log_signer.vkey])
    assert (origin, size, base64.b64encode(root).decode()) == (
        TEST_ORIGIN,
        latest["tree_size"],
        latest["root"],
    )


async def test_log_checkpoint_is_the_signed_note_as_text(
    client: TestClient, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    results = [await writer.append(make_event(n)) for n in range(4)]

    response = await client.get("/v1/log/checkpoint")

    assert response.status == 200
    assert response.content_type == "text/plain" and response.charset == "utf-8"
    note = await response.text()
    assert note == results[-1].batch.checkpoint
    assert ref.open_checkpoint(note, [log_signer.vkey])[:2] == (TEST_ORIGIN, 4)


async def _roots(client: TestClient, heads: list[TreeHead], vkey: str) -> dict[int, bytes]:
    """Each head's root as its signed note says (what a client holding checkpoints has)."""
    roots = {}
    for head in heads:
        origin, size, root = ref.open_checkpoint(head.note, [vkey])
        assert (origin, size) == (TEST_ORIGIN, head.size)
        roots[size] = root
    return roots


async def test_inclusion_proofs_verify_for_every_index_at_every_checkpoint(
    client: TestClient,
    app_engine: AsyncEngine,
    log_signer: NoteLogSigner,
    records: list[TreeHead],
) -> None:
    roots = await _roots(client, records, log_signer.vkey)
    entries = await read_entries(app_engine)
    for size, root in roots.items():
        for index in range(size):
            response = await client.get(
                "/v1/log/proof/inclusion", params={"index": str(index), "size": str(size)}
            )
            assert response.status == 200
            body = await response.json()
            assert (body["index"], body["size"]) == (index, size)
            proof = [base64.b64decode(h, validate=True) for h in body["hashes"]]
            leaf = ref.leaf_hash(entries[index].encode())
            assert ref.verify_inclusion(leaf, index, size, proof, root), (index, size)
            assert not ref.verify_inclusion(
                ref.leaf_hash(b"another entry"), index, size, proof, root
            )


async def test_consistency_proofs_verify_between_every_pair_of_checkpoints(
    client: TestClient, log_signer: NoteLogSigner, records: list[TreeHead]
) -> None:
    roots = await _roots(client, records, log_signer.vkey)
    sizes = sorted(roots)
    for i, old in enumerate(sizes):
        for size in sizes[i:]:
            response = await client.get(
                "/v1/log/proof/consistency", params={"old": str(old), "size": str(size)}
            )
            assert response.status == 200
            body = await response.json()
            assert (body["old"], body["size"]) == (old, size)
            proof = [base64.b64decode(h, validate=True) for h in body["hashes"]]
            assert ref.verify_consistency(old, size, roots[old], roots[size], proof), (old, size)
            if old < size:
                assert not ref.verify_consistency(old, size, roots[size], roots[size], proof)


PROOF_REFUSALS = [
    # Sizes never checkpointed: past the head, inside the burst, or nothing at all.
    ("inclusion", {"index": "0", "size": "18"}, "invalid_size", "size"),
    ("inclusion", {"index": "0", "size": "{unsigned}"}, "invalid_size", "size"),
    ("inclusion", {"index": "0", "size": "0"}, "invalid_query", "size"),
    ("inclusion", {"index": "12", "size": "12"}, "invalid_index", "index"),
    ("inclusion", {"index": "99", "size": "12"}, "invalid_index", "index"),
    ("inclusion", {"index": "-1", "size": "12"}, "invalid_query", "index"),
    ("inclusion", {"index": "x", "size": "12"}, "invalid_query", "index"),
    ("inclusion", {"size": "12"}, "invalid_query", "index"),
    ("inclusion", {"index": "1"}, "invalid_query", "size"),
    ("inclusion", {"index": "1", "size": "12", "old": "3"}, "invalid_query", "old"),
    ("consistency", {"old": "5", "size": "4"}, "invalid_old", "old"),
    ("consistency", {"old": "{unsigned}", "size": "17"}, "invalid_old", "old"),
    ("consistency", {"old": "3", "size": "{unsigned}"}, "invalid_size", "size"),
    ("consistency", {"old": "3", "size": "99"}, "invalid_size", "size"),
    ("consistency", {"old": "0", "size": "12"}, "invalid_query", "old"),
    ("consistency", {"old": "3"}, "invalid_query", "size"),
    ("consistency", {"size": "3"}, "invalid_query", "old"),
    ("consistency", {"old": "3", "size": "4", "index": "1"}, "invalid_query", "index"),
    ("consistency", {"old": "3", "size": "4", "size2": "5"}, "invalid_query", "size2"),
]


async def test_proof_queries_that_cannot_be_answered_are_400_naming_the_parameter(
    client: TestClient, records: list[TreeHead]
) -> None:
    stored = {h.size for h in records}
    unsigned = min(set(range(1, 18)) - stored)  # a size inside the burst
    for path, params, code, name in PROOF_REFUSALS:
        sent = {k: v.format(unsigned=unsigned) for k, v in params.items()}
        case = (path, sent)
        error = await _error(await client.get(f"/v1/log/proof/{path}", params=sent))
        assert error["code"] == code, (case, error)
        named = f"'{name}'" in error["message"] or error["message"].startswith(f"{name} ")
        assert named, (case, error)


@pytest.mark.usefixtures("records", "published")
async def test_export_is_a_log_the_verifier_accepts(
    client: TestClient, log_signer: NoteLogSigner
) -> None:
    response = await client.get("/v1/audit/export")
    assert response.status == 200
    assert response.headers["Content-Type"] == EXPORT_CONTENT_TYPE
    lines = (await response.text()).splitlines()
    items = [json.loads(line) for line in lines]
    assert sum(1 for item in items if item["type"] == "event") == 17
    assert items[-1]["type"] == "checkpoint" and items[-1]["size"] == 17
    assert ref.open_checkpoint(items[-1]["note"], [log_signer.vkey])[1] == 17
    report = verify_export_lines(lines, trusted_log_keys=[log_signer.vkey])
    assert report.valid, report.reason
    assert report.checked == 17


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


# --- the real app: keys public, checkpoint and proofs behind a credential -----------------


@pytest.fixture
async def gateway_client(
    audit_store: AuditStore, request: pytest.FixtureRequest, tmp_path: Path, aiohttp_client
) -> AsyncIterator[TestClient]:
    """The gateway app with its real security middleware, initialised as ``init`` does.
    (``aiohttp_client`` comes last: torn down first, the app closes its database
    connections before the test database is dropped.)"""
    from gateway.cli.serve import initialise

    data: dict[str, Any] = {
        "engine": {"name": "ckzg"},
        "pool": {"workers": 1},
        "jobs": {"enabled": False},
        "auth": {"passwords": {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}},
        "audit": {"origin": TEST_ORIGIN},
    }
    if audit_store.kind == "postgresql":
        data["database_url"] = audit_store.app_url
        data["database_owner_url"] = audit_store.owner_url
        data["database_app_role"] = request.getfixturevalue("pg_database").app_role
    else:
        data["database_url"] = audit_store.app_url
    config = Config(data, tmp_path / "gw")
    await initialise(config)
    master_key = MasterKey.from_text((tmp_path / "gw" / "master.key").read_text())
    yield await aiohttp_client(create_app(config, master_key=master_key, security=install))


async def test_log_keys_are_public_and_verify_what_the_log_serves(
    gateway_client: TestClient,
) -> None:
    client = gateway_client
    # Anyone may fetch the verifier keys; the log's checkpoint and proofs need a credential.
    response = await client.get("/v1/log/keys")
    assert response.status == 200
    keys = (await response.json())["keys"]
    (current,) = [k for k in keys if k["status"] == "current"]
    assert set(current) == {"key_id", "vkey", "status", "not_before", "not_after"}
    assert ref.parse_vkey(current["vkey"])[0] == TEST_ORIGIN
    for path in (
        "/v1/log/checkpoint",
        "/v1/log/proof/inclusion?index=0&size=1",
        "/v1/log/proof/consistency?old=1&size=1",
    ):
        refused = await client.get(path)
        assert refused.status == 401, (path, await refused.text())

    # The refusals were logged, so the tree is not empty: a client's key reads the
    # checkpoint and proofs, an auditor's the entries, and the published key verifies
    # them all.
    service = client.app[AUTH_SERVICE]
    as_client = {"X-API-Key": (await service.create_api_key("c", "client", "tests"))["api_key"]}
    as_auditor = {"X-API-Key": (await service.create_api_key("a", "auditor", "tests"))["api_key"]}
    checkpoint = await client.get("/v1/log/checkpoint", headers=as_client)
    assert checkpoint.status == 200 and checkpoint.content_type == "text/plain"
    origin, size, root = ref.open_checkpoint(await checkpoint.text(), [current["vkey"]])
    assert origin == TEST_ORIGIN and size >= 4
    events = await client.get("/v1/audit/events", params={"limit": "1"}, headers=as_auditor)
    assert events.status == 200, await events.text()
    (first,) = (await events.json())["events"]
    # The log opens with init's own records (the schema first), then the requests.
    assert (first["seq"], first["action"], first["outcome"]) == (1, "cli:init_schema", "success")
    proof = await client.get(
        "/v1/log/proof/inclusion", params={"index": "0", "size": str(size)}, headers=as_client
    )
    assert proof.status == 200
    hashes = [base64.b64decode(h) for h in (await proof.json())["hashes"]]
    leaf = ref.leaf_hash(json.dumps(first, sort_keys=True, separators=(",", ":")).encode())
    assert ref.verify_inclusion(leaf, 0, size, hashes, root)
