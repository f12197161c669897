"""A real ``serve`` process through an audit-store outage, on SQLite (another process
holds the write lock) and on PostgreSQL (the connection cut through a proxy; the shared
server keeps running): liveness, readiness and metrics answer at once from the process;
after ``breaker_failure_threshold`` failed commits the breaker refuses KZG requests at
once with no engine call; once the store is back a trial commit closes it. Every line the
process wrote is JSON, and no probe reached the audit log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import select

from audit.models import audit_events
from gateway.db import DEFAULT_DATABASE_FILE, make_engine
from tests.audit.helpers import sqlite_write_lock
from tests.audit.proxy import CuttableProxy
from tests.conftest import PgDatabase, free_port
from tests.gateway.helpers import IDENTITY_PROOF
from tests.production.test_instances import Instance, get
from tests.production.test_process_faults import _gateway_env

COMMIT_TIMEOUT = 3.0
THRESHOLD = 2
RECOVERY = 2.0
# Generous bounds for a loaded 2-core machine; the point is "not the commit timeout".
FAST = 1.0


@dataclass
class Outage:
    gateway: Instance
    app_url: str  # where the test reads the audit log
    cut: Callable[[], Awaitable[None]]
    restore: Callable[[], Awaitable[None]]


def _env(**extra: str) -> dict[str, str]:
    return _gateway_env(
        KZG_GATEWAY_AUDIT__COMMIT_TIMEOUT_SECONDS=str(COMMIT_TIMEOUT),
        KZG_GATEWAY_AUDIT__BREAKER_FAILURE_THRESHOLD=str(THRESHOLD),
        KZG_GATEWAY_AUDIT__BREAKER_RECOVERY_TIMEOUT_SECONDS=str(RECOVERY),
        KZG_GATEWAY_SERVER__READINESS_INTERVAL_SECONDS="0.5",
        KZG_GATEWAY_JOBS__ENABLED="false",
        **extra,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def outage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outage]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            gateway = Instance("sqlite", tmp_path / "data", free_port(), _env())
            database = (gateway.data_dir / DEFAULT_DATABASE_FILE).resolve()
            app_url = f"sqlite+aiosqlite:///{database}"
            release: list[Callable[[], None]] = []

            async def cut() -> None:
                release.append(stack.enter_context(sqlite_write_lock(app_url)))

            async def restore() -> None:
                release.pop()()

        else:
            pg: PgDatabase = request.getfixturevalue("pg_database")
            host, port = re.search(r"@([^:/]+):(\d+)/", pg.app_url).groups()  # type: ignore[union-attr]
            proxy = CuttableProxy(host, int(port))
            await proxy.start()
            app_url = pg.app_url.replace(f"@{host}:{port}/", f"@127.0.0.1:{proxy.port}/")
            gateway = Instance(
                "postgresql",
                tmp_path / "data",
                free_port(),
                _env(
                    KZG_GATEWAY_DATABASE_URL=app_url,
                    KZG_GATEWAY_DATABASE_OWNER_URL=pg.owner_url,
                    KZG_GATEWAY_DATABASE_APP_ROLE=pg.app_role,
                ),
            )
            cut, restore = proxy.cut, proxy.start
            app_url = pg.app_url
        # In a thread: the proxy runs on this loop.
        await asyncio.to_thread(gateway.cli, "init", "--json")
        gateway.start()
        try:
            await gateway.wait_ready()
            yield Outage(gateway, app_url, cut, restore)
        finally:
            gateway.stop(signal.SIGKILL)
            if request.param == "postgresql":
                await proxy.cut()


async def _timed(call: Awaitable[Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await call
    return time.perf_counter() - started, result


async def _kzg(gateway: Instance, key: str, session: aiohttp.ClientSession) -> tuple[int, Any]:
    async with session.post(
        f"{gateway.url}/v1/kzg/verify-proof", json=IDENTITY_PROOF, headers={"X-API-Key": key},
        ssl=gateway.ssl(),
    ) as response:  # fmt: skip
        return response.status, await response.json()


def _sample(metrics: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _scrape(gateway: Instance, token: str, session: aiohttp.ClientSession) -> str:
    # As Prometheus does: the monitor's API key as a bearer token.
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(f"{gateway.url}/metrics", headers=headers, ssl=gateway.ssl()) as r:
        assert r.status == 200, await r.text()
        return await r.text()


ENGINE_CALLS = 'kzg_operation_duration_seconds_count{operation="verify_kzg_proof"}'


async def test_outage_probes_stay_fast_and_the_breaker_fails_fast_then_closes(
    outage: Outage,
) -> None:
    gateway = outage.gateway
    key, token = [
        (await asyncio.to_thread(gateway.cli, *command, "--role", role))["api_key"]
        for role in ("client", "monitor")
        for command in [("admin", "api-keys", "create", "--name", role)]
    ]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        assert (await _kzg(gateway, key, session))[0] == 200
        await _scrape(gateway, token, session)

        await outage.cut()
        try:
            # Until the threshold each request does its work and waits for its commit.
            for _ in range(THRESHOLD):
                status, answer = await _kzg(gateway, key, session)
                assert (status, answer["error"]["code"]) == (503, "audit_unavailable")
            metrics = await _scrape(gateway, token, session)
            assert _sample(metrics, "kzg_audit_breaker_state") == 2
            engine_calls = _sample(metrics, ENGINE_CALLS)

            # Open: refused at once, no engine call, no wait for the commit timeout.
            elapsed, (status, answer) = await _timed(_kzg(gateway, key, session))
            assert (status, answer["error"]["code"]) == (503, "audit_unavailable")
            assert elapsed < FAST, f"fast-fail took {elapsed:.3f} s"

            # Liveness, readiness and metrics answer from the process.
            elapsed, (status, body) = await _timed(get(gateway, "/healthz", session))
            assert (status, body) == (200, {"status": "ok"}) and elapsed < FAST, elapsed
            elapsed, (status, body) = await _timed(get(gateway, "/readyz", session))
            assert status == 503 and elapsed < FAST, elapsed
            assert body["breaker"] == "open" and body["checks"]["audit_breaker"] is False
            elapsed, metrics = await _timed(_scrape(gateway, token, session))
            assert elapsed < FAST, elapsed
            assert _sample(metrics, ENGINE_CALLS) == engine_calls, "the engine was called"
            assert _sample(metrics, "kzg_audit_breaker_rejections_total") >= 1
            # Counted after the answer: the two scrapes before this one.
            assert _sample(metrics, 'kzg_probes_unrecorded_total{route="metrics"}') >= 2
        finally:
            await outage.restore()

        # After the recovery timeout one trial commit closes the breaker.
        deadline = time.monotonic() + 30
        while (await _kzg(gateway, key, session))[0] != 200:
            assert time.monotonic() < deadline, gateway.log()
            await asyncio.sleep(0.2)
        metrics = await _scrape(gateway, token, session)
        assert _sample(metrics, "kzg_audit_breaker_state") == 0
        while (await get(gateway, "/readyz", session))[0] != 200:
            assert time.monotonic() < deadline, gateway.log()
            await asyncio.sleep(0.2)
        status, body = await get(gateway, "/readyz", session)
        assert body["breaker"] == "closed"

    await asyncio.to_thread(gateway.stop)  # its shutdown may talk through the proxy
    assert gateway.process is not None and gateway.process.returncode == 0, gateway.log()
    lines = gateway.log_path.read_text().splitlines()
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"timestamp", "level", "logger", "message"} <= entry.keys(), line
    # The outage was logged, and each request line names its request.
    assert any(json.loads(line)["logger"] == "audit.breaker" for line in lines)
    access = [json.loads(line) for line in lines if '"kzg_gateway.access"' in line]
    assert access and all(entry["request_id"] for entry in access)

    # Probes and scrapes are not in the log (record_probes is false by default).
    engine = make_engine(outage.app_url)
    try:
        async with engine.connect() as conn:
            paths = set((await conn.execute(select(audit_events.c.path).distinct())).scalars())
    finally:
        await engine.dispose()
    assert "/v1/kzg/verify-proof" in paths
    assert not paths & {"/healthz", "/readyz", "/metrics"}, paths
