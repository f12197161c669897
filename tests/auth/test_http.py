"""Identity through the real HTTPS server, with the real security module, on SQLite and
PostgreSQL: the permission matrix of policies/rbac.toml, MFA, refusals, rate limits, and
no secret in clear anywhere the gateway writes."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyotp
import pytest
from sqlalchemy import update

from audit.events import format_timestamp
from auth.models import api_keys
from auth.policy import load_policies
from auth.service import AuthError
from gateway.db import make_engine
from gateway.identity import AUTH_SERVICE
from gateway.security import install
from tests.auth.conftest import CHEAP_ARGON2, tokens_to_refuse
from tests.gateway.conftest import (  # noqa: F401
    GENEROUS_LIMITS,
    Gateway,
    StartGateway,
    start_gateway,
)
from tests.gateway.helpers import IDENTITY_PROOF

RBAC, _ = load_policies()
PATH_VALUES = {"username": "nobody", "key_id": "0000000000000000", "kid": "no-such-kid"}


@dataclass
class Identities:
    """A credential header per principal, and every secret handed out (for the scan)."""

    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)


async def _login(gw: Gateway, username: str, password: str, secret: str | None) -> str:
    body: dict[str, Any] = {"username": username, "password": password}
    if secret:
        body["totp"] = pyotp.TOTP(secret).now()
    response, answer = await gw.post("/v1/auth/login", body, role=None)
    assert response.status == 200, answer
    assert answer["token_type"] == "Bearer"
    return answer["access_token"]


async def _identities(gw: Gateway) -> Identities:
    service = gw.app[AUTH_SERVICE]
    ids = Identities()
    for role in ("client", "auditor"):
        created = await service.create_api_key(f"{role}-machine", role, "test")
        ids.headers[f"{role} (API key)"] = {"X-API-Key": created["api_key"]}
        ids.roles[f"{role} (API key)"] = (role,)
        ids.secrets.append(created["api_key"])
    for role in ("client", "auditor", "key_admin", "admin"):
        user = await service.create_user(f"{role.replace('_', '')}person", [role])
        token = await _login(gw, user["username"], user["password"], user["totp_secret"])
        ids.headers[f"{role} (person)"] = {"Authorization": f"Bearer {token}"}
        ids.roles[f"{role} (person)"] = (role,)
        ids.secrets += [user["password"], user["totp_secret"], token]
    return ids


@pytest.fixture(params=["sqlite", "postgresql"])
async def secured(request: pytest.FixtureRequest, start_gateway: StartGateway) -> Gateway:  # noqa: F811
    database = request.getfixturevalue("pg_database") if request.param == "postgresql" else None
    # The matrix sends a burst per identity, and refusals spend the rate limit too.
    return await start_gateway(
        database, security=install, auth={**CHEAP_ARGON2, "ratelimit": GENEROUS_LIMITS}
    )


def _route_requests(gw: Gateway) -> dict[str, tuple[str, str]]:
    """Method and a concrete path of every route the RBAC table lists."""
    found = {}
    for route in gw.app.router.routes():
        if route.name in RBAC.routes and route.method != "HEAD":
            info = route.resource.get_info()
            path = info.get("path") or info["formatter"].format(**PATH_VALUES)
            found[route.name] = (route.method, path)
    return found


async def test_permission_matrix_follows_the_policy_file(secured: Gateway) -> None:
    gw = secured
    ids = await _identities(gw)
    routes = _route_requests(gw)
    assert set(routes) == set(RBAC.routes), "every route of the policy is served"
    # Mutating admin routes change state when allowed: they run last, after every check
    # of the other routes. Their path names a user that does not exist (404 when allowed)
    # and a rotated JWT key leaves the tokens of the old one valid.
    order = sorted(routes, key=lambda name: name.startswith("admin_"))
    mismatches = []
    for name in order:
        method, path = routes[name]
        for who, headers in ids.headers.items():
            response, body = await gw.request(
                method, path, role=None, headers=headers, json_body={} if method == "POST" else None
            )
            allowed = RBAC.allows(ids.roles[who], name)
            if allowed and response.status in (401, 403):
                mismatches.append(f"{who} refused {name}: {response.status} {body}")
            if not allowed and response.status != 403:
                mismatches.append(f"{who} reached {name}: {response.status}")
            if not allowed:
                (record,) = await gw.audit_records(response.headers["X-Request-ID"])
                assert (record["outcome"], record["http_status"]) == ("denied", 403)
    assert not mismatches, "\n".join(mismatches)


async def test_refusals_are_precise_and_audited(secured: Gateway) -> None:
    gw = secured
    service = gw.app[AUTH_SERVICE]
    client_key = (await service.create_api_key("c", "client", "test"))["api_key"]
    cases = [
        ({}, 401, "unauthenticated"),
        ({"X-API-Key": "kzg_0000000000000000_" + "A" * 43}, 401, "invalid_credentials"),
        ({"X-API-Key": "not a key"}, 401, "invalid_credentials"),
        ({"Authorization": "Bearer abc.def.ghi"}, 401, "invalid_credentials"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "invalid_credentials"),
        ({"X-API-Key": client_key, "Authorization": "Bearer x"}, 400, "invalid_request"),
    ]
    for headers, status, code in cases:
        response, body = await gw.request("GET", "/v1/audit/verify", role=None, headers=headers)
        assert (response.status, body["error"]["code"]) == (status, code), headers
        if status == 401:
            assert "WWW-Authenticate" in response.headers or code == "unauthenticated"
        (record,) = await gw.audit_records(body["error"]["request_id"])
        assert record["http_status"] == status
        assert client_key not in str(record)


async def test_mfa_is_required_for_a_token_without_it(secured: Gateway) -> None:
    gw = secured
    service = gw.app[AUTH_SERVICE]
    user = await service.create_user("promoted", ["client"])
    token = await _login(gw, "promoted", user["password"], None)
    await service.set_roles("promoted", ["auditor"])
    await service.check_revision(force=True)
    response, body = await gw.request(
        "GET", "/v1/audit/verify", role=None, headers={"Authorization": f"Bearer {token}"}
    )
    assert (response.status, body["error"]["code"]) == (403, "mfa_required")
    response, body = await gw.post(
        "/v1/auth/login", {"username": "promoted", "password": user["password"]}, role=None
    )
    assert (response.status, body["error"]["code"]) == (401, "invalid_credentials")


async def test_revoked_and_rotated_keys_over_https(secured: Gateway) -> None:
    gw = secured
    admin = await gw.app[AUTH_SERVICE].create_user("keyboss", ["key_admin"])
    token = await _login(gw, "keyboss", admin["password"], admin["totp_secret"])
    boss = {"Authorization": f"Bearer {token}"}
    response, created = await gw.post(
        "/v1/admin/api-keys", {"name": "prover", "role": "client"}, role=None, headers=boss
    )
    assert response.status == 200, created
    key = {"X-API-Key": created["api_key"]}
    listed = (await gw.request("GET", "/v1/admin/api-keys", role=None, headers=boss))[1]
    assert created["api_key"] not in str(listed)
    ok = (await gw.request("GET", "/.well-known/jwks.json", role=None))[0]
    assert ok.status == 200
    response, rotated = await gw.post(
        f"/v1/admin/api-keys/{created['id']}/rotate", {}, role=None, headers=boss
    )
    assert response.status == 200 and rotated["api_key"] != created["api_key"]
    body = IDENTITY_PROOF
    refused = (await gw.post("/v1/kzg/verify-proof", body, role=None, headers=key))[0]
    assert refused.status == 401
    accepted, answer = await gw.post(
        "/v1/kzg/verify-proof", body, role=None, headers={"X-API-Key": rotated["api_key"]}
    )
    assert accepted.status == 200 and answer["valid"] is True


async def test_rate_limit_answers_429_with_retry_after(start_gateway: StartGateway) -> None:  # noqa: F811
    gw = await start_gateway(
        security=install,
        auth={**CHEAP_ARGON2, "ratelimit": {"client": {"rate": 0.5, "burst": 2}}},
    )
    key = (await gw.app[AUTH_SERVICE].create_api_key("c", "client", "test"))["api_key"]
    statuses = []
    for _ in range(4):
        response, _body = await gw.post(
            "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers={"X-API-Key": key}
        )
        statuses.append(response.status)
        if response.status == 429:
            assert int(response.headers["Retry-After"]) >= 1
    assert statuses == [200, 200, 429, 429]


async def test_ip_rules_refuse_the_client(start_gateway: StartGateway) -> None:  # noqa: F811
    rules = {
        "denied": ({"deny_cidrs": ["127.0.0.0/8"]}, 403),
        "not_allowed": ({"allow_cidrs": ["10.0.0.0/8", "::1/128"]}, 403),
        "allowed": ({"allow_cidrs": ["127.0.0.0/8"]}, 200),
        "deny_wins": ({"allow_cidrs": ["127.0.0.0/8"], "deny_cidrs": ["127.0.0.1/32"]}, 403),
    }
    for name, (cidrs, status) in rules.items():
        gw = await start_gateway(security=install, name=name, auth={**CHEAP_ARGON2, **cidrs})
        response, body = await gw.request("GET", "/healthz", role=None)
        assert response.status == status, name
        if status == 403:
            assert body["error"]["code"] == "address_not_allowed"
            (record,) = await gw.audit_records(body["error"]["request_id"])
            assert record["http_status"] == 403


async def test_no_secret_in_clear_in_the_data_dir_or_logs(
    secured: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = secured
    ids = await _identities(gw)
    for headers in ids.headers.values():
        await gw.request("GET", "/v1/audit/events", role=None, headers=headers)
    await gw.post(
        "/v1/auth/login", {"username": "adminperson", "password": ids.secrets[4]}, role=None
    )
    time.sleep(0.1)
    haystacks = [caplog.text.encode()]
    data_dir: Path = gw.config.data_dir
    for path in data_dir.rglob("*"):
        if path.is_file() and path.name != "master.key":
            haystacks.append(path.read_bytes())
    if gw.kind == "postgresql":
        from sqlalchemy import text

        from gateway.db import make_engine

        engine = make_engine(gw.owner_url)
        async with engine.connect() as conn:
            for table in ("users", "api_keys", "jwt_keys", "audit_events"):
                rows = (await conn.execute(text(f"SELECT * FROM {table}"))).all()
                haystacks.append(repr(rows).encode())
        await engine.dispose()
    for secret in ids.secrets:
        for hay in haystacks:
            assert secret.encode() not in hay, "a secret is stored or logged in clear"


async def test_tokens_keys_codes_and_throttling_over_https(secured: Gateway) -> None:
    """Given a person and machines with real credentials, when each is bent (forged
    tokens, an expired or out-of-network key, a replayed code, a guessed password), then
    the gateway refuses it, audits why, and the access review shows the aftermath."""
    gw = secured
    service = gw.app[AUTH_SERVICE]
    person = await service.create_user("reviewer", ["auditor"])
    totp = pyotp.TOTP(person["totp_secret"]).now()
    login = {"username": "reviewer", "password": person["password"], "totp": totp}
    response, answer = await gw.post("/v1/auth/login", login, role=None)
    assert response.status == 200, answer
    good = answer["access_token"]
    replayed, body = await gw.post("/v1/auth/login", login, role=None)
    assert (replayed.status, body["error"]["code"]) == (401, "invalid_credentials")
    (record,) = await gw.audit_records(body["error"]["request_id"])
    assert "replayed" in json.loads(record["detail"])["reason"]

    for name, token in (await tokens_to_refuse(service, good)).items():
        headers = {"Authorization": f"Bearer {token}"}
        response, body = await gw.request("GET", "/v1/audit/verify", role=None, headers=headers)
        assert (response.status, body["error"]["code"]) == (401, "invalid_credentials"), name
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    accepted = (await gw.request("GET", "/v1/audit/verify", role=None, headers={
        "Authorization": f"Bearer {good}"}))[0]  # fmt: skip
    assert accepted.status == 200

    expiring = await service.create_api_key("expiring", "client", "test", expires_in_days=1)
    elsewhere = await service.create_api_key(
        "elsewhere", "client", "test", allowed_cidrs=["192.0.2.0/24"]
    )
    here = await service.create_api_key("here", "client", "test", allowed_cidrs=["127.0.0.0/8"])
    await service.create_api_key("idle", "client", "test")
    engine = make_engine(gw.app_url)
    async with engine.begin() as conn:
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == expiring["id"])
            .values(expires_at=format_timestamp(datetime.now(UTC) - timedelta(seconds=1)))
        )
    await engine.dispose()
    for created, status, code in (
        (expiring, 401, "invalid_credentials"),
        (elsewhere, 403, "address_not_allowed"),
        (here, 200, None),
    ):
        response, body = await gw.post(
            "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None,
            headers={"X-API-Key": created["api_key"]},
        )  # fmt: skip
        assert response.status == status, (created["name"], body)
        if code:
            assert body["error"]["code"] == code

    victim = await service.create_user("victim", ["client"])
    free = int(service.policy.login_throttle.free_failures)
    for _ in range(free):
        wrong = {"username": "victim", "password": "not-the-password"}
        assert (await gw.post("/v1/auth/login", wrong, role=None))[0].status == 401
    right = {"username": "victim", "password": victim["password"]}
    response, body = await gw.post("/v1/auth/login", right, role=None)
    assert (response.status, body["error"]["code"]) == (429, "too_many_attempts")
    assert int(response.headers["Retry-After"]) >= 1
    (record,) = await gw.audit_records(body["error"]["request_id"])
    assert json.loads(record["detail"])["reason"].startswith("throttled")
    assert victim["password"] not in json.dumps(record, default=str)

    response, review = await gw.request(
        "GET", "/v1/admin/access-review", role=None, headers={"Authorization": f"Bearer {good}"}
    )
    assert response.status == 200, review
    by_name = {p["name"]: p for p in review["principals"]}
    assert by_name["reviewer"]["roles"] == ["auditor"]
    assert by_name["reviewer"]["last_used_at"] is not None
    assert by_name["victim"]["failed_logins"] == free
    assert "expired" in by_name["expiring"]["flags"]
    assert "never_used" in by_name["idle"]["flags"]
    # Refused for its address, so never used: last use counts accepted requests only.
    assert "never_used" in by_name["elsewhere"]["flags"]
    assert by_name["here"]["last_used_at"] is not None and by_name["here"]["flags"] == []
    for entry in review["principals"]:
        assert {"principal", "kind", "roles", "created_at", "age_days", "flags"} <= set(entry)
        assert "password" not in json.dumps(entry) and "secret" not in json.dumps(entry)


async def test_the_last_admin_can_be_neither_disabled_nor_demoted(secured: Gateway) -> None:
    gw = secured
    service = gw.app[AUTH_SERVICE]
    boss = await service.create_user("boss", ["admin"])
    await service.disable_user("admin")  # the first admin: boss is left the only one
    token = await _login(gw, "boss", boss["password"], boss["totp_secret"])
    auth = {"Authorization": f"Bearer {token}"}
    for path, body in (
        ("/v1/admin/users/boss/disable", {}),
        ("/v1/admin/users/boss/roles", {"roles": ["client"]}),
    ):
        response, answer = await gw.post(path, body, role=None, headers=auth)
        assert response.status == 409, answer
        assert answer["error"]["code"] == "last_admin"
        [record] = await gw.audit_records(answer["error"]["request_id"])
        assert record["http_status"] == 409
    # Nothing changed: the admin still manages people; with a second admin it may step down.
    response, invited = await gw.post(
        "/v1/admin/users", {"username": "deputy", "roles": ["admin"]}, role=None, headers=auth
    )
    assert response.status == 200
    # Not yet enrolled, the deputy cannot manage anyone: boss still may not step down.
    response, answer = await gw.post(
        "/v1/admin/users/boss/roles", {"roles": ["auditor"]}, role=None, headers=auth
    )
    assert (response.status, answer["error"]["code"]) == (409, "last_admin")
    enrol = {
        "username": "deputy",
        "enrollment_token": invited["enrollment_token"],
        "password": "deputy's own passphrase",
    }
    assert (await gw.post("/v1/auth/enroll", enrol, role=None))[0].status == 200
    response, _ = await gw.post(
        "/v1/admin/users/boss/roles", {"roles": ["auditor"]}, role=None, headers=auth
    )
    assert response.status == 200
    with pytest.raises(AuthError) as refused:
        await service.disable_user("deputy")
    assert refused.value.code == "last_admin"


async def test_a_disabled_person_can_be_enabled_again(secured: Gateway) -> None:
    gw = secured
    service = gw.app[AUTH_SERVICE]
    boss = await service.create_user("boss", ["admin"])
    carol = await service.create_user("carol", ["client"])
    auth = {
        "Authorization": f"Bearer {await _login(gw, 'boss', boss['password'], boss['totp_secret'])}"
    }
    response, _ = await gw.post("/v1/admin/users/carol/disable", {}, role=None, headers=auth)
    assert response.status == 200
    login = {"username": "carol", "password": carol["password"]}
    response, _ = await gw.post("/v1/auth/login", login, role=None)
    assert response.status == 401
    response, answer = await gw.post("/v1/admin/users/carol/enable", {}, role=None, headers=auth)
    assert (response.status, answer) == (200, {"username": "carol", "disabled": False})
    [record] = await gw.audit_records(response.headers["X-Request-ID"])
    assert record["action"] == "admin_enable_user" and record["outcome"] == "success"
    await _login(gw, "carol", carol["password"], None)
