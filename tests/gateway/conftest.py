"""Gateway fixtures: a real HTTPS server (TLS 1.3, dev CA, ephemeral port) on SQLite and
on a real PostgreSQL, with the real security module, helpers for authenticated calls
(a real API key per role) and for reading the audit log.

``gateway`` is parametrised over both databases; ``sqlite_gateway`` is SQLite only;
``start_gateway`` starts one with config overrides (engine, pool size, database URL).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import select

from audit.models import audit_events
from auth.crypto import MasterKey
from gateway.app import create_app
from gateway.appkeys import STATE
from gateway.config import Config
from gateway.db import make_engine
from gateway.identity import AUTH_SERVICE
from gateway.security import install
from gateway.server import start_server
from gateway.tls import server_ssl_context
from tests.conftest import PgDatabase

ENGINE_NAME = "ckzg"
# Password hashing cheap enough for tests; API keys are hashed with the same settings.
CHEAP_ARGON2 = {"passwords": {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}}
# For tests that send a burst of requests from one address or principal (a browser, a
# permission matrix); the limits themselves are tested in test_limits.
GENEROUS_LIMITS = {
    role: {"rate": 1000, "burst": 1000}
    for role in ("anonymous", "client", "monitor", "auditor", "admin", "key_admin")
}


@dataclass
class Gateway:
    """A running gateway and how to talk to it."""

    url: str
    ca_file: Path
    kind: str
    config: Config
    app: web.Application
    app_url: str
    owner_url: str
    runner: web.AppRunner
    _sessions: list[aiohttp.ClientSession] = field(default_factory=list)
    _keys: dict[str, str] = field(default_factory=dict)

    def ssl_context(self, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if maximum is not None:
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.maximum_version = maximum
        return context

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=self.ssl_context(), limit=kwargs.pop("limit", 100))
        session = aiohttp.ClientSession(self.url, connector=connector, **kwargs)
        self._sessions.append(session)
        return session

    async def api_key(self, role: str = "client") -> str:
        """A real API key for ``role`` (created once through the identity service)."""
        if role not in self._keys:
            created = await self.app[AUTH_SERVICE].create_api_key(f"test-{role}", role, "tests")
            self._keys[role] = created["api_key"]
        return self._keys[role]

    async def request(
        self,
        method: str,
        path: str,
        *,
        role: str | None = "client",
        json_body: Any = None,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[aiohttp.ClientResponse, Any]:
        """Make one request (as ``role``, None for no credential); return the response
        and its decoded JSON body (None when not JSON)."""
        sent = dict(headers or {})
        if role is not None:
            sent["X-API-Key"] = await self.api_key(role)
        if not self._sessions:
            self.session()
        async with self._sessions[0].request(
            method, path, json=json_body, data=data, headers=sent
        ) as response:
            raw = await response.read()
        body = json.loads(raw) if response.content_type == "application/json" else raw
        return response, body

    async def readyz(self, timeout: float = 15.0) -> tuple[aiohttp.ClientResponse, Any]:
        """/readyz once its checks were refreshed after this call: it answers from checks
        the gateway refreshes in the background, so a change shows at the next refresh."""
        state = self.app[STATE]
        since = time.monotonic()
        while state.checked_at is None or state.checked_at <= since:
            assert time.monotonic() - since < timeout, "readiness checks are not refreshed"
            await asyncio.sleep(0.05)
        return await self.request("GET", "/readyz", role=None)

    async def post(self, path: str, body: Any, **kwargs: Any) -> tuple[aiohttp.ClientResponse, Any]:
        return await self.request("POST", path, json_body=body, **kwargs)

    async def audit_records(self, request_id: str) -> list[dict[str, Any]]:
        """Every audit record of one request, read back through the runtime role."""
        engine = make_engine(self.app_url)
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(
                    select(audit_events).where(audit_events.c.request_id == request_id)
                )
                return [dict(row._mapping) for row in rows]
        finally:
            await engine.dispose()

    async def close(self) -> None:
        for session in self._sessions:
            await session.close()


StartGateway = Callable[..., Awaitable[Gateway]]


def gateway_config(data_dir: Path, **sections: dict[str, Any]) -> Config:
    data: dict[str, Any] = {
        "engine": {"name": ENGINE_NAME},
        "pool": {"workers": 2},
        "jobs": {"enabled": False},
        "server": {"shutdown_timeout_seconds": 5},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return Config(data, data_dir)


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[StartGateway]:
    """Start gateways on this test's loop: ``await start_gateway(database=None, **sections)``."""
    from gateway.cli.serve import initialise

    started: list[tuple[Gateway, web.AppRunner]] = []

    async def start(
        database: PgDatabase | None = None,
        security: Any = install,
        name: str = "gw",
        **sections: Any,
    ) -> Gateway:
        data_dir = tmp_path / name
        if database is not None:
            sections = {
                "database_url": database.app_url,
                "database_owner_url": database.owner_url,
                "database_app_role": database.app_role,
                **sections,
            }
        config = gateway_config(data_dir, **{"auth": CHEAP_ARGON2, **sections})
        await initialise(config)
        master_key = MasterKey.from_text((data_dir / "master.key").read_text())
        app = create_app(config, master_key=master_key, security=security)
        runner, site = await start_server(
            app, "127.0.0.1", 0, server_ssl_context(config.tls, data_dir)
        )
        port = site.port
        gateway = Gateway(
            url=f"https://127.0.0.1:{port}",
            ca_file=data_dir / "tls" / "ca.pem",
            kind="postgresql" if database is not None else "sqlite",
            config=config,
            app=app,
            app_url=config.database_url,
            owner_url=config.database_owner_url,
            runner=runner,
        )
        started.append((gateway, runner))
        return gateway

    yield start
    for gateway, runner in reversed(started):
        await gateway.close()
        await runner.cleanup()


@pytest.fixture
async def sqlite_gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


@pytest.fixture(params=["sqlite", "postgresql"])
async def gateway(request: pytest.FixtureRequest, start_gateway: StartGateway) -> Gateway:
    if request.param == "sqlite":
        return await start_gateway()
    return await start_gateway(request.getfixturevalue("pg_database"))
