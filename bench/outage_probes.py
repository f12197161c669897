"""Probes, scrapes and the audit breaker through an audit-store outage, and the audit-log
volume that unrecorded probes save.

    .venv/bin/python bench/outage_probes.py [--requests 200] [--data-dir DIR] [--postgresql]

A real ``serve`` process on the embedded SQLite (ckzg, one worker). The outage: another
process holds the database's write lock, so every commit waits out
``[audit] commit_timeout_seconds`` (5 s, the default) and fails. Printed:

- latency of /healthz, /readyz and /metrics (monitor key as a bearer token) healthy and
  during the outage;
- the requests that fail before the breaker opens (each waits for the commit timeout),
  then the breaker's fast-fail latency for verify-proof, with the engine's call count
  before and after (no engine work while open);
- bytes per probe record, measured from real records (``[audit] record_probes = true``):
  the canonical entry (the leaf, what the export and every verification carry) and the
  growth of the database (records, tree hashes and the signed tree head each lone probe
  commit writes), and what that makes per pod per day at the probe periods of
  deploy/kubernetes/gateway.yaml and the scrape interval of deploy/prometheus/scrape.yaml.

``breaker_recovery_timeout_seconds`` is raised to 600 so that no half-open trial (which
waits for the commit timeout like any failing commit) mixes into the fast-fail figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from benchlib import REPO, PgDatabase, PgServer, free_port, machine_facts, percentile

from gateway.db import DEFAULT_DATABASE_FILE

VERIFY = {
    "commitment": "0xc0" + "00" * 47,
    "z": "0x" + "00" * 32,
    "y": "0x" + "00" * 32,
    "proof": "0xc0" + "00" * 47,
}
ENGINE_CALLS = 'kzg_operation_duration_seconds_count{operation="verify_kzg_proof"}'


class Gateway:
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.env = env
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._ssl: ssl.SSLContext | None = None

    @property
    def ssl(self) -> ssl.SSLContext:
        # The dev CA exists once init has run.
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.data_dir / "tls" / "ca.pem"))
        return self._ssl

    def cli(self, *command: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *command, "--data-dir", str(self.data_dir)],
            cwd=REPO, env=self.env, check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip

    def api_key(self, role: str) -> str:
        out = self.cli("admin", "api-keys", "create", "--name", role, "--role", role)
        return str(json.loads(out)["api_key"])

    async def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--data-dir", str(self.data_dir),
             "--port", str(self.port)],
            cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                try:
                    async with session.get(f"{self.url}/readyz", ssl=self.ssl) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise RuntimeError("the gateway did not become ready")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=60)


def _env(**config: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KZG_GATEWAY_")}
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "KZG_GATEWAY_ENGINE__NAME": "ckzg",
        "KZG_GATEWAY_POOL__WORKERS": "1",
        "KZG_GATEWAY_JOBS__ENABLED": "false",
        **config,
    }


async def _timed(call: Callable[[], Awaitable[Any]], n: int) -> tuple[list[float], list[Any]]:
    latencies, results = [], []
    for _ in range(n):
        started = time.perf_counter()
        results.append(await call())
        latencies.append(time.perf_counter() - started)
    return sorted(latencies), results


def _row(name: str, latencies: list[float], note: str = "") -> str:
    p50, p95, worst = (percentile(latencies, 50), percentile(latencies, 95), latencies[-1])
    return (
        f"  {name:<34} n={len(latencies):<4} p50 {p50 * 1000:8.2f} ms  "
        f"p95 {p95 * 1000:8.2f} ms  max {worst * 1000:8.2f} ms  {note}"
    )


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def _lock(database: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(3600)",
         str(database)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


async def outage(root: Path, n: int) -> None:
    gateway = Gateway(
        root / "outage",
        _env(KZG_GATEWAY_AUDIT__BREAKER_RECOVERY_TIMEOUT_SECONDS="600"),
    )
    gateway.cli("init", "--json")
    client, monitor = gateway.api_key("client"), gateway.api_key("monitor")
    await gateway.start()
    bearer = {"Authorization": f"Bearer {monitor}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def get(path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
                async with session.get(
                    gateway.url + path, headers=headers or {}, ssl=gateway.ssl
                ) as response:
                    return response.status, await response.text()

            async def verify() -> int:
                async with session.post(
                    f"{gateway.url}/v1/kzg/verify-proof", json=VERIFY,
                    headers={"X-API-Key": client}, ssl=gateway.ssl,
                ) as response:  # fmt: skip
                    await response.read()
                    return response.status

            probes: dict[str, Callable[[], Awaitable[Any]]] = {
                "/healthz": lambda: get("/healthz"),
                "/readyz": lambda: get("/readyz"),
                "/metrics (bearer monitor key)": lambda: get("/metrics", bearer),
            }
            print("healthy:")
            for name, call in probes.items():
                latencies, _ = await _timed(call, n)
                print(_row(name, latencies))
            latencies, statuses = await _timed(verify, n)
            print(_row("POST /v1/kzg/verify-proof", latencies, f"statuses {set(statuses)}"))

            holder = _lock((gateway.data_dir / DEFAULT_DATABASE_FILE).resolve())
            try:
                print("outage (another process holds the SQLite write lock):")
                threshold = 5  # [audit] breaker_failure_threshold, the default
                latencies, statuses = await _timed(verify, threshold)
                print(
                    _row(
                        "verify-proof before the breaker opens",
                        latencies,
                        f"statuses {set(statuses)}",
                    )
                )
                metrics = (await get("/metrics", bearer))[1]
                state = _metric(metrics, "kzg_audit_breaker_state")
                calls = _metric(metrics, ENGINE_CALLS)
                latencies, statuses = await _timed(verify, n)
                metrics = (await get("/metrics", bearer))[1]
                print(
                    _row(
                        "verify-proof, breaker open",
                        latencies,
                        f"statuses {set(statuses)}, breaker state {state:.0f}, engine calls "
                        f"{calls:.0f} -> {_metric(metrics, ENGINE_CALLS):.0f}",
                    )
                )
                for name, call in probes.items():
                    latencies, results = await _timed(call, n)
                    statuses = {status for status, _ in results}
                    print(_row(name, latencies, f"statuses {statuses}"))
            finally:
                holder.kill()
                holder.wait()
    finally:
        gateway.stop()


def _sqlite_bytes(data_dir: Path) -> int:
    database = data_dir / DEFAULT_DATABASE_FILE
    with sqlite3.connect(database) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return database.stat().st_size


async def _postgresql_bytes(owner_url: str) -> int:
    """The audit tables with their indexes and TOAST, as the owner sees them."""
    from sqlalchemy import text

    from gateway.db import make_engine

    engine = make_engine(owner_url)
    try:
        async with engine.connect() as conn:
            size = await conn.scalar(
                text(
                    "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                    "WHERE c.relkind = 'r' AND c.relname IN "
                    "('audit_events', 'audit_tree', 'audit_tree_heads', 'audit_log_head')"
                )
            )
    finally:
        await engine.dispose()
    return int(size)


async def volume(root: Path, n: int, pg: PgDatabase | None = None) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import select

    from audit.export import export_lines
    from audit.models import audit_events, entry_from_row
    from gateway.db import make_engine

    database = {}
    if pg is not None:
        database = {
            "KZG_GATEWAY_DATABASE_URL": pg.app_url,
            "KZG_GATEWAY_DATABASE_OWNER_URL": pg.owner_url,
            "KZG_GATEWAY_DATABASE_APP_ROLE": pg.app.user,
        }
    name = "postgresql" if pg is not None else "sqlite"
    gateway = Gateway(
        root / f"volume-{name}", _env(KZG_GATEWAY_AUDIT__RECORD_PROBES="true", **database)
    )
    gateway.cli("init", "--json")
    monitor = gateway.api_key("monitor")

    async def stored_bytes() -> int:
        if pg is None:
            return _sqlite_bytes(gateway.data_dir)
        return await _postgresql_bytes(pg.owner_url)

    before = await stored_bytes()
    await gateway.start()
    probes = ("/healthz", "/readyz", "/metrics")
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {monitor}"}
            # One at a time, as kubelet and Prometheus send them: each its own commit.
            for i in range(n):
                path = probes[i % 3]
                async with session.get(gateway.url + path, headers=headers, ssl=gateway.ssl) as r:
                    assert r.status == 200, (path, r.status)
    finally:
        gateway.stop()
    after = await stored_bytes()
    engine = make_engine(
        pg.app_url
        if pg is not None
        else f"sqlite+aiosqlite:///{gateway.data_dir / DEFAULT_DATABASE_FILE}"
    )
    try:
        async with engine.connect() as conn:
            rows = (
                (await conn.execute(select(audit_events).where(audit_events.c.path.in_(probes))))
                .mappings()
                .all()
            )
        total = 0
        async for line in export_lines(engine, datetime.now(UTC)):
            total += len(line.encode())
        async with engine.connect() as conn:
            everything = len((await conn.execute(select(audit_events.c.seq))).all())
    finally:
        await engine.dispose()
    records = len(rows)
    assert records >= n, (records, n)  # and the readiness polls of the start
    per_entry = sum(len(entry_from_row(row).encode()) for row in rows) / records
    # The export also carries the hashes and checkpoints: its size per record, all records.
    per_export = total / everything
    per_database = (after - before) / records
    liveness, readiness, scrape = _periods()
    per_day = 86400 / liveness + 86400 / readiness + 86400 / scrape
    print(f"{name}: probe records written one at a time: {records}")
    print(f"  canonical entry (leaf)   {per_entry:8.0f} bytes per record")
    print(f"  export                   {per_export:8.0f} bytes per record")
    print(f"  database growth          {per_database:8.0f} bytes per record (with its tree hashes")
    print("                                    and the signed tree head of its commit)")
    print(
        f"periods: liveness {liveness:g} s, readiness {readiness:g} s, scrape {scrape:g} s "
        f"-> {per_day:,.0f} records per pod per day"
    )
    for kind, size in (("entries", per_entry), ("export", per_export), ("database", per_database)):
        day = per_day * size
        print(
            f"  saved per pod per day ({kind:<8}) {day / 2**20:7.1f} MiB; "
            f"over a 7-year retention {day * 365.25 * 7 / 2**30:6.1f} GiB"
        )


def _periods() -> tuple[float, float, float]:
    with (REPO / "deploy" / "kubernetes" / "gateway.yaml").open() as handle:
        deployment = next(d for d in yaml.safe_load_all(handle) if d["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    with (REPO / "deploy" / "prometheus" / "scrape.yaml").open() as handle:
        (job,) = yaml.safe_load(handle)["scrape_configs"]
    interval = float(str(job["scrape_interval"]).rstrip("s"))
    return (
        float(container["livenessProbe"]["periodSeconds"]),
        float(container["readinessProbe"]["periodSeconds"]),
        interval,
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per figure")
    parser.add_argument("--data-dir", type=Path, help="where the gateways live (a temp dir)")
    parser.add_argument(
        "--postgresql",
        action="store_true",
        help="also measure the probe records on the PostgreSQL of KZG_TEST_PG_*",
    )
    args = parser.parse_args()
    for line in machine_facts():
        print(line)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp)
        await outage(root, args.requests)
        await volume(root, 3 * args.requests)
        if args.postgresql:
            server = PgServer()
            name = f"bench_probes_{os.getpid()}"
            database = await server.create(name)
            try:
                await volume(root, 3 * args.requests, database)
            finally:
                await server.drop(name)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
