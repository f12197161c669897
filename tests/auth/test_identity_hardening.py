"""Identity hardening over the real HTTPS server, on SQLite and PostgreSQL: enrolment
(admins never learn a person's secrets), no lockout by strangers, nothing changed without
its audit record, revocation within its bound, atomic key material, and refusals that
cost no argon2.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pyotp
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.models import audit_tree_heads
from auth import tokens
from auth.models import api_keys, jwt_keys, users
from gateway.appkeys import DB_ENGINE, LOG_SIGNER, MASTER_KEY, METRICS
from gateway.db import make_engine
from gateway.identity import AUTH_SERVICE
from gateway.receipts import list_log_keys, load_log_signer, log_keys, rotate_log_key
from tests.audit import reference_tlog
from tests.auth.conftest import CHEAP_ARGON2
from tests.gateway.conftest import Gateway, StartGateway, start_gateway  # noqa: F401
from tests.gateway.helpers import IDENTITY_PROOF, ORIGIN
from tests.gateway.test_auth_hardening import _person

PASSWORD = "a passphrase of her own"
DANA = "dana.lindqvist"  # long enough to be tried as her own password


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> Any:
    return None if request.param == "sqlite" else request.getfixturevalue("pg_database")


@pytest.fixture
async def gw(start_gateway: StartGateway, database: Any) -> Gateway:  # noqa: F811
    return await start_gateway(database, auth=CHEAP_ARGON2)


async def _rows(gw: Gateway, query: Any) -> list[Any]:
    engine = make_engine(gw.app_url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(query)).all())
    finally:
        await engine.dispose()


def _metric(gw: Gateway, name: str, labels: dict[str, str] | None = None) -> float:
    return gw.app[METRICS].registry.get_sample_value(name, labels or {}) or 0.0


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _login(
    session: aiohttp.ClientSession, username: str, password: str, totp: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = {"username": username, "password": password}
    if totp is not None:
        body["totp"] = totp
    async with session.post("/v1/auth/login", json=body) as response:
        return response.status, await response.json(), dict(response.headers)


# -- item 1: enrolment -------------------------------------------------------------------


async def test_enrolment_end_to_end(gw: Gateway) -> None:
    """Given an admin, when they create a person, then they get only a single-use
    enrolment token; the person enrols (choosing the password, receiving the TOTP
    secret), logs in with TOTP, changes the password, and the old one is refused. A
    reset revokes password and sessions at once and issues a new token."""
    admin = await _person(gw, "boss", "admin")
    response, created = await gw.post(
        "/v1/admin/users", {"username": DANA, "roles": ["client"]}, role=None, headers=admin
    )
    assert response.status == 200, created
    assert set(created) == {"username", "roles", "enrollment_token", "expires_at"}
    assert created["roles"] == ["client"]
    token = created["enrollment_token"]
    (record,) = await gw.audit_records(response.headers["X-Request-ID"])
    assert token not in json.dumps(record, default=str)
    (row,) = await _rows(gw, select(users).where(users.c.username == DANA))
    assert row.password_hash is None and row.sealed_totp_secret is None
    assert row.enrollment_token_hash and token not in row.enrollment_token_hash

    def enrol(password: str, enrollment_token: str = token) -> dict[str, str]:
        return {"username": DANA, "enrollment_token": enrollment_token, "password": password}

    for body, status, words in (
        (enrol(PASSWORD, "not-the-token"), 401, "enrollment_token"),
        (enrol("too short"), 400, "password: at least 12"),
        (enrol(DANA.upper()), 400, "password: must not be the username"),
    ):
        response, answer = await gw.post("/v1/auth/enroll", body, role=None)
        assert response.status == status and words in answer["error"]["message"], answer
        (record,) = await gw.audit_records(response.headers["X-Request-ID"])
        assert body["password"] not in json.dumps(record, default=str)
    response, enrolled = await gw.post("/v1/auth/enroll", enrol(PASSWORD), role=None)
    assert response.status == 200, enrolled
    secret = pyotp.parse_uri(enrolled["totp_uri"]).secret
    response, answer = await gw.post("/v1/auth/enroll", enrol("another passphrase"), role=None)
    assert (response.status, answer["error"]["code"]) == (401, "invalid_enrollment")

    session = gw.session()
    status, login, _ = await _login(session, DANA, PASSWORD, pyotp.TOTP(secret).now())
    assert status == 200, login
    assert jwt.decode(login["access_token"], options={"verify_signature": False})["amr"] == [
        "pwd",
        "otp",
    ]
    bearer = _bearer(login["access_token"])
    new_password = "her second passphrase"
    for body, status in (
        ({"current_password": "wrong one entirely", "new_password": new_password}, 403),
        ({"current_password": PASSWORD, "new_password": "short"}, 400),
    ):
        response, answer = await gw.post("/v1/auth/password", body, role=None, headers=bearer)
        assert response.status == status, answer
    change = {"current_password": PASSWORD, "new_password": new_password}
    response, answer = await gw.post("/v1/auth/password", change, role=None, headers=bearer)
    assert response.status == 200, answer
    assert (await _login(session, DANA, PASSWORD))[0] == 401
    status, login, _ = await _login(session, DANA, new_password)
    assert status == 200, login
    bearer = _bearer(login["access_token"])

    # A reset: the password, the TOTP secret and the sessions stop at once.
    response, reset = await gw.post(f"/v1/admin/users/{DANA}/reset", {}, role=None, headers=admin)
    assert response.status == 200, reset
    assert set(reset) == {"username", "enrollment_token", "expires_at"}
    assert (await _login(session, DANA, new_password))[0] == 401
    response, _ = await gw.request("GET", "/v1/log/checkpoint", role=None, headers=bearer)
    assert response.status == 401
    response, _ = await gw.post("/v1/auth/enroll", enrol("third passphrase"), role=None)
    assert response.status == 401  # the first token was used
    third = enrol("third passphrase", reset["enrollment_token"])
    assert (await gw.post("/v1/auth/enroll", third, role=None))[0].status == 200
    assert (await _login(session, DANA, "third passphrase"))[0] == 200
    # reset-mfa, which handed a new secret to the admin, is gone.
    response, _ = await gw.post(f"/v1/admin/users/{DANA}/reset-mfa", {}, role=None, headers=admin)
    assert response.status == 404


# -- item 2: no lockout by strangers -------------------------------------------------------


async def test_failures_from_one_address_do_not_lock_out_another(
    start_gateway: StartGateway,  # noqa: F811
    database: Any,
) -> None:
    """Given repeated wrong passwords for a person from 127.0.0.1, then 127.0.0.1 gets
    429 with Retry-After even with the right password and code, while the same right
    credentials from 127.0.0.2 log in; the account counts its failures and the alert
    metric moves, but the account is not locked."""
    gw = await start_gateway(
        database, auth={**CHEAP_ARGON2, "login_throttle": {"account_alert_failures": 3}}
    )
    person = await gw.app[AUTH_SERVICE].create_user("erin", ["auditor"])
    free = int(gw.app[AUTH_SERVICE].policy.login_throttle.free_failures)
    assert free == 3
    stranger = gw.session()
    for _ in range(free):
        status, _, _ = await _login(stranger, "erin", "a guess at her password", "123456")
        assert status == 401
    code = pyotp.TOTP(person["totp_secret"]).now()
    status, answer, headers = await _login(stranger, "erin", person["password"], code)
    assert (status, answer["error"]["code"]) == (429, "too_many_attempts")
    assert int(headers["Retry-After"]) >= 1
    connector = aiohttp.TCPConnector(ssl=gw.ssl_context(), local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(gw.url, connector=connector) as elsewhere:
        status, answer, headers = await _login(elsewhere, "erin", person["password"], code)
        assert status == 200, answer
    (record,) = await gw.audit_records(headers["X-Request-ID"])
    assert record["client_addr"] == "127.0.0.2"
    assert _metric(gw, "kzg_login_failures_total", {"outcome": "failed"}) == free
    assert _metric(gw, "kzg_login_failures_total", {"outcome": "throttled"}) == 1
    assert _metric(gw, "kzg_login_account_alerts_total") == 1
    (row,) = await _rows(gw, select(users).where(users.c.username == "erin"))
    assert row.locked_until is None and row.failed_logins == 0  # reset by the success


# -- item 3: nothing changes unaudited ---------------------------------------------------


@contextlib.asynccontextmanager
async def _audit_refuses_admin_records(gw: Gateway) -> AsyncIterator[None]:
    """Fault injection: the audit store refuses every record of an admin route (a trigger
    created by the schema owner), as a full disk or a lost replica would."""
    engine = make_engine(gw.owner_url)
    statements = {
        "sqlite": (
            [
                "CREATE TRIGGER test_refuse_admin BEFORE INSERT ON audit_events "
                "WHEN NEW.action LIKE 'admin%' "
                "BEGIN SELECT RAISE(ABORT, 'injected audit failure'); END"
            ],
            ["DROP TRIGGER test_refuse_admin"],
        ),
        "postgresql": (
            [
                "CREATE FUNCTION test_refuse_admin() RETURNS trigger LANGUAGE plpgsql AS $$ "
                "BEGIN IF NEW.action LIKE 'admin%' THEN "
                "RAISE EXCEPTION 'injected audit failure'; END IF; RETURN NEW; END $$",
                "CREATE TRIGGER test_refuse_admin BEFORE INSERT ON audit_events "
                "FOR EACH ROW EXECUTE FUNCTION test_refuse_admin()",
            ],
            ["DROP TRIGGER test_refuse_admin ON audit_events", "DROP FUNCTION test_refuse_admin()"],
        ),
    }
    install, remove = statements[gw.kind]
    try:
        async with engine.begin() as conn:
            for statement in install:
                await conn.execute(text(statement))
        yield
    finally:
        async with engine.begin() as conn:
            for statement in remove:
                await conn.execute(text(statement))
        await engine.dispose()


async def _identity_state(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        return {
            "users": (await conn.execute(select(users).order_by(users.c.id))).all(),
            "api_keys": (await conn.execute(select(api_keys).order_by(api_keys.c.id))).all(),
            "jwt_keys": (await conn.execute(select(jwt_keys).order_by(jwt_keys.c.kid))).all(),
            "log_keys": (await conn.execute(select(log_keys).order_by(log_keys.c.key_id))).all(),
        }


async def test_an_admin_change_whose_audit_record_fails_is_not_made(
    start_gateway: StartGateway,  # noqa: F811
    database: Any,
) -> None:
    """Given the audit store refusing admin records, when an admin creates a person,
    changes roles, revokes or rotates an API key, or rotates or revokes a key, then each
    answer is 503 audit_unavailable and the database holds none of the changes; once the
    store accepts them again, the same requests change and are audited."""
    # Ten refused commits in a row would open the audit breaker, which then refuses every
    # request; here each refusal must come from its own change's commit.
    gw = await start_gateway(database, auth=CHEAP_ARGON2, audit={"breaker_failure_threshold": 100})
    admin = await _person(gw, "boss", "admin")
    await gw.app[AUTH_SERVICE].create_user("olga", ["client"])
    key = await gw.app[AUTH_SERVICE].create_api_key("prover", "client", "tests")
    kid = jwt.get_unverified_header(admin["Authorization"].split()[1])["kid"]
    changes = [
        ("/v1/admin/users", {"username": "dana", "roles": ["auditor"]}),
        ("/v1/admin/users/olga/roles", {"roles": ["auditor"]}),
        ("/v1/admin/users/olga/disable", {}),
        ("/v1/admin/users/olga/reset", {}),
        ("/v1/admin/api-keys", {"name": "new", "role": "client"}),
        (f"/v1/admin/api-keys/{key['id']}/rotate", {}),
        (f"/v1/admin/api-keys/{key['id']}/revoke", {}),
        ("/v1/admin/jwt-keys/rotate", {}),
        (f"/v1/admin/jwt-keys/{kid}/revoke", {}),
        ("/v1/admin/signing-keys/rotate", {}),
    ]
    engine = make_engine(gw.app_url)
    try:
        before = await _identity_state(engine)
        async with _audit_refuses_admin_records(gw):
            for path, body in changes:
                response, answer = await gw.post(path, body, role=None, headers=admin)
                assert response.status == 503, (path, answer)
                assert answer["error"]["code"] == "audit_unavailable", (path, answer)
                assert await _identity_state(engine) == before, path
        # The key that was to be rotated or revoked works all along.
        response, _ = await gw.post(
            "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers={"X-API-Key": key["api_key"]}
        )
        assert response.status == 200
        # Once the store takes them, the same requests change, each with its record.
        for path, body in changes[:1] + changes[5:6]:
            response, answer = await gw.post(path, body, role=None, headers=admin)
            assert response.status == 200, (path, answer)
            (record,) = await gw.audit_records(response.headers["X-Request-ID"])
            assert (record["outcome"], record["http_status"]) == ("success", 200)
        after = await _identity_state(engine)
        assert "dana" in {u.username for u in after["users"]}
        rotated = {k.id: k for k in after["api_keys"]}
        assert rotated[key["id"]].revoked_at is not None
        assert [k.rotated_from for k in after["api_keys"]].count(key["id"]) == 1
    finally:
        await engine.dispose()


# -- item 4: revocation within its bound -------------------------------------------------


async def test_a_revoked_jwt_key_is_refused_at_once_here_and_within_2_s_elsewhere(
    start_gateway: StartGateway,  # noqa: F811
    database: Any,
) -> None:
    """Given a person's token accepted by two instances on one database, when an admin
    revokes the token's key on one, then that one refuses the token at once, the other
    within revocation_check_seconds, the key leaves the JWKS and a new login works."""
    # The admin's rate limit lifted: the test polls faster than an admin would.
    auth = {**CHEAP_ARGON2, "ratelimit": {"admin": {"rate": 1000, "burst": 1000}}}
    here = await start_gateway(database, auth=auth)
    there = await start_gateway(database, auth=auth)
    admin = await _person(here, "boss", "admin")
    kid = jwt.get_unverified_header(admin["Authorization"].split()[1])["kid"]
    for gw in (here, there):
        response, _ = await gw.request("GET", "/v1/log/checkpoint", role=None, headers=admin)
        assert response.status == 200
    response, answer = await here.post(
        f"/v1/admin/jwt-keys/{kid}/revoke", {}, role=None, headers=admin
    )
    assert response.status == 200 and answer["status"] == "revoked", answer
    assert answer["current"] and answer["current"] != kid
    revoked_at = time.monotonic()
    response, _ = await here.request("GET", "/v1/log/checkpoint", role=None, headers=admin)
    assert response.status == 401
    while True:
        response, _ = await there.request("GET", "/v1/log/checkpoint", role=None, headers=admin)
        if response.status == 401:
            break
        assert response.status == 200
        await asyncio.sleep(0.05)
    bound = float(there.app[AUTH_SERVICE].policy.api_keys.revocation_check_seconds)
    assert time.monotonic() - revoked_at <= bound + 0.5
    response, jwks = await there.request("GET", "/.well-known/jwks.json", role=None)
    assert kid not in {k["kid"] for k in jwks["keys"]}
    again = await _person(there, "boss2", "admin")
    assert jwt.get_unverified_header(again["Authorization"].split()[1])["kid"] == answer["current"]


async def test_tokens_outliving_the_policy_or_their_key_are_refused(gw: Gateway) -> None:
    """Given the gateway's own signing key, a token whose exp - iat exceeds ttl_seconds
    is refused, and so is a token of a retired key issued after its retirement."""
    service = gw.app[AUTH_SERVICE]
    admin = await _person(gw, "boss", "admin")
    good = admin["Authorization"].split()[1]
    claims = jwt.decode(good, options={"verify_signature": False})
    key = await service._current_signing_key()
    ttl = int(service.policy.tokens.ttl_seconds)
    long_lived = tokens.issue(key, {**claims, "exp": claims["iat"] + ttl + 60})
    response, answer = await gw.request(
        "GET", "/v1/log/checkpoint", role=None, headers=_bearer(long_lived)
    )
    assert response.status == 401, answer
    response, _ = await gw.post("/v1/admin/jwt-keys/rotate", {}, role=None, headers=admin)
    assert response.status == 200
    response, _ = await gw.request("GET", "/v1/log/checkpoint", role=None, headers=admin)
    assert response.status == 200  # issued before the rotation: valid in the window
    await asyncio.sleep(1.1)
    now = int(time.time())
    late = tokens.issue(key, {**claims, "iat": now, "nbf": now, "exp": now + 60})
    response, _ = await gw.request("GET", "/v1/log/checkpoint", role=None, headers=_bearer(late))
    assert response.status == 401


async def test_a_retired_jwt_key_is_refused_past_its_window_even_when_cached(
    store: Any,
) -> None:
    """Given a token of a key that was retired and is cached as valid, when the key's
    retain window ends, then the next use is refused without waiting for the cache."""
    service = store.make()
    created = await service.create_user("gina", ["client"])
    old = (await service.login("gina", created["password"], None)).access_token
    await service.rotate_jwt_key()
    assert (await service.authenticate_token(old)).name == "gina"  # caches the key
    store.clock.advance(float(service.policy.tokens.jwt_key_retain_days) * 86400 + 1)
    with pytest.raises(Exception) as refused:
        await service.authenticate_token(old)
    assert getattr(refused.value, "status", None) == 401


async def test_a_key_verified_while_it_is_revoked_is_not_cached(gw: Gateway) -> None:
    """Given an API key whose argon2 verification is in flight, when it is revoked and
    the revocation is seen before the verification ends, then the verification does not
    re-cache the key: the next request is refused."""
    service = gw.app[AUTH_SERVICE]
    key = await service.create_api_key("prover", "client", "tests")
    admin = await _person(gw, "boss", "admin")
    real_verify = service.hashing.verify
    entered, release = asyncio.Event(), asyncio.Event()

    async def paused_verify(stored: str, secret: str, kind: str) -> bool:
        if kind == "api_key":
            entered.set()
            await release.wait()
        return await real_verify(stored, secret, kind)

    service.hashing.verify = paused_verify  # type: ignore[method-assign]
    headers = {"X-API-Key": key["api_key"]}
    in_flight = asyncio.ensure_future(
        gw.post("/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers=headers)
    )
    await entered.wait()
    response, _ = await gw.post(
        f"/v1/admin/api-keys/{key['id']}/revoke", {}, role=None, headers=admin
    )
    assert response.status == 200
    release.set()
    await in_flight  # read before the revocation: its own answer may stand
    service.hashing.verify = real_verify  # type: ignore[method-assign]
    response, body = await gw.post(
        "/v1/kzg/verify-proof", IDENTITY_PROOF, role=None, headers=headers
    )
    assert (response.status, body["error"]["code"]) == (401, "invalid_credentials")


# -- issue 17: cheap refusals ------------------------------------------------------------


async def test_revoked_and_expired_keys_are_refused_before_argon2(gw: Gateway) -> None:
    """Given a revoked and an expired API key (ids public), when they are presented with
    their right secrets, then each is refused (401, audited with why) and no argon2 ran."""
    service = gw.app[AUTH_SERVICE]
    revoked = await service.create_api_key("old", "client", "tests")
    await service.revoke_api_key(revoked["id"])
    expired = await service.create_api_key("short", "client", "tests", expires_in_days=1)
    engine = make_engine(gw.app_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                api_keys.update()
                .where(api_keys.c.id == expired["id"])
                .values(expires_at="2020-01-01T00:00:00.000000Z")
            )
    finally:
        await engine.dispose()
    before = _metric(gw, "kzg_password_hash_verifications_total", {"credential": "api_key"})
    for created, why in ((revoked, "revoked"), (expired, "expired")):
        response, body = await gw.post(
            "/v1/kzg/verify-proof",
            IDENTITY_PROOF,
            role=None,
            headers={"X-API-Key": created["api_key"]},
        )
        assert response.status == 401, body
        (record,) = await gw.audit_records(response.headers["X-Request-ID"])
        assert why in json.loads(record["detail"])["reason"]
    after = _metric(gw, "kzg_password_hash_verifications_total", {"credential": "api_key"})
    assert after == before


# -- item 5: atomic key material ---------------------------------------------------------


async def test_a_signature_and_its_key_id_come_from_one_key(gw: Gateway) -> None:
    """Given a signer holding the pair in use, when the log key is rotated and the signer
    refreshed, then the pair taken before still signs with, and names, the old key; and
    every tree head committed while keys rotate under live traffic verifies under the
    key its key_id names."""
    app = gw.app
    signer = await load_log_signer(app[DB_ENGINE], app[MASTER_KEY], app[LOG_SIGNER].origin)
    pinned = signer.current()
    await rotate_log_key(app[DB_ENGINE], app[MASTER_KEY], signer.origin)
    assert await signer.refresh() is True
    vkeys = {k.key_id: k.vkey for k in await list_log_keys(app[DB_ENGINE])}
    note = pinned.sign_note(f"{ORIGIN}\n1\n{'A' * 43}=\n")
    assert reference_tlog.open_checkpoint(note, [vkeys[pinned.key_id]])[1] == 1
    assert signer.current().key_id != pinned.key_id

    admin = await _person(gw, "boss", "admin")
    # The client key verified once (argon2) before the burst, which then hits the cache.
    assert (await gw.post("/v1/kzg/verify-proof", IDENTITY_PROOF))[0].status == 200

    async def rotations() -> list[int]:
        statuses = []
        for _ in range(3):
            response, _ = await gw.post(
                "/v1/admin/signing-keys/rotate", {}, role=None, headers=admin
            )
            statuses.append(response.status)
        return statuses

    traffic = [gw.post("/v1/kzg/verify-proof", IDENTITY_PROOF) for _ in range(12)]
    *answers, rotated = await asyncio.gather(*traffic, rotations())
    assert rotated == [200] * 3
    # Served, or shed by the bounded pool (2 workers here): never a signing error.
    assert {r.status for r, _ in answers} <= {200, 503} and 200 in {r.status for r, _ in answers}
    vkeys = {k.key_id: k.vkey for k in await list_log_keys(app[DB_ENGINE])}
    heads = await _rows(gw, select(audit_tree_heads))
    assert len({h.key_id for h in heads}) >= 3
    for head in heads:
        assert reference_tlog.open_checkpoint(head.note, [vkeys[head.key_id]])[1] == head.size
