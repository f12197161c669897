"""Fixtures of the SDK tests: real gateways over TLS 1.3 on SQLite, and a TLS man in the
middle that can rewrite what passes.

The gateways run on an event loop in a daemon thread of their own, so the synchronous
client can block the test's thread while the gateway answers, and async tests can drive
``AsyncGatewayClient`` on their own loop against them.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from sqlalchemy import select

from audit.models import audit_events
from auth.crypto import MasterKey
from gateway.app import create_app
from gateway.appkeys import DB_ENGINE, KZG_POOL
from gateway.client import AsyncGatewayClient, GatewayClient
from gateway.config import Config
from gateway.identity import AUTH_SERVICE
from gateway.receipts import list_log_keys
from gateway.security import install
from gateway.server import start_server
from gateway.settings import TlsSettings
from gateway.tls import server_ssl_context, tls_files

T = TypeVar("T")
BLOB_BYTES = 131072
ENGINE_NAME = "ckzg"
# Password hashing cheap enough for tests; API keys are hashed with the same settings.
CHEAP_ARGON2 = {"passwords": {"time_cost": 1, "memory_kib": 1024, "parallelism": 1}}


def make_blob(seed: int) -> bytes:
    """A valid blob: 4096 canonical field elements (top byte zero)."""
    rng = random.Random(seed)
    return b"".join(b"\x00" + rng.randbytes(31) for _ in range(4096))


def hold_worker(engine: Any, seconds: float) -> str:
    """Runs in a pool worker: keeps it busy."""
    time.sleep(seconds)
    return str(engine.name)


class ServerThread:
    """An event loop in a daemon thread, where the gateways and proxies run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Start ``coro`` there; return its concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return self.submit(coro).result(timeout)

    async def call_async(self, coro: Coroutine[Any, Any, T]) -> T:
        """``call`` from a coroutine of another loop, without blocking that loop."""
        return await asyncio.wrap_future(self.submit(coro))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def gateway_config(data_dir: Path, **sections: Any) -> Config:
    data: dict[str, Any] = {
        "engine": {"name": ENGINE_NAME},
        "pool": {"workers": 2},
        "jobs": {"enabled": False},
        "server": {"shutdown_timeout_seconds": 5},
        "auth": CHEAP_ARGON2,
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            data[name] = {**data.get(name, {}), **values}
        else:
            data[name] = values
    return Config(data, data_dir)


@dataclass
class LiveGateway:
    """A running gateway, and how the tests reach it."""

    url: str
    ca_file: Path
    data_dir: Path
    config: Config
    app: web.Application
    runner: web.AppRunner
    server: ServerThread
    vkeys: list[str]
    _keys: dict[str, str] = field(default_factory=dict)
    _clients: list[GatewayClient] = field(default_factory=list)

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.server.call(coro)

    def api_key(self, role: str = "client") -> str:
        """A real API key for ``role`` (created once, through the identity service)."""
        if role not in self._keys:
            created = self.call(self.app[AUTH_SERVICE].create_api_key(f"sdk-{role}", role, "tests"))
            self._keys[role] = created["api_key"]
        return self._keys[role]

    def create_user(self, username: str, roles: list[str]) -> dict[str, str]:
        """A person: returns their generated password and TOTP secret."""
        return self.call(self.app[AUTH_SERVICE].create_user(username, roles))

    def options(self, **overrides: Any) -> dict[str, Any]:
        options: dict[str, Any] = {
            "base_url": self.url,
            "ca_file": self.ca_file,
            "log_keys": self.vkeys,
        }
        if "username" not in overrides:
            options["api_key"] = self.api_key()
        return {**options, **overrides}

    def client(self, **overrides: Any) -> GatewayClient:
        """A synchronous client of this gateway (closed at the end of the test)."""
        client = GatewayClient(**self.options(**overrides))
        self._clients.append(client)
        return client

    def async_client(self, **overrides: Any) -> AsyncGatewayClient:
        return AsyncGatewayClient(**self.options(**overrides))

    def audit_records(self, request_id: str) -> list[dict[str, Any]]:
        """Every audit record of one request, as stored."""

        async def read() -> list[dict[str, Any]]:
            async with self.app[DB_ENGINE].connect() as conn:
                rows = await conn.execute(
                    select(audit_events).where(audit_events.c.request_id == request_id)
                )
                return [dict(row._mapping) for row in rows]

        return self.call(read())

    def hold_workers(self, seconds: float, calls: int) -> list[Any]:
        """Occupy the pool: ``calls`` calls of ``seconds`` each; returns their futures once
        they are all running or queued."""
        pool = self.app[KZG_POOL]
        futures = [self.server.submit(pool.call(hold_worker, seconds)) for _ in range(calls)]
        deadline = time.monotonic() + 10
        while pool.queue_depth < calls - pool.size and time.monotonic() < deadline:
            time.sleep(0.01)
        return futures

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def stop(self) -> None:
        self.close_clients()
        self.call(self.runner.cleanup())


async def _start(data_dir: Path, **sections: Any) -> tuple[Config, web.Application, Any, int]:
    from gateway.cli.serve import initialise

    config = gateway_config(data_dir, **sections)
    await initialise(config)
    master_key = MasterKey.from_text((data_dir / "master.key").read_text())
    app = create_app(config, master_key=master_key, security=install)
    runner, site = await start_server(app, "127.0.0.1", 0, server_ssl_context(config.tls, data_dir))
    return config, app, runner, site.port


def start_gateway(server: ServerThread, data_dir: Path, **sections: Any) -> LiveGateway:
    config, app, runner, port = server.call(_start(data_dir, **sections))
    keys = server.call(list_log_keys(app[DB_ENGINE]))
    return LiveGateway(
        url=f"https://127.0.0.1:{port}",
        ca_file=data_dir / "tls" / "ca.pem",
        data_dir=data_dir,
        config=config,
        app=app,
        runner=runner,
        server=server,
        vkeys=[k.vkey for k in keys],
    )


@pytest.fixture(scope="session")
def server_thread() -> Iterator[ServerThread]:
    thread = ServerThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def live_gateway(
    server_thread: ServerThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveGateway]:
    """One gateway for the tests that need nothing special of it."""
    gateway = start_gateway(server_thread, tmp_path_factory.mktemp("sdk") / "gw")
    yield gateway
    gateway.stop()


@pytest.fixture
def gateway(live_gateway: LiveGateway) -> Iterator[LiveGateway]:
    """The shared gateway; the clients a test makes are closed after it."""
    yield live_gateway
    live_gateway.close_clients()


class Gateways:
    """Starts gateways with their own configuration; all are stopped after the test."""

    def __init__(self, server: ServerThread, root: Path) -> None:
        self.server = server
        self.root = root
        self.started: list[LiveGateway] = []

    def start(self, name: str = "gw", **sections: Any) -> LiveGateway:
        gateway = start_gateway(self.server, self.root / name, **sections)
        self.started.append(gateway)
        return gateway

    def stop(self, gateway: LiveGateway) -> None:
        self.started.remove(gateway)
        gateway.stop()

    def stop_all(self) -> None:
        for gateway in reversed(self.started):
            gateway.stop()
        self.started.clear()


@pytest.fixture
def gateways(server_thread: ServerThread, tmp_path: Path) -> Iterator[Gateways]:
    started = Gateways(server_thread, tmp_path)
    yield started
    started.stop_all()


Rewrite = Callable[[str, bytes], bytes]
RewriteAnswer = Callable[[str, CIMultiDict[str], bytes], bytes]


class Interceptor:
    """A man in the middle holding the gateway's own TLS certificate: it forwards every
    request to ``upstream`` and lets a test rewrite the request body (``on_request``)
    or the answer body (``on_answer``), as a compromised network or gateway could."""

    def __init__(self, server: ServerThread, upstream: LiveGateway) -> None:
        self.server = server
        self.upstream = upstream
        self.on_request: Rewrite | None = None
        self.on_answer: RewriteAnswer | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.on_request is not None:
            body = self.on_request(request.path, body)
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream.url + request.path_qs, data=body, headers=headers
        ) as answer:
            data = await answer.read()
            kept = CIMultiDict(
                (k, v)
                for k, v in answer.headers.items()
                if k.lower() in ("content-type", "x-request-id", "retry-after")
            )
            status = answer.status
        if self.on_answer is not None:
            data = self.on_answer(request.path, kept, data)
        return web.Response(status=status, body=data, headers=kept)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context_for(self.upstream.ca_file))
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        cert, key = tls_files(TlsSettings(), self.upstream.data_dir)
        context = server_ssl_context(TlsSettings(str(cert), str(key)), Path("."))
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.url = f"https://127.0.0.1:{site.port}"

    async def _stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def start(self) -> Interceptor:
        self.server.call(self._start())
        return self

    def stop(self) -> None:
        self.server.call(self._stop())


def ssl_context_for(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


@pytest.fixture
def interceptor(gateway: LiveGateway, server_thread: ServerThread) -> Iterator[Interceptor]:
    proxy = Interceptor(server_thread, gateway).start()
    yield proxy
    proxy.stop()


def rewrite_json(change: Callable[[dict[str, Any]], None]) -> RewriteAnswer:
    """An ``on_answer`` that edits successful JSON answers of the KZG routes."""

    def rewrite(path: str, headers: CIMultiDict[str], body: bytes) -> bytes:
        if not path.startswith("/v1/kzg/"):
            return body
        document = json.loads(body)
        if "receipt" in document:
            change(document)
        return json.dumps(document).encode()

    return rewrite
