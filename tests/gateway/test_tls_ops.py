"""TLS 1.3 only (and mTLS when configured), the operational routes, metrics, the
OpenAPI document against the registered routes, and draining."""

from __future__ import annotations

import os
import re
import shutil
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from auth.crypto import MasterKey
from auth.policy import POLICY_DIR
from gateway.app import create_app, deny_by_default
from gateway.appkeys import KZG_POOL, STATE
from gateway.openapi import ROUTE_DOCS, openapi_document
from gateway.tls import issue_certificate
from tests.gateway.conftest import Gateway, StartGateway, gateway_config
from tests.gateway.helpers import hx, make_blob


async def test_tls12_only_client_is_refused(sqlite_gateway: Gateway) -> None:
    context = sqlite_gateway.ssl_context(maximum=ssl.TLSVersion.TLSv1_2)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectorError):
            await session.get(f"{sqlite_gateway.url}/healthz", ssl=context)


async def test_tls13_answers_with_request_id(sqlite_gateway: Gateway) -> None:
    response, _ = await sqlite_gateway.request("GET", "/openapi.json", role=None)
    assert response.status == 200
    assert len(response.headers["X-Request-ID"]) == 32
    [record] = await sqlite_gateway.audit_records(response.headers["X-Request-ID"])
    assert record["tls_version"] == "TLSv1.3"


def _client_ca(directory: Path) -> tuple[Path, tuple[Path, Path]]:
    """A client CA and a certificate it issued for ``machine-1``: (CA file, (cert, key))."""
    from cryptography.hazmat.primitives import serialization

    ca_key, ca_cert = issue_certificate("test client CA")
    client_key, client_cert = issue_certificate("machine-1", ca_key, ca_cert, client=True)
    pem = serialization.Encoding.PEM
    (directory / "client-ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "client.pem").write_bytes(client_cert.public_bytes(pem))
    (directory / "client.key").write_bytes(
        client_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return directory / "client-ca.pem", (directory / "client.pem", directory / "client.key")


async def _get(gw: Gateway, path: str, context: ssl.SSLContext) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(gw.url + path, ssl=context) as r:
        return r.status, r.headers["X-Request-ID"]


@pytest.mark.parametrize("mode", ["required", "optional"])
async def test_mtls_checks_client_certificates_from_the_client_ca(
    mode: str, start_gateway: StartGateway, tmp_path: Path
) -> None:
    """``required``: no handshake without a certificate; ``optional``: a client without one
    is served. Either way a certificate is checked and its subject audited."""
    ca_file, chain = _client_ca(tmp_path)
    tls = {"client_ca_file": str(ca_file)}
    gw = await start_gateway(tls=tls if mode == "required" else {**tls, "client_cert": mode})

    if mode == "required":
        with pytest.raises(aiohttp.ClientError):
            await _get(gw, "/healthz", gw.ssl_context())
    else:
        status, request_id = await _get(gw, "/openapi.json", gw.ssl_context())
        assert status == 200
        [record] = await gw.audit_records(request_id)
        assert "machine-1" not in str(record["detail"])

    with_cert = gw.ssl_context()
    with_cert.load_cert_chain(*chain)
    status, request_id = await _get(gw, "/openapi.json", with_cert)
    assert status == 200
    [record] = await gw.audit_records(request_id)
    assert "machine-1" in record["detail"]

    # A certificate from another CA is refused in both modes.
    (tmp_path / "foreign").mkdir()
    _, foreign = _client_ca(tmp_path / "foreign")
    stranger = gw.ssl_context()
    stranger.load_cert_chain(*foreign)
    with pytest.raises(aiohttp.ClientError):
        await _get(gw, "/healthz", stranger)


async def test_readyz_reports_each_dependency_and_turns_503_when_draining(
    sqlite_gateway: Gateway,
) -> None:
    response, body = await sqlite_gateway.request("GET", "/readyz", role=None)
    assert response.status == 200
    assert body["checks"] == {
        "accepting": True,
        "database": True,
        "audit_writer": True,
        "pool": True,
        "keys": True,
        "master_key": True,
        "disk": True,
        "audit_breaker": True,
    }
    sqlite_gateway.app[STATE].draining = True
    response, body = await sqlite_gateway.request("GET", "/readyz", role=None)
    assert response.status == 503 and body["checks"]["accepting"] is False


async def test_worker_metrics_measure_the_pools_workers(sqlite_gateway: Gateway) -> None:
    """The workers are the engine server's children, not the server's: the metrics follow
    the pool's own pids."""
    pids = sqlite_gateway.app[KZG_POOL].pids
    assert pids and all(_parent(pid) != os.getpid() for pid in pids)
    resident = sum(_status_kib(pid, "VmRSS") for pid in pids) * 1024
    response, text = await sqlite_gateway.request("GET", "/metrics", role="monitor")
    assert response.status == 200
    [reported] = re.findall(rb"^kzg_workers_resident_memory_bytes (\S+)$", text, re.M)
    assert resident > 0 and abs(float(reported) - resident) <= resident * 0.1


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _parent(pid: int) -> int:
    return _status_kib(pid, "PPid")


async def test_metrics_count_operations_by_outcome(sqlite_gateway: Gateway) -> None:
    await sqlite_gateway.post("/v1/kzg/blob-to-commitment", {"blob": hx(make_blob(2))})
    await sqlite_gateway.post("/v1/kzg/blob-to-commitment", {"blob": "0x" + "ff" * 131072})
    response, text = await sqlite_gateway.request("GET", "/metrics", role="monitor")
    assert response.status == 200
    metrics = text.decode()
    assert (
        'kzg_operations_total{operation="blob_to_kzg_commitment",outcome="success"} 1.0' in metrics
    )
    assert (
        'kzg_operations_total{operation="blob_to_kzg_commitment",outcome="invalid"} 1.0' in metrics
    )
    for name in (
        "kzg_operation_duration_seconds_bucket",
        "kzg_inflight_requests",
        "kzg_pool_queue_depth",
        "process_resident_memory_bytes",
        "kzg_audit_queue_depth",
        "kzg_audit_head_seq",
        "kzg_audit_tree_size",
        "kzg_audit_checkpoint_timestamp_seconds",
        "kzg_audit_signing_failures_total",
    ):
        assert name in metrics
    values = {
        name: float(value)
        for name, value in re.findall(r"^(kzg_audit_\w+) (\S+)$", metrics, re.MULTILINE)
    }
    # The two answers above were each committed with a signed tree head that covers them.
    assert values["kzg_audit_tree_size"] >= 2
    assert values["kzg_audit_tree_size"] >= values["kzg_audit_head_seq"]
    assert 0 <= time.time() - values["kzg_audit_checkpoint_timestamp_seconds"] < 60
    assert values["kzg_audit_signing_failures_total"] == 0


async def test_openapi_documents_exactly_the_registered_routes(sqlite_gateway: Gateway) -> None:
    response, document = await sqlite_gateway.request("GET", "/openapi.json", role=None)
    assert response.status == 200
    assert document["openapi"] == "3.1.0"
    documented = {
        (method.upper(), path, operation["operationId"])
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    registered = {
        (route.method, route.resource.canonical, route.resource.name)
        for route in sqlite_gateway.app.router.routes()
        if route.method != "HEAD"
    }
    assert documented == registered
    assert document == openapi_document(sqlite_gateway.app)
    kzg = document["paths"]["/v1/kzg/blob-to-commitment"]["post"]
    assert set(kzg["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert kzg["responses"]["200"]["content"]["application/json"]["schema"]["required"] == [
        "commitment",
        "versioned_hash",
        "receipt",
    ]
    assert document["paths"]["/healthz"]["get"]["security"] == []
    # A receipt is the logged entry and its tlog-proof; the log's keys are public, its
    # checkpoint and proofs need a credential.
    receipt = document["components"]["schemas"]["Receipt"]
    assert receipt["required"] == ["entry", "proof"]
    assert set(receipt["properties"]) == {"entry", "proof"}
    assert document["paths"]["/v1/log/keys"]["get"]["security"] == []
    for path in ("/v1/log/checkpoint", "/v1/log/proof/inclusion", "/v1/log/proof/consistency"):
        assert document["paths"][path]["get"]["security"] != [], path
    checkpoint = document["paths"]["/v1/log/checkpoint"]["get"]["responses"]["200"]
    assert set(checkpoint["content"]) == {"text/plain"}
    for path, first in (("/v1/log/proof/inclusion", "index"), ("/v1/log/proof/consistency", "old")):
        parameters = document["paths"][path]["get"]["parameters"]
        assert {(p["name"], p["in"], p["required"]) for p in parameters} == {
            (first, "query", True),
            ("size", "query", True),
        }, path


def _max_blobs(app: web.Application) -> int:
    body = openapi_document(app)["paths"]["/v1/kzg/verify-blob-proof-batch"]["post"]
    return body["requestBody"]["content"]["application/json"]["schema"]["properties"]["blobs"][
        "maxItems"
    ]


def test_two_apps_in_one_process_keep_their_own_route_docs(tmp_path: Path) -> None:
    """Given an app, when a second one with another batch limit and without the identity
    routes is built in the same process, then the first app's document is unchanged, each
    states its own limit, and each app documents exactly the routes it registered."""
    key = MasterKey(MasterKey.generate())
    first = create_app(gateway_config(tmp_path / "first"), master_key=key)
    before = openapi_document(first)
    second = create_app(
        gateway_config(tmp_path / "second", server={"max_batch_blobs": 8}),
        master_key=key,
        security=lambda app, config: [deny_by_default],
    )
    assert openapi_document(first) == before
    assert (_max_blobs(first), _max_blobs(second)) == (64, 8)  # 64: the default limit
    assert "auth_login" in first[ROUTE_DOCS] and "auth_login" not in second[ROUTE_DOCS]
    for app in (first, second):
        named = {
            route.resource.name
            for route in app.router.routes()
            if route.resource is not None and route.resource.name is not None
        }
        assert set(app[ROUTE_DOCS]) == named


async def test_the_policy_file_alone_decides_which_routes_are_public(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Given rbac.toml's [public] without log_keys, then /v1/log/keys needs a credential
    and the OpenAPI document says so; given [metrics] public = true, then /metrics needs
    none and the document says that too."""
    edited = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, edited)
    rbac = (edited / "rbac.toml").read_text()
    assert '"receipt_keys", "log_keys", ' in rbac
    (edited / "rbac.toml").write_text(
        rbac.replace('"receipt_keys", "log_keys", ', '"receipt_keys", ')
    )
    gw = await start_gateway(name="closed", policy_dir=str(edited))
    response, body = await gw.request("GET", "/v1/log/keys", role=None)
    assert (response.status, body["error"]["code"]) == (401, "unauthenticated")
    _, document = await gw.request("GET", "/openapi.json", role=None)
    assert document["paths"]["/v1/log/keys"]["get"]["security"] != []
    assert document["paths"]["/v1/keys/receipts"]["get"]["security"] == []

    gw = await start_gateway(name="open", metrics={"public": True})
    response, _ = await gw.request("GET", "/metrics", role=None)
    assert response.status == 200
    _, document = await gw.request("GET", "/openapi.json", role=None)
    assert document["paths"]["/metrics"]["get"]["security"] == []
    assert document["paths"]["/v1/log/keys"]["get"]["security"] == []


async def test_one_json_access_line_per_request_without_secrets(
    sqlite_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    blob = make_blob(6)
    with caplog.at_level(logging.INFO, logger="kzg_gateway.access"):
        response, _ = await sqlite_gateway.post("/v1/kzg/blob-to-commitment", {"blob": hx(blob)})
    lines = [r.getMessage() for r in caplog.records if r.name == "kzg_gateway.access"]
    [line] = [entry for entry in map(json.loads, lines) if entry["path"] != "/healthz"]
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert line["route"] == "blob_to_kzg_commitment" and line["status"] == 200
    assert line["audit_seq"] >= 1 and line["tls"] == "TLSv1.3"
    text = "\n".join(lines)
    assert await sqlite_gateway.api_key() not in text
    assert blob.hex()[:64] not in text
