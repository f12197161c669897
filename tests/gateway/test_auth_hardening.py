"""The security review's findings, each over the real HTTPS server on SQLite and
PostgreSQL: fake API keys cost no argon2 once the client's failure budget is spent (and
none at all for an id that does not exist), argon2 saturated means 503 rather than a
queue, a key_admin cannot mint keys above its own rights, a policy that stops allowing a
role for API keys disables the existing ones, and concurrent wrong passwords each count.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any

import pyotp
import pytest
from sqlalchemy import select

from auth.models import users
from auth.policy import POLICY_DIR
from gateway.appkeys import METRICS
from gateway.db import make_engine
from gateway.identity import AUTH_SERVICE
from tests.gateway.conftest import CHEAP_ARGON2, Gateway, StartGateway
from tests.gateway.helpers import IDENTITY_PROOF

FAILURE_BURST = 4


async def _start(
    request: pytest.FixtureRequest, start_gateway: StartGateway, **sections: Any
) -> Gateway:
    database = request.getfixturevalue("pg_database") if request.param == "postgresql" else None
    return await start_gateway(database, **sections)


def _verifications(gw: Gateway, credential: str) -> float:
    registry = gw.app[METRICS].registry
    value = registry.get_sample_value(
        "kzg_password_hash_verifications_total", {"credential": credential}
    )
    return value or 0.0


async def _reason(gw: Gateway, request_id: str) -> str:
    (record,) = await gw.audit_records(request_id)
    return str(json.loads(record["detail"]).get("reason", ""))


async def _person(gw: Gateway, username: str, role: str) -> dict[str, str]:
    """A person holding ``role``, logged in with password and code: their header."""
    created = await gw.app[AUTH_SERVICE].create_user(username, [role])
    login = {
        "username": username,
        "password": created["password"],
        "totp": pyotp.TOTP(created["totp_secret"]).now(),
    }
    response, body = await gw.post("/v1/auth/login", login, role=None)
    assert response.status == 200, body
    return {"Authorization": f"Bearer {body['access_token']}"}


@pytest.fixture(params=["sqlite", "postgresql"])
async def tight_budget(request: pytest.FixtureRequest, start_gateway: StartGateway) -> Gateway:
    """A gateway whose anonymous budget is FAILURE_BURST and does not refill in a test."""
    limits = {"anonymous": {"rate": 0.0001, "burst": FAILURE_BURST}}
    return await _start(request, start_gateway, auth={**CHEAP_ARGON2, "ratelimit": limits})


async def test_a_flood_of_fake_keys_meets_429_without_argon2(tight_budget: Gateway) -> None:
    """Given a real key's public id, when one address floods the gateway with made-up
    secrets for it, then argon2 runs only while its failure budget lasts: the rest are
    429 with Retry-After, audited, and the verification counter stops."""
    gw = tight_budget
    real = await gw.app[AUTH_SERVICE].create_api_key("prover", "client", "tests")
    other = await gw.app[AUTH_SERVICE].create_api_key("other", "client", "tests")
    # A client behind the same address (NAT) whose key is already verified and cached.
    response, _ = await gw.post(
        "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers={"X-API-Key": real["api_key"]}
    )
    assert response.status == 200
    fake = {"X-API-Key": f"kzg_{real['id']}_{secrets.token_urlsafe(32)}"}
    statuses = []
    for _ in range(3 * FAILURE_BURST):
        response, body = await gw.post(
            "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers=fake
        )
        statuses.append(response.status)
        if response.status == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert body["error"]["code"] == "rate_limited"
    assert statuses == [401] * FAILURE_BURST + [429] * (2 * FAILURE_BURST)
    assert _verifications(gw, "api_key") == 1 + FAILURE_BURST
    assert await _reason(gw, body["error"]["request_id"]) == "failed-credential budget spent"
    # The verified key is still served from the cache: the flood does not lock it out.
    response, _ = await gw.post(
        "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers={"X-API-Key": real["api_key"]}
    )
    assert response.status == 200
    # A key not verified yet waits for the budget like the flood, without argon2.
    response, _ = await gw.post(
        "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers={"X-API-Key": other["api_key"]}
    )
    assert response.status == 429
    assert _verifications(gw, "api_key") == 1 + FAILURE_BURST
    # Read in-process: a monitor key verified now would meet the spent budget too.
    line = f'kzg_password_hash_verifications_total{{credential="api_key"}} {1 + FAILURE_BURST}.0'
    assert line in gw.app[METRICS].render().decode()


async def test_unknown_key_ids_cost_no_argon2(tight_budget: Gateway) -> None:
    """Given keys whose public id does not exist, then each is the same 401 as a wrong
    secret, and no argon2 verification runs for any of them."""
    gw = tight_budget
    real = await gw.app[AUTH_SERVICE].create_api_key("prover", "client", "tests")
    answers = []
    for key_id in [secrets.token_hex(8) for _ in range(FAILURE_BURST - 1)] + [real["id"]]:
        headers = {"X-API-Key": f"kzg_{key_id}_{secrets.token_urlsafe(32)}"}
        response, body = await gw.post(
            "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers=headers
        )
        answers.append((response.status, body["error"]["code"], body["error"]["message"]))
    assert len(set(answers)) == 1 and answers[0][0] == 401
    assert _verifications(gw, "api_key") == 1  # the real id's wrong secret only


@pytest.fixture(params=["sqlite", "postgresql"])
async def one_hashing_thread(
    request: pytest.FixtureRequest, start_gateway: StartGateway
) -> Gateway:
    passwords = {**CHEAP_ARGON2["passwords"], "hashing_threads": 1, "hashing_queue": 0}
    return await _start(request, start_gateway, auth={"passwords": passwords})


async def test_saturated_argon2_answers_503_at_once(one_hashing_thread: Gateway) -> None:
    """Given argon2's only thread taken, when a new API key and a login arrive, then both
    are answered 503 with Retry-After and audited, not queued; once the thread is free
    both succeed."""
    gw = one_hashing_thread
    service = gw.app[AUTH_SERVICE]
    key = (await service.create_api_key("prover", "client", "tests"))["api_key"]
    person = await service.create_user("carol", ["client"])
    login = {"username": "carol", "password": person["password"]}
    release = threading.Event()
    occupied = asyncio.ensure_future(service.hashing.run(release.wait))
    try:
        while service.hashing.pending < 1:
            await asyncio.sleep(0.01)
        response, body = await gw.post(
            "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers={"X-API-Key": key}
        )
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
        assert "saturated" in await _reason(gw, body["error"]["request_id"])
        response, body = await gw.post("/v1/auth/login", login, role=None)
        assert response.status == 503 and int(response.headers["Retry-After"]) >= 1
        (record,) = await gw.audit_records(body["error"]["request_id"])
        assert record["http_status"] == 503
    finally:
        release.set()
        await occupied
    response, _ = await gw.post(
        "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers={"X-API-Key": key}
    )
    assert response.status == 200
    assert (await gw.post("/v1/auth/login", login, role=None))[0].status == 200


@pytest.fixture(params=["sqlite", "postgresql"])
async def secured(request: pytest.FixtureRequest, start_gateway: StartGateway) -> Gateway:
    return await _start(request, start_gateway)


async def test_key_admin_issues_only_keys_within_its_own_rights(secured: Gateway) -> None:
    """Given a key_admin (no audit access), when it asks for an auditor key or to rotate
    one, then it is refused 403, audited, and the existing key keeps working; a client
    key it may issue, and an admin may issue an auditor key."""
    gw = secured
    boss = await _person(gw, "keyboss", "key_admin")
    response, body = await gw.post(
        "/v1/admin/api-keys", {"name": "reader", "role": "auditor"}, role=None, headers=boss
    )
    assert (response.status, body["error"]["code"]) == (403, "forbidden")
    (record,) = await gw.audit_records(body["error"]["request_id"])
    assert (record["http_status"], record["outcome"]) == (403, "denied")
    assert not [k for k in await gw.app[AUTH_SERVICE].list_api_keys() if k["role"] == "auditor"]

    response, created = await gw.post(
        "/v1/admin/api-keys", {"name": "prover", "role": "client"}, role=None, headers=boss
    )
    assert response.status == 200, created
    response, _ = await gw.post(
        "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers={"X-API-Key": created["api_key"]}
    )
    assert response.status == 200

    reader = await gw.app[AUTH_SERVICE].create_api_key("verifier", "auditor", "tests")
    response, body = await gw.post(
        f"/v1/admin/api-keys/{reader['id']}/rotate", {}, role=None, headers=boss
    )
    assert response.status == 403, body
    response, _ = await gw.request(
        "GET", "/v1/audit/verify", role=None, headers={"X-API-Key": reader["api_key"]}
    )
    assert response.status == 200, "a refused rotation leaves the key as it was"

    chief = await _person(gw, "chief", "admin")
    response, body = await gw.post(
        "/v1/admin/api-keys", {"name": "reader", "role": "auditor"}, role=None, headers=chief
    )
    assert response.status == 200, body


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_tightened_policy_disables_existing_keys(
    kind: str, start_gateway: StartGateway, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Given an auditor API key in use, when the gateway restarts with a policy that no
    longer lets API keys hold the auditor role, then that key is refused (401, audited)."""
    database = request.getfixturevalue("pg_database") if kind == "postgresql" else None
    before = await start_gateway(database, name="gw")
    reader = await before.app[AUTH_SERVICE].create_api_key("verifier", "auditor", "tests")
    headers = {"X-API-Key": reader["api_key"]}
    response, _ = await before.request("GET", "/v1/audit/verify", role=None, headers=headers)
    assert response.status == 200
    await before.close()
    await before.runner.cleanup()

    tight = tmp_path / "tight-policies"
    shutil.copytree(POLICY_DIR, tight)
    rbac = (tight / "rbac.toml").read_text()
    allowed = (
        "[roles.auditor]\n"
        'permissions = ["audit:read", "access:review", "log:read", "password:own"]\n'
        "mfa = true\n"
    )
    assert allowed + "api_keys = true" in rbac
    (tight / "rbac.toml").write_text(
        rbac.replace(allowed + "api_keys = true", allowed + "api_keys = false")
    )
    after = await start_gateway(database, name="gw", policy_dir=str(tight))
    response, body = await after.request("GET", "/v1/audit/verify", role=None, headers=headers)
    assert (response.status, body["error"]["code"]) == (401, "invalid_credentials")
    assert "no longer allows" in await _reason(after, body["error"]["request_id"])


async def test_concurrent_wrong_passwords_each_count(secured: Gateway) -> None:
    """Given a person, when wrong passwords arrive at once, then every one heard is
    counted for the account (none lost to a read-then-write race), the rest wait (429),
    and nothing locks the account."""
    gw = secured
    service = gw.app[AUTH_SERVICE]
    await service.create_user("victim", ["client"])
    attempts = 8  # within what the hashing threads and queue take at once
    wrong = {"username": "victim", "password": "not-the-password-at-all"}
    answers = await asyncio.gather(
        *(gw.post("/v1/auth/login", wrong, role=None) for _ in range(attempts))
    )
    statuses = [response.status for response, _ in answers]
    assert set(statuses) <= {401, 429} and 401 in statuses
    engine = make_engine(gw.app_url)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(select(users).where(users.c.username == "victim"))).one()
    finally:
        await engine.dispose()
    assert row.failed_logins == statuses.count(401)
    assert row.locked_until is None
