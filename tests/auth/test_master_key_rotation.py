"""Master-key rotation while gateways run, on SQLite and a real PostgreSQL.

A gateway still holding the old key answers 503 ``master_key_mismatch`` (audited) where it
needs a secret, reports ``/readyz`` not ready, and seals nothing; ``serve`` refuses the old
key; restarted with the new key, the gateway serves again. Rotation and sealing racing on
the master-key record end either way with every secret under one key.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pyotp
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.writer import begin_write
from auth.crypto import (
    MASTER_KEY_ENV,
    MASTER_KEY_FILE,
    MasterKey,
    MasterKeyError,
    MasterKeyMismatch,
)
from auth.master_key import rewrap_columns
from auth.models import jwt_keys, master_key_check, users
from auth.service import (
    AuthService,
    claim_master_key,
    record_master_key,
    replace_master_key,
)
from gateway.cli.admin import rewrap_secrets
from gateway.db import make_engine, migrate
from gateway.identity import AUTH_SERVICE
from gateway.receipts import SEALED_SECRETS, log_keys, receipt_keys
from tests.auth.conftest import Store
from tests.conftest import PgDatabase
from tests.gateway.conftest import Gateway, StartGateway, start_gateway  # noqa: F401
from tests.gateway.helpers import ORIGIN
from tests.gateway.test_auth_hardening import IDENTITY_PROOF

# ---------------------------------------------------------------------------------------
# helpers


def _code(secret: str) -> str:
    return pyotp.TOTP(secret).now()


def _env(gateway: Gateway) -> dict[str, str]:
    """The CLI's environment for ``gateway``'s data: its database, the key from the file."""
    env = {k: v for k, v in os.environ.items() if k != MASTER_KEY_ENV}
    if gateway.kind == "postgresql":
        env["KZG_GATEWAY_DATABASE_URL"] = gateway.app_url
        env["KZG_GATEWAY_DATABASE_OWNER_URL"] = gateway.owner_url
    return env


async def _cli(
    gateway: Gateway, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run ``python -m gateway <args> --data-dir …`` as a real process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        "--data-dir",
        str(gateway.config.data_dir),
        env=env or _env(gateway),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _file_key(gateway: Gateway) -> MasterKey:
    return MasterKey.from_text((gateway.config.data_dir / MASTER_KEY_FILE).read_text())


async def _login(gateway: Gateway, user: dict[str, Any]) -> tuple[Any, Any]:
    body = {"username": user["username"], "password": user["password"]}
    return await gateway.post(
        "/v1/auth/login", {**body, "totp": _code(user["totp_secret"])}, role=None
    )


async def _stored(engine: AsyncEngine) -> dict[str, Any]:
    """What sealing would change: the recorded key and the sealed rows."""
    async with engine.connect() as conn:
        count = {
            table.name: (await conn.execute(select(func.count()).select_from(table))).scalar()
            for table in (users, jwt_keys, log_keys, receipt_keys)
        }
        record = (await conn.execute(select(master_key_check.c.check_value))).scalar()
    return {**count, "check_value": record}


def _sealed_total(stored: dict[str, Any]) -> int:
    """How many sealed secrets the counted rows hold (every row holds one)."""
    return sum(stored[t] for t in ("users", "jwt_keys", "log_keys", "receipt_keys"))


async def _open_all(engine: AsyncEngine, key: MasterKey) -> int:
    """Open every sealed secret with ``key`` (raises if one does not open); how many."""
    opened = 0
    async with engine.connect() as conn:
        for column in SEALED_SECRETS:
            for ident, sealed in (await conn.execute(column.select_sealed())).all():
                key.open(sealed, f"{column.purpose}:{ident}")
                opened += 1
    return opened


async def _assert_mismatch(gateway: Gateway, response: Any, body: Any) -> None:
    assert response.status == 503, body
    assert body["error"]["code"] == "master_key_mismatch"
    assert int(response.headers["Retry-After"]) > 0
    [record] = await gateway.audit_records(response.headers["X-Request-ID"])
    assert record["http_status"] == 503
    assert json.loads(record["detail"])["error"]["code"] == "master_key_mismatch"


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest) -> PgDatabase | None:
    return None if request.param == "sqlite" else request.getfixturevalue("pg_database")


# ---------------------------------------------------------------------------------------
# a running gateway and the CLI


async def test_a_gateway_left_on_the_old_key_refuses_until_restarted_with_the_new_one(
    start_gateway: StartGateway,  # noqa: F811
    database: PgDatabase | None,
) -> None:
    # Given a gateway running with K1, an admin logged in, and a person not yet logged in.
    gateway = await start_gateway(database)
    old_text = (gateway.config.data_dir / MASTER_KEY_FILE).read_text().strip()
    old_key = MasterKey.from_text(old_text)
    service = gateway.app[AUTH_SERVICE]
    ops = await service.create_user("ops", ["admin"])
    mira = await service.create_user("mira", ["auditor"])
    response, body = await _login(gateway, ops)
    assert response.status == 200, body
    bearer = {"Authorization": f"Bearer {body['access_token']}"}

    # When the CLI rotates the master key to K2 while the gateway keeps running.
    code, out, err = await _cli(gateway, "admin", "master-key", "rotate")
    assert code == 0, err
    rewrapped = json.loads(out)["rewrapped"]
    new_key = _file_key(gateway)
    assert new_key.check_value() != old_key.check_value()
    engine = make_engine(gateway.app_url)
    try:
        before = await _stored(engine)
        assert before["check_value"] == new_key.check_value()
        # Every sealed secret was re-sealed: three people, the JWT key and the log key
        # (no BLS receipt key is made any more).
        assert (before["users"], before["jwt_keys"], before["log_keys"]) == (3, 1, 1)
        assert before["receipt_keys"] == 0
        assert rewrapped == _sealed_total(before) == 5

        # Then a login is 503 master_key_mismatch (not 500), and audited.
        response, body = await _login(gateway, mira)
        await _assert_mismatch(gateway, response, body)

        # No outage: the old-key instance stays ready (naming the outdated key) and
        # serves everything that needs no secret: KZG with a receipt (its log key is
        # in memory), API keys, and the bearer token of a person already logged in.
        response, body = await gateway.readyz()
        assert response.status == 200, body
        assert body["checks"]["master_key"] is False
        assert body["checks"]["database"] is True
        response, answer = await gateway.post("/v1/kzg/verify-proof", IDENTITY_PROOF)
        assert response.status == 200 and answer["receipt"], answer
        response, answer = await gateway.request("GET", "/v1/audit/verify", role="auditor")
        assert response.status == 200 and answer["valid"] is True, answer
        response, answer = await gateway.request(
            "GET", "/v1/admin/access-review", role=None, headers=bearer
        )
        assert response.status == 200, answer

        # Rotating the signing or the JWT key through it is refused and writes nothing.
        for path in ("/v1/admin/signing-keys/rotate", "/v1/admin/jwt-keys/rotate"):
            response, body = await gateway.request("POST", path, role=None, headers=bearer)
            await _assert_mismatch(gateway, response, body)
        with pytest.raises(MasterKeyMismatch):
            await service.create_user("late", ["client"])
        with pytest.raises(MasterKeyMismatch):
            await service.rotate_jwt_key()
        assert await _stored(engine) == before
        # Nothing sealed under K1 remains: K2 opens every secret.
        assert await _open_all(engine, new_key) == _sealed_total(before)

        # serve refuses to start with K1 (a real process, the key in its environment).
        env = {**_env(gateway), MASTER_KEY_ENV: old_text}
        code, _, err = await _cli(gateway, "serve", "--port", "0", env=env)
        assert code == 1 and "another master key" in err

        # When the gateway is restarted with K2 (init again, as a deployment would).
        restarted = await start_gateway(database)
        response, body = await restarted.request("GET", "/readyz", role=None)
        assert response.status == 200 and body["checks"]["master_key"] is True, body
        response, body = await _login(restarted, mira)
        assert response.status == 200, body
        response, body = await restarted.request(
            "POST", "/v1/admin/signing-keys/rotate", role=None, headers=bearer
        )
        assert response.status == 200, body
        # The log key was rotated: the answer is the new key, now current and published.
        assert set(body) == {"key_id", "vkey", "status", "not_before", "not_after"}
        assert body["status"] == "current" and body["vkey"].startswith(ORIGIN + "+")
        response, listing = await restarted.request("GET", "/v1/log/keys", role=None)
        assert {k["vkey"]: k["status"] for k in listing["keys"]}[body["vkey"]] == "current"
        await restarted.app[AUTH_SERVICE].create_user("late", ["client"])
        after = await _stored(engine)
        assert after["log_keys"] == before["log_keys"] + 1
        assert after["receipt_keys"] == before["receipt_keys"] == 0
        assert after["check_value"] == new_key.check_value()
        assert await _open_all(engine, new_key) == _sealed_total(after)
        # The instance not yet restarted still refuses what needs a secret, still ready.
        response, body = await _login(gateway, mira)
        await _assert_mismatch(gateway, response, body)
        response, body = await gateway.readyz()
        assert response.status == 200 and body["checks"]["master_key"] is False
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------------------
# rotation and sealing racing on the master-key record


async def _sealed_and_a_writer(store: Store) -> tuple[AuthService, MasterKey, AsyncConnection]:
    """A secret sealed under the store's key K1, a new key K2, and a connection inside a
    write transaction (the caller closes it)."""
    service = store.make()
    await service.create_user("nina", ["auditor"])
    connection = await store.engine.connect()
    await begin_write(connection)
    return service, MasterKey(MasterKey.generate()), connection


async def test_a_sealing_that_waits_for_a_rotation_is_refused(store: Store) -> None:
    # Given secrets sealed under K1 and a rotation to K2 holding the record, not committed.
    service, new_key, rotation = await _sealed_and_a_writer(store)
    try:
        await replace_master_key(rotation, store.master_key, new_key)
        # When a process still on K1 seals a new secret meanwhile, it waits for the record.
        late = asyncio.ensure_future(service.create_user("late", ["client"]))
        await asyncio.sleep(0.5)
        assert not late.done()
        assert await rewrap_columns(rotation, store.master_key, new_key, SEALED_SECRETS) == 1
        await rotation.commit()
    finally:
        await rotation.close()
    # Then it sees K2 recorded and refuses: nothing under K1 was written.
    with pytest.raises(MasterKeyMismatch, match="restart with the current key"):
        await late
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(users.c.username))).scalars().all() == ["nina"]
    assert await _open_all(store.engine, new_key) == 1


async def test_a_sealing_that_holds_the_record_first_is_resealed_by_the_rotation(
    store: Store,
) -> None:
    # Given a sealing under K1 that holds the record and has written, not yet committed.
    service, new_key, sealer = await _sealed_and_a_writer(store)
    try:
        await claim_master_key(sealer, store.master_key)
        await sealer.execute(
            insert(users).values(
                id="usr_racing",
                username="racing",
                password_hash="x",
                sealed_totp_secret=store.master_key.seal(b"secret", "totp:usr_racing"),
                roles="client",
                disabled=False,
                failed_logins=0,
                last_totp_step=0,
                created_at="2026-11-24T00:00:00.000000Z",
                password_changed_at="2026-11-24T00:00:00.000000Z",
            )
        )
        # When the rotation starts, it waits for the record.
        rotation = asyncio.ensure_future(rewrap_secrets(store.engine, store.master_key, new_key))
        await asyncio.sleep(0.5)
        assert not rotation.done()
        await sealer.commit()
    finally:
        await sealer.close()
    # Then it reads the sealing's secret after its commit and re-seals it too.
    assert await rotation == 2
    assert await _open_all(store.engine, new_key) == 2
    with pytest.raises(MasterKeyMismatch):
        await service.create_user("late", ["client"])


# ---------------------------------------------------------------------------------------
# databases that held secrets before the record existed (migration auth_0003)


async def test_a_database_older_than_the_record_gets_it_only_from_a_key_that_opens_it(
    database: PgDatabase | None, tmp_path: Path
) -> None:
    if database is None:
        owner_url = app_url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        app_role = None
    else:
        owner_url, app_url, app_role = database.owner_url, database.app_url, database.app_role
    # Given a database at auth_0002 holding a secret sealed under K1.
    await migrate(owner_url, app_role, target="auth_0002")
    key, other = MasterKey(MasterKey.generate()), MasterKey(MasterKey.generate())
    engine = make_engine(app_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(users).values(
                    id="usr_old",
                    username="old",
                    password_hash="x",
                    sealed_totp_secret=key.seal(b"secret", "totp:usr_old"),
                    roles="client",
                    disabled=False,
                    failed_logins=0,
                    last_totp_step=0,
                    created_at="2026-11-24T00:00:00.000000Z",
                    password_changed_at="2026-11-24T00:00:00.000000Z",
                )
            )
        # When it is upgraded, no key is recorded, and nothing may be sealed yet.
        await migrate(owner_url, app_role)
        assert (await _stored(engine))["check_value"] is None
        async with engine.begin() as conn:
            with pytest.raises(MasterKeyMismatch, match="run 'kzg-gateway init'"):
                await claim_master_key(conn, key)
        # A key that does not open the stored secret is not recorded.
        with pytest.raises(MasterKeyError, match="does not open"):
            await record_master_key(engine, other, SEALED_SECRETS)
        async with engine.connect() as conn:
            assert (await conn.execute(select(master_key_check))).first() is None
        # The key that opens them is recorded (as init and serve do); then only it seals.
        await record_master_key(engine, key, SEALED_SECRETS)
        await record_master_key(engine, key, SEALED_SECRETS)
        assert (await _stored(engine))["check_value"] == key.check_value()
        with pytest.raises(MasterKeyMismatch, match="another master key"):
            await record_master_key(engine, other, SEALED_SECRETS)
        async with engine.begin() as conn:
            await claim_master_key(conn, key)
            with pytest.raises(MasterKeyMismatch):
                await claim_master_key(conn, other)
    finally:
        await engine.dispose()
