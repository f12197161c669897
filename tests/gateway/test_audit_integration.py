"""The gateway and its audit log together: one record per request whatever the answer,
the receipt names its own record, the log's proof routes (credentials needed, keys
public) prove what receipts claim, and with the audit store down nothing is answered."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import pytest

from audit.events import parse_timestamp
from audit.verify import verify_database
from gateway.appkeys import DB_ENGINE
from tests.audit import reference_tlog
from tests.audit.helpers import sqlite_write_lock
from tests.audit.proxy import CuttableProxy
from tests.conftest import PgDatabase
from tests.gateway.conftest import Gateway, StartGateway
from tests.gateway.helpers import ORIGIN, check_receipt, hx, input_sha256, make_blob, vkeys_of

BLOB = make_blob(11)


async def test_every_request_is_one_record_and_the_chain_verifies(gateway: Gateway) -> None:
    calls = [
        ("POST", "/v1/kzg/blob-to-commitment", {"blob": hx(BLOB)}, "client", 200),
        ("POST", "/v1/kzg/blob-to-commitment", {"blob": "0x00"}, "client", 400),
        ("POST", "/v1/kzg/blob-to-commitment", {"blob": hx(BLOB)}, None, 401),
        ("GET", "/v1/nowhere", None, "client", 404),
        ("DELETE", "/v1/kzg/verify-proof", None, "client", 405),
        ("GET", "/openapi.json", None, None, 200),
        ("GET", "/v1/keys/receipts", None, None, 200),
        ("GET", "/v1/log/keys", None, None, 200),
        ("GET", "/v1/log/checkpoint", None, None, 401),
        ("GET", "/v1/log/checkpoint", None, "client", 200),
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
    report = (await verify_database(gateway.app[DB_ENGINE])).to_dict()
    assert report["valid"] is True, report
    assert report["head"]["size"] >= seqs[-1] and report["checked"] >= seqs[-1]
    assert report["keys_source"] == "database"
    # The auditor's view says whose keys it trusted and holds anchors to the policy.
    response, answer = await gateway.request("GET", "/v1/audit/verify", role="auditor")
    assert response.status == 200 and answer["valid"] is True, answer
    assert answer["keys_source"] == "database"
    assert answer["head"]["size"] >= seqs[-1]
    floor = parse_timestamp(answer["retention_floor"])
    assert floor < datetime.now(UTC) - timedelta(days=365)  # a policy keeps a year at least


async def test_records_hold_digests_never_blobs_or_keys(sqlite_gateway: Gateway) -> None:
    response, _ = await sqlite_gateway.post("/v1/kzg/blob-to-commitment", {"blob": hx(BLOB)})
    [record] = await sqlite_gateway.audit_records(response.headers["X-Request-ID"])
    stored = repr(record)
    assert BLOB.hex()[:64] not in stored
    assert await sqlite_gateway.api_key() not in stored
    assert len(record["input_digests"]) < 200


UNKNOWN_KEY = "kzg_0000000000000000_" + "A" * 43


def _hashes(receipt: dict) -> list[str]:
    """The inclusion hashes of a receipt's tlog-proof, as written (base64)."""
    lines = receipt["proof"].split("\n")
    return lines[2 : lines.index("")]


async def test_log_routes_need_a_credential_and_prove_receipts(gateway: Gateway) -> None:
    # The verifier keys are public: a client pins them before it trusts any receipt.
    response, listing = await gateway.request("GET", "/v1/log/keys", role=None)
    assert response.status == 200, listing
    vkeys = vkeys_of(listing)
    # The first release's BLS receipt keys stay listed for old receipts; none is made now.
    response, legacy = await gateway.request("GET", "/v1/keys/receipts", role=None)
    assert (response.status, legacy) == (200, {"keys": []})
    response, answer = await gateway.post("/v1/kzg/blob-to-commitment", {"blob": hx(BLOB)})
    assert response.status == 200, answer
    receipt = check_receipt(
        answer, response.headers["X-Request-ID"], vkeys, {"blob": input_sha256(BLOB)}
    )
    index, size = receipt["index"], receipt["size"]

    # Without a credential, or with one that is not valid, every log route but the keys
    # answers 401 (audited), whatever the query.
    routes = (
        "/v1/log/checkpoint",
        f"/v1/log/proof/inclusion?index={index}&size={size}",
        f"/v1/log/proof/consistency?old={size}&size={size}",
    )
    for path in routes:
        for headers, code in (({}, "unauthenticated"), ({"X-API-Key": UNKNOWN_KEY}, None)):
            refused, body = await gateway.request("GET", path, role=None, headers=headers)
            assert refused.status == 401, (path, body)
            assert code is None or body["error"]["code"] == code
            assert "hashes" not in body
            [record] = await gateway.audit_records(refused.headers["X-Request-ID"])
            assert (record["http_status"], record["outcome"]) == (401, "unauthenticated")

    # A client API key reads them all. The checkpoint is the signed note, as text.
    response, note = await gateway.request("GET", "/v1/log/checkpoint", role="client")
    assert response.status == 200 and response.content_type == "text/plain"
    origin, latest, latest_root = reference_tlog.open_checkpoint(note.decode(), vkeys)
    assert origin == ORIGIN and latest > size  # the receipt's own request came later
    # The inclusion proof the route gives is the receipt's own.
    response, inclusion = await gateway.request(
        "GET", f"/v1/log/proof/inclusion?index={index}&size={size}"
    )
    assert response.status == 200, inclusion
    assert inclusion == {"index": index, "size": size, "hashes": _hashes(answer["receipt"])}
    # The same entry is in the later tree, and that tree extends the receipt's.
    response, inclusion = await gateway.request(
        "GET", f"/v1/log/proof/inclusion?index={index}&size={latest}"
    )
    assert response.status == 200, inclusion
    leaf = reference_tlog.leaf_hash(answer["receipt"]["entry"].encode())
    path = [base64.b64decode(h) for h in inclusion["hashes"]]
    assert reference_tlog.verify_inclusion(leaf, index, latest, path, latest_root)
    response, consistency = await gateway.request(
        "GET", f"/v1/log/proof/consistency?old={size}&size={latest}"
    )
    assert response.status == 200, consistency
    assert (consistency["old"], consistency["size"]) == (size, latest)
    hashes = [base64.b64decode(h) for h in consistency["hashes"]]
    assert reference_tlog.verify_consistency(size, latest, receipt["root"], latest_root, hashes)
    # A proof between different trees, or to another root, is refused by the verifier.
    assert not reference_tlog.verify_consistency(
        size, latest, receipt["root"], receipt["root"], hashes
    )


async def test_log_proofs_refuse_sizes_never_checkpointed(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    _, listing = await gw.request("GET", "/v1/log/keys", role=None)
    # A head is signed at start (init's records, the start's checkpoint): a verifier has
    # one before any request of its own is logged.
    response, note = await gw.request("GET", "/v1/log/checkpoint")
    assert response.status == 200, note
    _, at_start, _ = reference_tlog.open_checkpoint(note.decode(), vkeys_of(listing))
    response, note = await gw.request("GET", "/v1/log/checkpoint")
    _, size, _ = reference_tlog.open_checkpoint(note.decode(), vkeys_of(listing))
    assert size == at_start + 1  # the checkpoint request before this one
    cases = [
        (f"/v1/log/proof/inclusion?index=0&size={size + 1000}", "invalid_size"),
        (f"/v1/log/proof/inclusion?index={size}&size={size}", "invalid_index"),
        (f"/v1/log/proof/consistency?old={size}&size={size + 1000}", "invalid_size"),
        (f"/v1/log/proof/consistency?old={size + 1}&size={size}", "invalid_old"),
        (f"/v1/log/proof/consistency?old=0&size={size}", "invalid_query"),
        ("/v1/log/proof/inclusion?index=0", "invalid_query"),
        (f"/v1/log/proof/inclusion?index=0&size={size}&extra=1", "invalid_query"),
        (f"/v1/log/proof/inclusion?index=x&size={size}", "invalid_query"),
    ]
    for path, code in cases:
        response, body = await gw.request("GET", path)
        assert (response.status, body["error"]["code"]) == (400, code), (path, body)
        [record] = await gw.audit_records(response.headers["X-Request-ID"])
        assert (record["http_status"], record["outcome"]) == (400, "invalid")


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
        # The answer after the outage carries a receipt of the same, unbroken log.
        _, listing = await gw.request("GET", "/v1/log/keys", role=None)
        check_receipt(answer, response.headers["X-Request-ID"], vkeys_of(listing))
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
