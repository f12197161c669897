"""Console fixtures: a real gateway over TLS served from its own thread (the browser
tests are synchronous: selenium blocks), the system's headless Chromium driven by
selenium, people with real passwords and TOTP secrets, and screenshots as artefacts.

One gateway and one browser per test module: the tests of a module run in file order
and build on each other's log (tampering tests come last).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyotp
import pytest
import requests
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from audit.models import audit_events
from auth.crypto import MasterKey
from gateway.app import create_app
from gateway.appkeys import DB_ENGINE
from gateway.identity import AUTH_SERVICE
from gateway.server import start_server
from gateway.tls import server_ssl_context
from tests.conftest import REPO, PgDatabase, missing
from tests.gateway.conftest import CHEAP_ARGON2, GENEROUS_LIMITS, gateway_config

ARTIFACTS = REPO / "test-artifacts" / "console"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

T = TypeVar("T")


@dataclass
class Person:
    username: str
    password: str
    totp_secret: str
    roles: list[str]
    _last_step: int = 0

    def code(self) -> str:
        """A one-time code the gateway has not seen from this person: codes are single
        use, so a second login within one 30-second step waits for the next."""
        step = int(time.time()) // 30
        if step <= self._last_step:
            time.sleep((self._last_step + 1) * 30 - time.time() + 0.05)
            step = int(time.time()) // 30
        self._last_step = step
        return pyotp.TOTP(self.totp_secret).at(step * 30)


@dataclass
class LiveGateway:
    """A gateway serving HTTPS on its own event loop in a thread."""

    url: str
    data_dir: Path
    app: web.Application
    loop: asyncio.AbstractEventLoop
    people: dict[str, Person] = field(default_factory=dict)
    api_keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the gateway's loop (its engines and services live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    def person(self, username: str, roles: list[str]) -> Person:
        if username not in self.people:
            made = self.run(self.app[AUTH_SERVICE].create_user(username, roles))
            self.people[username] = Person(username, made["password"], made["totp_secret"], roles)
        return self.people[username]

    def api_key(self, role: str) -> str:
        """A real API key of ``role`` (made once; its id in ``api_keys[role]``)."""
        if role not in self.api_keys:
            service = self.app[AUTH_SERVICE]
            self.api_keys[role] = self.run(service.create_api_key(f"console-{role}", role, "t"))
        return self.api_keys[role]["api_key"]

    def http(
        self, method: str, path: str, session: requests.Session | None = None, **kwargs: Any
    ) -> requests.Response:
        """One HTTPS request, the dev CA verified (per request: the environment's
        REQUESTS_CA_BUNDLE would otherwise win over a session's setting)."""
        sender = session or requests
        return sender.request(
            method, self.url + path, verify=str(self.ca_file), timeout=30, **kwargs
        )

    def audit_record(self, request_id: str) -> dict[str, Any]:
        """The one audit record of a request, read from the log's table."""

        async def read() -> list[dict[str, Any]]:
            async with self.app[DB_ENGINE].connect() as conn:
                rows = await conn.execute(
                    select(audit_events).where(audit_events.c.request_id == request_id)
                )
                return [dict(row._mapping) for row in rows]

        (record,) = self.run(read())
        return record

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def spki_pin(self) -> str:
        """base64 SHA-256 of the server certificate's public key: what Chromium is told to
        accept, instead of accepting any certificate."""
        cert = x509.load_pem_x509_certificate((self.data_dir / "tls" / "server.pem").read_bytes())
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def start_live_gateway(
    data_dir: Path, database: PgDatabase | None = None, auth: dict[str, Any] | None = None
) -> tuple[LiveGateway, threading.Thread]:
    """Start a gateway (SQLite, or ``database``); ``auth`` overrides its security values."""
    from gateway.cli.serve import initialise

    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()
    sections: dict[str, Any] = {
        "auth": {**CHEAP_ARGON2, "ratelimit": GENEROUS_LIMITS, **(auth or {})}
    }
    if database is not None:
        sections.update(
            database_url=database.app_url,
            database_owner_url=database.owner_url,
            database_app_role=database.app_role,
        )

    async def serve() -> None:
        config = gateway_config(data_dir, **sections)
        await initialise(config)
        master_key = MasterKey.from_text((data_dir / "master.key").read_text())
        app = create_app(config, master_key=master_key)
        runner, site = await start_server(
            app, "127.0.0.1", 0, server_ssl_context(config.tls, data_dir)
        )
        ready.update(app=app, runner=runner, port=site.port)
        started.set()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:
            ready["error"] = exc
            started.set()
            return
        loop.run_forever()
        loop.run_until_complete(ready["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=main, name="live-gateway", daemon=True)
    thread.start()
    if not started.wait(120) or "error" in ready:
        raise RuntimeError(f"the gateway did not start: {ready.get('error')!r}")
    gateway = LiveGateway(f"https://127.0.0.1:{ready['port']}", data_dir, ready["app"], loop)
    return gateway, thread


def stop_live_gateway(gateway: LiveGateway, thread: threading.Thread) -> None:
    gateway.loop.call_soon_threadsafe(gateway.loop.stop)
    thread.join(60)


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    gateway, thread = start_live_gateway(tmp_path_factory.mktemp("console") / "gw")
    yield gateway
    stop_live_gateway(gateway, thread)


@pytest.fixture(scope="module")
def browser(live_gateway: LiveGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Chromium at 1280x800 that trusts exactly the gateway's certificate."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium (pip install 'kzg-gateway[dev]')")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing("chromium and chromium-driver (scripts/system-deps.sh)")
    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        f"--ignore-certificate-errors-spki-list={live_gateway.spki_pin()}",
    ):
        options.add_argument(argument)
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.downloads = downloads
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where the browser tests leave their screenshots (git-ignored)."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS
