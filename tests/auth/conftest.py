"""Identity fixtures: a migrated database (SQLite and a real PostgreSQL) and services over
it with cheap argon2 parameters and a clock the test moves."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from auth import tokens
from auth.crypto import MasterKey
from auth.policy import load_policies
from auth.service import AuthService
from gateway.db import make_engine, migrate
from tests.conftest import PgDatabase

# Tests pay for many hashes; the shipped policy's parameters are checked separately.
CHEAP_ARGON2 = {"passwords": {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}}


class Clock:
    """Real time plus an offset the test advances."""

    def __init__(self) -> None:
        import time

        self._time = time.time
        self.offset = 0.0

    def __call__(self) -> float:
        return self._time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class Store:
    kind: str
    engine: AsyncEngine
    master_key: MasterKey
    clock: Clock
    make: Callable[..., AuthService]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'auth.db'}"
        await migrate(url)
        app_url = url
    else:
        pg: PgDatabase = request.getfixturevalue("pg_database")
        await migrate(pg.owner_url, pg.app_role)
        app_url = pg.app_url
    engine = make_engine(app_url)
    master_key = MasterKey(MasterKey.generate())
    clock = Clock()

    def make(**override: object) -> AuthService:
        rbac, policy = load_policies(None, {**CHEAP_ARGON2, **override})
        return AuthService(engine, master_key, rbac, policy, clock=clock)

    yield Store(request.param, engine, master_key, clock, make)
    await engine.dispose()


async def tokens_to_refuse(service: AuthService, good: str) -> dict[str, str]:
    """Variants of the valid token ``good`` that a verifier must refuse, by name."""
    header, payload, signature = good.split(".")
    claims = jwt.decode(good, options={"verify_signature": False})
    kid = jwt.get_unverified_header(good)["kid"]
    key = await service._current_signing_key()
    public_pem = key.public_pem()  # as published
    # The classic confusion: an HS256 token keyed with the published public key, built
    # by hand since pyjwt itself refuses to create one.
    hs_header = jwt.utils.base64url_encode(
        json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode()
    ).decode()
    mac = hmac.new(public_pem.encode(), f"{hs_header}.{payload}".encode(), hashlib.sha256)
    other_payload = jwt.utils.base64url_encode(b'{"sub":"x"}').decode()
    return {
        "alg none": jwt.encode(claims, None, algorithm="none", headers={"kid": kid}),
        "HS256 keyed with the public key": (
            f"{hs_header}.{payload}.{jwt.utils.base64url_encode(mac.digest()).decode()}"
        ),
        "forged signature": f"{header}.{payload}.{signature[:-4]}AAAA",
        "tampered claims": f"{header}.{other_payload}.{signature}",
        "wrong audience": tokens.issue(key, {**claims, "aud": "someone-else"}),
        "wrong issuer": tokens.issue(key, {**claims, "iss": "someone-else"}),
        "expired": tokens.issue(key, {**claims, "exp": int(time.time()) - 1}),
        "not yet valid": tokens.issue(key, {**claims, "nbf": int(time.time()) + 600}),
    }
