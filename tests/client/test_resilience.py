"""What the client does when the gateway refuses or cannot answer: real 429s (a tight
rate-limit policy) and real 503s (a saturated pool of one worker) are retried after the
``Retry-After`` they carry; error envelopes become one exception class per family, each
with the request id; timeouts and dead ends raise; people log in and are logged in
again before their token expires."""

from __future__ import annotations

import logging
import re
import socket
import time

import pyotp
import pytest

from gateway.client import (
    Forbidden,
    GatewayError,
    InvalidResponse,
    NotFound,
    RateLimited,
    RequestError,
    ServerError,
    Timeout,
    TooLarge,
    TransportError,
    Unauthenticated,
    Unavailable,
)
from gateway.client._errors import error_for_answer, parse_retry_after
from tests.client.conftest import CHEAP_ARGON2, Gateways, LiveGateway

INFINITY = bytes([0xC0]) + bytes(47)
IDENTITY = (INFINITY, bytes(32), bytes(32), INFINITY)  # the zero polynomial at z = 0
RETRY = re.compile(r"(\d{3}) (\w+) \(request (\w+)\); retry \d+/\d+ in ([\d.]+) s")


def _retries(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str, str, float]]:
    """(status, code, request id, wait) of every retry the client logged."""
    found = []
    for record in caplog.records:
        if record.name == "gateway.client" and (match := RETRY.search(record.getMessage())):
            found.append((int(match[1]), match[2], match[3], float(match[4])))
    return found


def test_a_429_is_retried_after_its_retry_after(
    gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a client role allowed one request a second, when two calls come at once, the
    second is refused 429 with Retry-After and the client sends it again no sooner."""
    limits = {"client": {"rate": 1, "burst": 1}}
    gateway = gateways.start(auth={**CHEAP_ARGON2, "ratelimit": limits})
    client = gateway.client(check_consistency=False)
    caplog.set_level(logging.INFO, logger="gateway.client")
    client.verify_kzg_proof(*IDENTITY)

    started = time.monotonic()
    result = client.verify_kzg_proof(*IDENTITY)
    elapsed = time.monotonic() - started

    assert result.valid is True
    retries = _retries(caplog)
    assert retries and all(status == 429 and code == "rate_limited" for status, code, *_ in retries)
    assert all(wait >= 1.0 for *_, wait in retries), "waited less than Retry-After"
    assert elapsed >= sum(wait for *_, wait in retries)
    # The refused attempt is in the audit log under the id the client logged.
    [record] = gateway.audit_records(retries[0][2])
    assert (record["http_status"], record["outcome"]) == (429, "rate_limited")

    # Without retries the 429 reaches the caller, with what it needs to decide.
    impatient = gateway.client(retries=0, check_consistency=False)
    with pytest.raises(RateLimited) as refused:
        impatient.verify_kzg_proof(*IDENTITY)
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    assert refused.value.request_id and refused.value.status == 429


def test_a_503_from_a_saturated_pool_is_retried_after_its_retry_after(
    gateways: Gateways, caplog: pytest.LogCaptureFixture
) -> None:
    """Given one worker, busy, and a full queue, the gateway sheds the call with 503 and
    Retry-After: 2; the client waits that long and then gets its verified result."""
    gateway = gateways.start(pool={"workers": 1, "max_queue": 1, "retry_after_seconds": 2})
    client = gateway.client()
    client.verify_kzg_proof(*IDENTITY)  # connected, key cached: the timing is the retry's
    caplog.set_level(logging.INFO, logger="gateway.client")

    held = gateway.hold_workers(1.5, calls=2)  # one running, one queued
    started = time.monotonic()
    result = client.verify_kzg_proof(*IDENTITY)
    elapsed = time.monotonic() - started

    assert result.valid is True and result.verified is not None
    [(status, code, request_id, wait)] = _retries(caplog)[:1]
    assert (status, code) == (503, "overloaded") and wait >= 2.0
    assert elapsed >= 2.0
    [record] = gateway.audit_records(request_id)
    assert record["http_status"] == 503 and record["outcome"] == "unavailable"
    for future in held:
        future.result(10)


def test_a_503_beyond_the_retry_budget_raises_unavailable(gateways: Gateways) -> None:
    gateway = gateways.start(pool={"workers": 1, "max_queue": 1, "retry_after_seconds": 2})
    held = gateway.hold_workers(1.5, calls=2)
    with pytest.raises(Unavailable) as shed:
        gateway.client(retries=0).verify_kzg_proof(*IDENTITY)
    assert (shed.value.status, shed.value.code, shed.value.retry_after) == (503, "overloaded", 2)
    assert shed.value.request_id

    # A Retry-After longer than the client will wait is not slept on: it raises at once.
    started = time.monotonic()
    with pytest.raises(Unavailable):
        gateway.client(max_retry_wait=1).verify_kzg_proof(*IDENTITY)
    assert time.monotonic() - started < 1.5
    for future in held:
        future.result(10)


def test_a_slow_answer_times_out(gateways: Gateways) -> None:
    """Given the only worker busy for 2 s, a call with a 0.3 s timeout raises Timeout
    (not retried: the gateway may still be working on it)."""
    gateway = gateways.start(pool={"workers": 1, "max_queue": 4})
    client = gateway.client(timeout=0.3)
    held = gateway.hold_workers(2.0, calls=1)
    started = time.monotonic()
    with pytest.raises(Timeout) as late:
        client.verify_kzg_proof(*IDENTITY)
    assert time.monotonic() - started < 1.5
    assert late.value.status is None and late.value.code == "timeout"
    held[0].result(10)


def test_no_gateway_and_an_untrusted_certificate_are_transport_errors(
    gateway: LiveGateway,
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nobody = gateway.client(base_url=f"https://127.0.0.1:{port}", retries=1, backoff=0.01)
    with pytest.raises(TransportError) as dead:
        nobody.verify_kzg_proof(*IDENTITY)
    assert dead.value.status is None and dead.value.request_id is None
    # The system trust store does not know the dev CA: TLS fails, and is not retried.
    with pytest.raises(TransportError, match="TLS"):
        gateway.client(ca_file=None).verify_kzg_proof(*IDENTITY)


def test_error_envelopes_map_to_one_class_per_family(gateway: LiveGateway) -> None:
    """Real refusals: a wrong API key, a role without the permission, a body too large."""
    with pytest.raises(Unauthenticated) as unknown:
        gateway.client(api_key="kzg_not_a_key").verify_kzg_proof(*IDENTITY)
    assert unknown.value.status == 401 and unknown.value.request_id
    with pytest.raises(Forbidden) as auditor:
        gateway.client(api_key=gateway.api_key("auditor")).verify_kzg_proof(*IDENTITY)
    assert auditor.value.code == "forbidden" and "kzg:verify" in auditor.value.message
    too_many = [bytes(131072)] * 65  # over the route's body limit (64 blobs)
    with pytest.raises(TooLarge) as large:
        gateway.client().verify_blob_kzg_proof_batch(too_many, [INFINITY] * 65, [INFINITY] * 65)
    assert large.value.status == 413 and large.value.request_id
    for error in (unknown.value, auditor.value, large.value):
        assert gateway.audit_records(str(error.request_id))


@pytest.mark.parametrize(
    ("status", "family"),
    [
        (400, RequestError),
        (404, NotFound),
        (405, RequestError),
        (415, RequestError),
        (500, ServerError),
        (501, ServerError),
        (503, Unavailable),
        (302, InvalidResponse),
    ],
)
def test_statuses_without_a_live_route_map_by_family(
    status: int, family: type[GatewayError]
) -> None:
    body = b'{"error": {"code": "c", "message": "m", "request_id": "r1"}}'
    error = error_for_answer(status, body, {"Retry-After": "3"}, None)
    assert type(error) is family or isinstance(error, family)
    assert (error.status, error.code, error.message, error.request_id) == (status, "c", "m", "r1")
    assert error.retry_after == 3.0
    # A proxy's own answer, not an envelope: still the family of its status.
    plain = error_for_answer(status, b"<html>bad gateway</html>", {}, "r2")
    assert isinstance(plain, family) and plain.code == f"http_{status}"


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_a_person_logs_in_and_is_logged_in_again_before_the_token_expires(
    gateways: Gateways,
) -> None:
    """Given tokens valid for 3 s, a person with the client role calls, waits past the
    expiry and calls again: the client logged in again by itself, with a fresh TOTP code
    (a code is accepted once: the source is asked until it gives a new one)."""
    gateway = gateways.start(auth={**CHEAP_ARGON2, "tokens": {"ttl_seconds": 3}})
    person = gateway.create_user("alice", ["client"])
    totp = pyotp.TOTP(person["totp_secret"])
    codes = iter([totp.now(), totp.now(), totp.at(time.time() + 30)])
    client = gateway.client(username="alice", password=person["password"], totp=lambda: next(codes))
    first = client.verify_kzg_proof(*IDENTITY)
    assert first.verified is not None
    assert first.verified.entry["detail"]["principal_kind"] == "user"
    time.sleep(3.2)
    second = client.verify_kzg_proof(*IDENTITY)
    assert second.verified is not None
    assert second.verified.entry["actor"] == first.verified.entry["actor"]
    assert next(codes, None) is None, "the refresh did not wait for a new code"


def test_a_wrong_password_raises_unauthenticated(gateway: LiveGateway) -> None:
    gateway.create_user("bob", ["client"])
    with pytest.raises(Unauthenticated) as refused:
        gateway.client(username="bob", password="not-the-password").verify_kzg_proof(*IDENTITY)
    assert refused.value.request_id
