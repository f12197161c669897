"""Identity operations on SQLite and a real PostgreSQL, through the runtime role."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import jwt
import pyotp
import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.exc import DBAPIError

from auth.credentials import parse_api_key, password_hasher
from auth.crypto import MasterKey, MasterKeyError
from auth.hashing import HashingBusy, HashingPool
from auth.master_key import IDENTITY_SEALED, rewrap_columns
from auth.models import api_keys, users
from auth.policy import PolicyError, load_policies
from auth.service import AuthError, AuthService
from gateway.db import make_engine, migrate
from tests.auth.conftest import CHEAP_ARGON2, Store, tokens_to_refuse
from tests.conftest import PgDatabase


def code(secret: str, offset_steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(time.time() + 30 * offset_steps)


async def test_login_with_password_and_totp_issues_a_pinned_eddsa_token(store: Store) -> None:
    service = store.make()
    created = await service.create_user("alice", ["auditor"])
    result = await service.login("alice", created["password"], code(created["totp_secret"]))
    header = jwt.get_unverified_header(result.access_token)
    assert header["alg"] == "EdDSA" and header["kid"]
    claims = jwt.decode(result.access_token, options={"verify_signature": False})
    assert claims["roles"] == ["auditor"] and claims["amr"] == ["pwd", "otp"]
    assert claims["exp"] - claims["iat"] == result.expires_in == 900
    principal = await service.authenticate_token(result.access_token)
    assert (principal.name, principal.roles, principal.mfa) == ("alice", ("auditor",), True)
    jwks = await service.jwks()
    assert [k["kid"] for k in jwks["keys"]] == [header["kid"]]
    assert jwks["keys"][0]["kty"] == "OKP" and "d" not in jwks["keys"][0]


async def test_mfa_roles_need_the_code_and_a_code_is_single_use(store: Store) -> None:
    service = store.make()
    created = await service.create_user("bob", ["admin"])
    password, secret = created["password"], created["totp_secret"]
    with pytest.raises(AuthError) as missing:
        await service.login("bob", password, None)
    assert (missing.value.status, missing.value.reason) == (401, "one-time code required")
    first = code(secret)
    await service.login("bob", password, first)
    with pytest.raises(AuthError) as replay:
        await service.login("bob", password, first)
    assert replay.value.reason == "wrong or replayed one-time code"
    # The next step's code is still good once.
    await service.login("bob", password, code(secret, 1))


async def test_client_people_may_log_in_without_a_code(store: Store) -> None:
    service = store.make()
    created = await service.create_user("carol", ["client"])
    result = await service.login("carol", created["password"], None)
    assert (await service.authenticate_token(result.access_token)).mfa is False


async def test_unknown_user_and_wrong_password_answer_alike(store: Store) -> None:
    service = store.make()
    await service.create_user("dave", ["client"])
    answers = []
    for username, password in (("nobody", "x" * 20), ("dave", "wrong-password-123")):
        with pytest.raises(AuthError) as refused:
            await service.login(username, password, None)
        answers.append((refused.value.status, refused.value.code, refused.value.message))
    assert answers[0] == answers[1]


async def test_failures_hold_back_their_source_only_with_growing_delays(store: Store) -> None:
    """Given failed logins for one account from one address, then that address waits
    growing delays (429 with Retry-After, before any argon2, even with the right
    password) while another address logs in at once; nothing locks the account."""
    service = store.make()
    created = await service.create_user("erin", ["client"])
    free = int(service.policy.login_throttle.free_failures)
    for _ in range(free + 2):
        with pytest.raises(AuthError) as failed:
            await service.login("erin", "not-the-password", None, "192.0.2.7")
        assert failed.value.status == 401
        store.clock.advance(service.throttle_delay(free + 2) + 1)
    with pytest.raises(AuthError) as refused:
        await service.login("erin", "not-the-password", None, "192.0.2.7")
    assert refused.value.status == 401  # each wait was served: the next try is heard
    delay = service.throttle_delay(free + 3)
    assert delay == 2 * service.throttle_delay(free + 2) > 0
    with pytest.raises(AuthError) as throttled:
        await service.login("erin", created["password"], None, "192.0.2.7")
    assert (throttled.value.status, throttled.value.code) == (429, "too_many_attempts")
    assert 0 < (throttled.value.retry_after or 0) <= delay
    # Another address (an IPv6 /64 counts as one) is not held back.
    ok = await service.login("erin", created["password"], None, "2001:db8::1")
    assert ok.principal.name == "erin"
    store.clock.advance(delay)
    with pytest.raises(AuthError):
        await service.login("erin", "not-the-password-again", None, "198.51.100.1")
    assert (await service.login("erin", created["password"], None, "192.0.2.7")).principal
    # A success forgets its source's failures; the rotate-keys job forgets quiet sources.
    assert await service.forget_login_failures() == 0
    store.clock.advance(float(service.policy.login_throttle.forget_after_seconds))
    assert await service.forget_login_failures() == 1


async def test_tokens_that_must_be_refused(store: Store) -> None:
    service = store.make()
    created = await service.create_user("frank", ["client"])
    good = (await service.login("frank", created["password"], None)).access_token
    for token in (await tokens_to_refuse(service, good)).values():
        with pytest.raises(AuthError) as refused:
            await service.authenticate_token(token)
        assert refused.value.status == 401


async def test_rotated_jwt_key_keeps_old_tokens_valid_until_retention_ends(store: Store) -> None:
    service = store.make()
    created = await service.create_user("gina", ["client"])
    old = (await service.login("gina", created["password"], None)).access_token
    await service.rotate_jwt_key()
    assert len((await service.jwks())["keys"]) == 2
    assert (await service.authenticate_token(old)).name == "gina"
    store.clock.advance(2 * 86400)
    assert len((await service.jwks())["keys"]) == 1


async def test_api_key_shown_once_stored_hashed_and_revoked_everywhere(store: Store) -> None:
    first, second = store.make(), store.make()  # two processes over one database
    created = await first.create_api_key("rollup-prover", "client", "usr_admin")
    key = created["api_key"]
    assert parse_api_key(key).key_id == created["id"]
    async with store.engine.connect() as conn:
        row = (await conn.execute(select(api_keys).where(api_keys.c.id == created["id"]))).one()
    assert (
        row.secret_hash.startswith("$argon2id$")
        and parse_api_key(key).secret not in row.secret_hash
    )
    assert (await first.authenticate_api_key(key, "10.0.0.1")).roles == ("client",)
    assert (await second.authenticate_api_key(key, "10.0.0.1")).id == created["id"]
    await first.revoke_api_key(created["id"])
    with pytest.raises(AuthError):
        await first.authenticate_api_key(key, "10.0.0.1")
    # The other process drops its cached entry within revocation_check_seconds (2 s);
    # the deadline leaves room for a loaded machine.
    deadline = time.monotonic() + 10
    while True:
        try:
            await second.authenticate_api_key(key, "10.0.0.1")
        except AuthError:
            break
        assert time.monotonic() < deadline, "revocation did not reach the second process"
        time.sleep(0.2)
    listed = await first.list_api_keys()
    assert listed[0]["revoked_at"] and "api_key" not in listed[0] and "secret_hash" not in listed[0]


async def test_api_key_rotation_expiry_and_cidrs(store: Store) -> None:
    service = store.make()
    created = await service.create_api_key(
        "ci", "auditor", "usr_admin", expires_in_days=1, allowed_cidrs=["192.0.2.0/24"]
    )
    assert (await service.authenticate_api_key(created["api_key"], "192.0.2.7")).roles == (
        "auditor",
    )
    with pytest.raises(AuthError) as outside:
        await service.authenticate_api_key(created["api_key"], "198.51.100.1")
    assert outside.value.status == 403
    rotated = await service.rotate_api_key(created["id"], "usr_admin")
    assert rotated["allowed_cidrs"] == ["192.0.2.0/24"]
    with pytest.raises(AuthError):
        await service.authenticate_api_key(created["api_key"], "192.0.2.7")
    assert (await service.authenticate_api_key(rotated["api_key"], "192.0.2.7")).id == rotated["id"]
    store.clock.advance(86400 * 91)
    with pytest.raises(AuthError) as expired:
        await service.authenticate_api_key(rotated["api_key"], "192.0.2.7")
    assert expired.value.reason == "expired API key"
    assert await service.expire_api_keys() == [rotated["id"]]


async def test_policy_refusals(store: Store) -> None:
    service = store.make()
    with pytest.raises(PolicyError, match="people only"):
        await service.create_api_key("x", "admin", "usr_admin")
    with pytest.raises(PolicyError, match="unknown role"):
        await service.create_user("henry", ["root"])
    with pytest.raises(PolicyError, match="expires_in_days"):
        await service.create_api_key("x", "client", "usr_admin", expires_in_days=10_000)
    with pytest.raises(PolicyError, match="allowed_cidrs"):
        await service.create_api_key("x", "client", "usr_admin", allowed_cidrs=["not-a-net"])


async def test_access_review_flags(store: Store) -> None:
    service = store.make()
    await service.create_user("ivan", ["auditor"])
    await service.create_api_key("idle", "client", "usr_admin", expires_in_days=10)
    await service.disable_user("ivan")
    store.clock.advance(40 * 86400)
    review = await service.access_review()
    by_name = {p["name"]: p for p in review["principals"]}
    assert {"disabled", "never_used"} <= set(by_name["ivan"]["flags"])
    assert {"expired", "stale", "never_used"} <= set(by_name["idle"]["flags"])
    assert by_name["idle"]["age_days"] >= 40


async def test_runtime_role_cannot_delete_identities(pg_database: PgDatabase) -> None:
    await migrate(pg_database.owner_url, pg_database.app_role)
    engine = make_engine(pg_database.app_url)
    try:
        async with engine.connect() as conn:
            for table in (users, api_keys):
                with pytest.raises(DBAPIError, match="permission denied"):
                    await conn.execute(delete(table))
                await conn.rollback()
    finally:
        await engine.dispose()


def test_shipped_policy_is_strong() -> None:
    rbac, policy = load_policies()
    assert policy.passwords.memory_kib >= 19456  # OWASP argon2id minimum
    assert not rbac.roles["client"].mfa
    # Machine-only roles without a second factor: client computes, monitor only scrapes.
    assert all(r.mfa for name, r in rbac.roles.items() if name not in ("client", "monitor"))
    assert rbac.roles["monitor"].permissions == {"metrics:read", "log:read"}
    assert rbac.permission_for("metrics") == "metrics:read" and "metrics" not in rbac.public
    assert not rbac.roles["admin"].api_keys and not rbac.roles["key_admin"].api_keys
    # Least privilege: an auditor computes nothing, a client reads no audit, nobody alters it.
    assert not {"kzg:compute", "kzg:verify"} & rbac.roles["auditor"].permissions
    assert not {"audit:read"} & rbac.roles["client"].permissions
    assert not any(
        p.startswith("audit:") and p != "audit:read"
        for r in rbac.roles.values()
        for p in r.permissions
    )
    # An API key never lifts its issuer: a key_admin mints client keys, not audit access,
    # and computes nothing itself.
    assert rbac.may_grant(["key_admin"], "client") and not rbac.may_grant(["key_admin"], "auditor")
    assert rbac.may_grant(["admin"], "auditor") and not rbac.may_grant(["client"], "auditor")
    assert not {"kzg:compute", "kzg:verify"} & rbac.roles["key_admin"].permissions
    # The log's checkpoint and proofs reveal only hashes: every role reads them, nobody
    # without a credential; its verifier keys are public.
    assert all("log:read" in r.permissions for r in rbac.roles.values())
    for route in ("log_checkpoint", "log_proof_inclusion", "log_proof_consistency"):
        assert rbac.routes[route] == "log:read" and route not in rbac.public
    assert {"log_keys", "receipt_keys"} <= rbac.public


async def test_concurrent_wrong_passwords_count_every_attempt(store: Store) -> None:
    """Given wrong passwords for one person arriving at once, then the stored failure
    count equals the attempts: none is lost to a read-then-write race."""
    service = store.make(login_throttle={"free_failures": 100})
    await service.create_user("hank", ["client"])
    attempts = 8  # within what the hashing threads and their queue take at once
    refused = await asyncio.gather(
        *(service.login("hank", "wrong-password-123", None) for _ in range(attempts)),
        return_exceptions=True,
    )
    assert all(isinstance(r, AuthError) and r.reason == "wrong password" for r in refused)
    async with store.engine.connect() as conn:
        count = (
            await conn.execute(select(users.c.failed_logins).where(users.c.username == "hank"))
        ).scalar_one()
    assert count == attempts


async def test_api_keys_follow_the_policy_and_their_issuer(store: Store) -> None:
    """Given a key_admin person, an auditor key is refused to them and a client key
    granted; given a policy that stops allowing auditor keys, an existing one is refused."""
    service = store.make()
    boss = await service.create_user("keyboss", ["key_admin"])
    with pytest.raises(AuthError) as refused:
        await service.create_api_key("reader", "auditor", boss["id"])
    assert refused.value.status == 403
    await service.create_api_key("prover", "client", boss["id"])
    reader = await service.create_api_key("reader", "auditor", "cli:operator")
    with pytest.raises(AuthError):
        await service.rotate_api_key(reader["id"], boss["id"])
    assert (await service.authenticate_api_key(reader["api_key"], None)).roles == ("auditor",)

    rbac, policy = load_policies(None, CHEAP_ARGON2)
    auditor = rbac.roles["auditor"]
    tightened = replace(rbac, roles={**rbac.roles, "auditor": replace(auditor, api_keys=False)})
    restarted = AuthService(store.engine, store.master_key, tightened, policy, clock=store.clock)
    with pytest.raises(AuthError) as disabled:
        await restarted.authenticate_api_key(reader["api_key"], None)
    assert disabled.value.status == 401 and "no longer allows" in disabled.value.reason


async def test_disabled_user_token_stops_working(store: Store) -> None:
    service = store.make()
    created = await service.create_user("judy", ["client"])
    token = (await service.login("judy", created["password"], None)).access_token
    await service.authenticate_token(token)
    async with store.engine.begin() as conn:
        await conn.execute(update(users).where(users.c.username == "judy").values(disabled=True))
    await service.disable_user("judy")
    await service.check_revision(force=True)
    with pytest.raises(AuthError):
        await service.authenticate_token(token)


async def test_generated_passwords_follow_the_policy_length(store: Store) -> None:
    for min_length, expected in ((16, 24), (40, 40)):
        service = store.make(passwords={**CHEAP_ARGON2["passwords"], "min_length": min_length})
        created = await service.create_user(f"len{min_length}", ["client"])
        assert len(created["password"]) == expected


async def test_master_key_rotation_rewraps_every_identity_secret(store: Store) -> None:
    service = store.make()
    created = await service.create_user("mira", ["auditor"])
    await service.rotate_jwt_key()
    new_key = MasterKey(MasterKey.generate())
    async with store.engine.begin() as conn:
        assert await rewrap_columns(conn, store.master_key, new_key, IDENTITY_SEALED) == 2
    rbac, policy = service.rbac, service.policy
    after = AuthService(store.engine, new_key, rbac, policy, clock=store.clock)
    login = await after.login("mira", created["password"], code(created["totp_secret"]))
    assert (await after.authenticate_token(login.access_token)).mfa is True
    async with store.engine.connect() as conn:
        sealed = (await conn.execute(select(users.c.sealed_totp_secret))).scalar_one()
    with pytest.raises(MasterKeyError, match="does not open"):
        store.master_key.open(sealed, f"totp:{login.principal.id}")


async def test_a_full_hashing_pool_refuses_with_its_own_error_not_a_timeout() -> None:
    """Given argon2's only slot taken, when another hash is asked, then HashingBusy is
    raised at once, and it is no TimeoutError: a handler that catches timeouts (a body
    that is slow, a database that hangs) does not mistake it for one."""
    _, policy = load_policies(None, CHEAP_ARGON2)
    pool = HashingPool(password_hasher(policy), threads=1, queue=0)
    release = threading.Event()
    occupied = asyncio.ensure_future(pool.run(release.wait))
    try:
        while pool.pending < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(HashingBusy) as refused:
            await pool.hash("a secret")
        assert not isinstance(refused.value, OSError)
    finally:
        release.set()
        await occupied
        pool.close()
    assert pool.pending == 0
