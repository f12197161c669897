"""What one client may hold of the server, over real TLS sockets: slow headers and slow
bodies are cut off, unfinished TLS handshakes time out, connections beyond the limits
(in all, per address) are closed on arrival, and requests the HTTP parser refuses are
answered with the error envelope and audited."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from auth.ratelimit import client_group
from gateway.appkeys import METRICS
from tests.gateway.conftest import CHEAP_ARGON2, Gateway, StartGateway
from tests.gateway.helpers import IDENTITY_PROOF

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n"


async def _connect(
    gw: Gateway, source: str = "127.0.0.1", tls: bool = True
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(gw.url)
    return await asyncio.open_connection(
        url.hostname,
        url.port,
        ssl=gw.ssl_context() if tls else None,
        local_addr=(source, 0),
    )


def _parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    decoded = (
        json.loads(body) if headers.get("content-type", "").startswith("application/json") else body
    )
    return int(status_line.split()[1]), headers, decoded


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Send /healthz on a kept-alive connection; return the status (0 when closed)."""
    writer.write(HEALTHZ)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return int(head.split()[1])


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """Read until the server closes the connection; fail if it has not within ``within``."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except (ConnectionResetError, BrokenPipeError):
        return b""


def _refused(gw: Gateway, limit: str) -> float:
    value = gw.app[METRICS].registry.get_sample_value(
        "kzg_connections_refused_total", {"limit": limit}
    )
    return value or 0.0


async def test_slow_headers_are_cut_off_at_the_keepalive_timeout(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(server={"keepalive_timeout_seconds": 1})
    reader, writer = await _connect(gw)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
    started = time.monotonic()

    async def trickle() -> None:
        for _ in range(50):  # one header line every 0.2 s, never the blank line
            await asyncio.sleep(0.2)
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()

    dripping = asyncio.create_task(trickle())
    answer = await _closed_by_server(reader, 8)
    elapsed = time.monotonic() - started
    dripping.cancel()
    writer.close()
    assert answer == b"", "a request with unfinished headers was answered"
    assert elapsed < 5, f"slow headers held the connection {elapsed:.1f} s"
    # Well-behaved clients are unaffected.
    response, _ = await gw.request("GET", "/healthz", role=None)
    assert response.status == 200


async def test_unfinished_tls_handshake_times_out(start_gateway: StartGateway) -> None:
    gw = await start_gateway(server={"tls_handshake_timeout_seconds": 1})
    reader, writer = await _connect(gw, tls=False)  # TCP only: the handshake never starts
    started = time.monotonic()
    assert await _closed_by_server(reader, 8) == b""
    assert time.monotonic() - started < 5
    writer.close()


async def test_connections_beyond_the_limits_are_closed_on_arrival(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(server={"max_connections": 3, "max_connections_per_address": 2})
    held = [await _connect(gw) for _ in range(2)]
    for reader, writer in held:
        assert await _exchange(reader, writer) == 200

    # A third connection from the same address is over the per-address limit.
    reader, writer = await _connect(gw)
    writer.write(HEALTHZ)
    assert await _closed_by_server(reader, 8) == b""
    writer.close()
    assert _refused(gw, "max_connections_per_address") == 1

    # Another address still gets in, up to the total limit.
    other = await _connect(gw, source="127.0.0.2")
    assert await _exchange(*other) == 200
    reader, writer = await _connect(gw, source="127.0.0.3")
    writer.write(HEALTHZ)
    assert await _closed_by_server(reader, 8) == b""
    writer.close()
    assert _refused(gw, "max_connections") == 1
    assert gw.app[METRICS].registry.get_sample_value("kzg_open_connections") == 3

    # Closing one frees its place.
    held[0][1].close()
    await held[0][1].wait_closed()
    deadline = time.monotonic() + 5
    while gw.app[METRICS].registry.get_sample_value("kzg_open_connections") != 2:
        assert time.monotonic() < deadline, "the closed connection was not released"
        await asyncio.sleep(0.05)
    again = await _connect(gw)
    assert await _exchange(*again) == 200
    for _, writer in (held[1], other, again):
        writer.close()


async def test_slow_body_is_answered_408_audited_and_closed(start_gateway: StartGateway) -> None:
    gw = await start_gateway(server={"body_timeout_seconds": 1})
    key = await gw.api_key()
    reader, writer = await _connect(gw)
    writer.write(
        b"POST /v1/kzg/verify-proof HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\nContent-Length: 400\r\n"
        + f"X-API-Key: {key}\r\n\r\n".encode()
        + b'{"commitment": "0xc0'
    )
    started = time.monotonic()
    raw = await _closed_by_server(reader, 15)
    # 1 s for the body, then at most 2 s of lingering before the connection is closed.
    assert time.monotonic() - started < 8
    writer.close()
    status, headers, body = _parse(raw)
    assert status == 408 and body["error"]["code"] == "body_timeout"
    assert headers["connection"] == "close"
    [record] = await gw.audit_records(headers["x-request-id"])
    assert (record["http_status"], record["outcome"]) == (408, "timeout")
    assert record["action"] == "verify_kzg_proof"


async def test_requests_the_parser_refuses_are_enveloped_and_audited(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(server={"max_header_bytes": 1024, "max_headers": 16})
    secretish = b"s3cr3t" * 400
    cases = {
        "header too long": b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Big: "
        + secretish
        + b"\r\n\r\n",
        "too many headers": b"GET /healthz HTTP/1.1\r\n"
        + b"".join(b"X-H%d: 1\r\n" % i for i in range(40))
        + b"\r\n",
        "not HTTP": b"\x16\x03\x01 hello\r\n\r\n",
    }
    for name, payload in cases.items():
        reader, writer = await _connect(gw)
        writer.write(payload)
        raw = await _closed_by_server(reader, 10)
        writer.close()
        status, headers, body = _parse(raw)
        assert status == 400, name
        assert body["error"]["code"] == "malformed_request", name
        [record] = await gw.audit_records(headers["x-request-id"])
        assert record["http_status"] == 400 and record["outcome"] == "invalid", name
        assert "malformed HTTP request" in record["detail"], name
        assert "s3cr3t" not in json.dumps(record, default=str), name
        assert b"s3cr3t" not in raw, name  # nor echoed back in the answer


def test_the_per_address_limit_counts_an_ipv6_64_as_one_client() -> None:
    one = client_group("2001:db8:1:2::1")
    assert one == client_group("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_group("2001:db8:1:3::1") != one
    assert client_group("::ffff:10.0.0.1") == client_group("10.0.0.1") == "10.0.0.1"


async def test_authorization_refusals_spend_the_rate_limit(start_gateway: StartGateway) -> None:
    """A client probing routes its role lacks pays for each 403 like any request: once its
    budget is spent, even the routes it may call answer 429."""
    gw = await start_gateway(
        auth={**CHEAP_ARGON2, "ratelimit": {"client": {"rate": 0.01, "burst": 3}}}
    )
    statuses = []
    for _ in range(3):
        response, body = await gw.request("GET", "/v1/audit/events")
        assert body["error"]["code"] in ("forbidden", "rate_limited")
        statuses.append(response.status)
    allowed, body = await gw.post("/v1/kzg/verify-proof", IDENTITY_PROOF)
    assert statuses == [403, 403, 403]
    assert allowed.status == 429, body
    assert int(allowed.headers["Retry-After"]) >= 1
    refused, _ = await gw.request("GET", "/v1/audit/events")
    assert refused.status == 429
    [record] = await gw.audit_records(refused.headers["X-Request-ID"])
    assert record["outcome"] == "rate_limited"
