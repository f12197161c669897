"""Probes and scrapes over real HTTPS on SQLite and PostgreSQL: unrecorded by default and
counted instead, recorded with ``[audit] record_probes = true``; /metrics needs
``metrics:read`` (the monitor role) unless ``[metrics] public = true``; the Server header
names only the product; the settings refuse what they do not know."""

from __future__ import annotations

import asyncio
import re
import ssl

import pytest

from audit.breaker import CircuitBreaker
from audit.settings import AuditSettings
from gateway.appkeys import STATE
from gateway.settings import MetricsSettings, ServerSettings
from gateway.state import ProbeSettings
from tests.gateway.conftest import Gateway, StartGateway

PROBES = ("/healthz", "/readyz", "/metrics")


def _count(metrics: bytes, route: str) -> float:
    found = re.search(
        rf'^kzg_probes_unrecorded_total\{{route="{route}"\}} (\S+)$', metrics.decode(), re.M
    )
    return float(found.group(1)) if found else 0.0


async def test_probes_are_counted_not_recorded_by_default(gateway: Gateway) -> None:
    ids = []
    for path in PROBES:
        response, _ = await gateway.request("GET", path, role="monitor")
        assert response.status == 200, path
        ids.append(response.headers["X-Request-ID"])
    for request_id in ids:
        assert await gateway.audit_records(request_id) == []
    _, metrics = await gateway.request("GET", "/metrics", role="monitor")
    assert [_count(metrics, p.strip("/")) for p in PROBES] == [1, 1, 1]
    # Every other request is still recorded.
    response, _ = await gateway.request("GET", "/openapi.json", role=None)
    [record] = await gateway.audit_records(response.headers["X-Request-ID"])
    assert record["path"] == "/openapi.json"


async def test_probes_are_recorded_when_configured(start_gateway: StartGateway) -> None:
    gw = await start_gateway(audit={"record_probes": True})
    for path in PROBES:
        response, _ = await gw.request("GET", path, role="monitor")
        assert response.status == 200, path
        [record] = await gw.audit_records(response.headers["X-Request-ID"])
        assert (record["path"], record["http_status"]) == (path, 200)
    _, metrics = await gw.request("GET", "/metrics", role="monitor")
    assert _count(metrics, "healthz") == 0


async def test_metrics_needs_metrics_read(gateway: Gateway) -> None:
    response, body = await gateway.request("GET", "/metrics", role=None)
    assert response.status == 401 and body["error"]["code"] == "unauthenticated"
    # A refused scrape is a security event: recorded although probes are not.
    [record] = await gateway.audit_records(response.headers["X-Request-ID"])
    assert record["http_status"] == 401
    response, body = await gateway.request("GET", "/metrics", role="client")
    assert response.status == 403 and "metrics:read" in body["error"]["message"]
    assert len(await gateway.audit_records(response.headers["X-Request-ID"])) == 1
    response, text = await gateway.request("GET", "/metrics", role="monitor")
    assert response.status == 200 and b"kzg_audit_breaker_state" in text
    # Prometheus sends the key from its credentials_file as a bearer token.
    token = await gateway.api_key("monitor")
    response, text = await gateway.request(
        "GET", "/metrics", role=None, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status == 200 and b"kzg_http_requests_total" in text
    # The monitor role opens nothing else.
    response, _ = await gateway.post("/v1/kzg/verify-proof", {}, role="monitor")
    assert response.status == 403


async def test_metrics_public_when_configured(start_gateway: StartGateway) -> None:
    gw = await start_gateway(metrics={"public": True})
    response, text = await gw.request("GET", "/metrics", role=None)
    assert response.status == 200 and b"process_resident_memory_bytes" in text


async def test_server_header_names_no_versions(sqlite_gateway: Gateway) -> None:
    for path in ("/healthz", "/v1/nowhere"):
        response, _ = await sqlite_gateway.request("GET", path, role=None)
        assert response.headers["Server"] == "kzg-gateway", path
    # The answer to a request the HTTP parser refuses, too.
    host, port = sqlite_gateway.url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(sqlite_gateway.ca_file))
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    await writer.drain()
    head = (await reader.read(4096)).decode()
    writer.close()
    assert head.split(" ", 2)[1] == "400"
    assert "\r\nServer: kzg-gateway\r\n" in head
    assert "Python" not in head and "aiohttp" not in head


async def test_readyz_reports_the_breaker(sqlite_gateway: Gateway) -> None:
    breaker = sqlite_gateway.app[STATE].breaker
    for _ in range(breaker.failure_threshold):
        breaker.record_failure()
    response, body = await sqlite_gateway.request("GET", "/readyz", role=None)
    assert response.status == 503 and body["breaker"] == "open"
    # Refused at once, before authentication: no engine work, no credential check.
    response, body = await sqlite_gateway.post("/v1/kzg/verify-proof", {}, role=None)
    assert response.status == 503 and body["error"]["code"] == "audit_unavailable"
    assert response.headers["Retry-After"] == str(round(breaker.recovery_timeout))
    breaker.record_success()
    response, body = await sqlite_gateway.request("GET", "/readyz", role=None)
    assert response.status == 200 and body["breaker"] == "closed"


def test_breaker_opens_half_opens_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=3, recovery_timeout=10, clock=lambda: now[0])
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not consecutive: starts again
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow(), "one trial at a time"
    breaker.record_failure()  # the trial failed: open again for a full period
    assert breaker.state == "open"
    now[0] = 20.0
    assert breaker.allow()
    now[0] = 30.0  # the trial never reported: another one is let through
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"record_probes": "yes"}, r"\[audit\] record_probes must be true or false"),
        ({"breaker_failure_threshold": 0}, r"\[audit\] breaker_failure_threshold must be at"),
        ({"breaker_recovery_timeout_seconds": 0}, r"\[audit\] breaker_recovery_timeout_seconds"),
    ],
)
def test_audit_settings_refuse_bad_values(section: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AuditSettings.from_mapping(section)


def test_probe_settings_refuse_unknown_and_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown \\[metrics\\] key 'open'"):
        MetricsSettings.from_mapping({"open": True})
    with pytest.raises(ValueError, match=r"\[metrics\] public must be true or false"):
        MetricsSettings.from_mapping({"public": "true"})
    with pytest.raises(ValueError, match=r"server\.readiness_interval_seconds"):
        ProbeSettings.from_settings(ServerSettings.from_mapping({"readiness_interval_seconds": 0}))
    assert AuditSettings().record_probes is False


async def test_probes_are_not_rate_limited(start_gateway: StartGateway) -> None:
    from tests.gateway.conftest import CHEAP_ARGON2

    limited = {"ratelimit": {"anonymous": {"rate": 0.1, "burst": 2}}}
    gw = await start_gateway(auth={**CHEAP_ARGON2, **limited})
    # Probes share the node's address with other clients: never a 429 to kubelet.
    for _ in range(5):
        for path in ("/healthz", "/readyz"):
            response, _ = await gw.request("GET", path, role=None)
            assert response.status == 200, path
    statuses = [(await gw.request("GET", "/openapi.json", role=None))[0].status for _ in range(4)]
    assert 429 in statuses, "other anonymous routes keep their limit"


async def test_readiness_needs_free_space_under_the_sqlite_directory(
    start_gateway: StartGateway,
) -> None:
    # More than any disk here holds: the data directory counts as full.
    gw = await start_gateway(server={"min_free_disk_mib": 2**40})
    response, body = await gw.request("GET", "/readyz", role=None)
    assert response.status == 503 and body["checks"]["disk"] is False
    assert body["checks"]["database"] is True
    _, metrics = await gw.request("GET", "/metrics", role="monitor")
    free = re.search(rb'^kzg_data_dir_free_bytes\{path="[^"]+"\} (\S+)$', metrics, re.M)
    assert free and float(free.group(1)) > 0
    assert b'kzg_readiness_check{check="disk"} 0.0' in metrics
