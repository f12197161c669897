"""The gateway and its audit log together: one record per request whatever the answer,
the receipt names its own record, and with the audit store down nothing is answered."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import pytest

from audit.events import parse_timestamp
from audit.verify import verify_database
from gateway.appkeys import DB_ENGINE
from tests.audit.helpers import sqlite_write_lock
from tests.audit.proxy import CuttableProxy
from tests.conftest import PgDatabase
from tests.gateway.conftest import Gateway, StartGateway
from tests.gateway.helpers import hx, make_blob

BLOB = make_blob(11)


async def test_every_request_is_one_record_and_the_chain_verifies(gateway: Gateway) -> None:
    calls = [
        ("POST", "/v1/kzg/blob-to-commitment", {"blob": hx(BLOB)}, "client", 200),
        ("POST", "/v1/kzg/blob-to-commitment", {"blob": "0x00"}, "client", 400),
        ("POST", "/v1/kzg/blob-to-commitment", {"blob": hx(BLOB)}, None, 401),
        ("GET", "/v1/nowhere", None, "client", 404),
        ("DELETE", "/v1/kzg/verify-proof", None, "client", 405),
        ("GET", "/healthz", None, None, 200),
        ("GET", "/v1/keys/receipts", None, None, 200),
    ]
    request_ids = []
    for method, path, body, role, status in calls:
        response, _ = await gateway.request(method, path, json_body=body, role=role)
        assert response.status == status
        request_ids.append(response.headers["X-Request-ID"])
    seqs = []
    for request_id, call in zip(request_ids, calls, strict=True):
        [record] = await gateway.audit_records(request_id)
        assert record["http_status"] == call[4] and record["path"] == call[1]
        seqs.append(record["seq"])
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    report = await verify_database(gateway.app[DB_ENGINE])
    assert report.valid and report.head_seq >= seqs[-1]
    # The auditor's view says whose keys it trusted and holds anchors to the policy.
    response, answer = await gateway.request("GET", "/v1/audit/verify", role="auditor")
    assert response.status == 200 and answer["valid"] is True
    assert answer["keys_source"] == "database"
    floor = parse_timestamp(answer["retention_floor"])
    assert floor < datetime.now(UTC) - timedelta(days=365)  # a policy keeps a year at least


async def test_records_hold_digests_never_blobs_or_keys(sqlite_gateway: Gateway) -> None:
    response, _ = await sqlite_gateway.post("/v1/kzg/blob-to-commitment", {"blob": hx(BLOB)})
    [record] = await sqlite_gateway.audit_records(response.headers["X-Request-ID"])
    stored = repr(record)
    assert BLOB.hex()[:64] not in stored
    assert await sqlite_gateway.api_key() not in stored
    assert len(record["input_digests"]) < 200


def _via_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit(":", 1)[0] + f":{port}"))


@pytest.mark.postgres
async def test_audit_store_down_means_503_and_no_result(
    start_gateway: StartGateway, pg_database: PgDatabase
) -> None:
    proxy = CuttableProxy(os.environ["KZG_TEST_PG_HOST"], int(os.environ["KZG_TEST_PG_PORT"]))
    await proxy.start()
    try:
        gw = await start_gateway(
            pg_database,
            database_url=_via_port(pg_database.app_url, proxy.port),
            audit={"commit_timeout_seconds": 2},
        )
        body = {"blob": hx(BLOB)}
        response, answer = await gw.post("/v1/kzg/blob-to-commitment", body)
        assert response.status == 200 and "commitment" in answer

        await proxy.cut()
        response, answer = await gw.post("/v1/kzg/blob-to-commitment", body)
        assert response.status == 503
        assert answer["error"]["code"] == "audit_unavailable"
        assert "commitment" not in answer and "receipt" not in answer
        assert response.headers["X-Request-ID"] == answer["error"]["request_id"]
        ready, _ = await gw.request("GET", "/readyz", role=None)
        assert ready.status == 503

        await proxy.start()
        deadline = time.monotonic() + 15
        while True:
            response, answer = await gw.post("/v1/kzg/blob-to-commitment", body)
            if response.status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        assert response.status == 200 and "receipt" in answer
    finally:
        await proxy.cut()


async def test_export_is_refused_when_its_record_cannot_be_committed(
    start_gateway: StartGateway,
) -> None:
    # The export streams the log before its handler returns: its own record must be
    # committed first. Another process holds SQLite's write lock (reads still work in
    # WAL mode), so the record cannot be written and no line of the log may leave.
    gw = await start_gateway(audit={"commit_timeout_seconds": 1})
    warm, _ = await gw.request("GET", "/v1/audit/events?limit=1", role="auditor")
    assert warm.status == 200  # the auditor's key is now cached: no write to check it
    with sqlite_write_lock(gw.app_url):
        response, body = await gw.request("GET", "/v1/audit/export", role="auditor")
        assert response.status == 503, body
        assert body["error"]["code"] == "audit_unavailable"
    response, body = await gw.request("GET", "/v1/audit/export", role="auditor")
    assert response.status == 200 and body.count(b'"type":"event"') >= 1
    [record] = await gw.audit_records(response.headers["X-Request-ID"])
    assert record["action"] == "audit_export" and record["http_status"] == 200
