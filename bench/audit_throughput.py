"""Audit appends per second with durable commits, for 1, 8 and 64 concurrent writers.

SQLite in WAL mode (synchronous FULL) in a temporary directory, and PostgreSQL with
synchronous_commit on in a temporary database on the loopback server described by the
KZG_TEST_PG_* variables (``source .pg-test-env``). Each writer awaits its own record's
commit before sending the next, as a request handler does.

    .venv/bin/python bench/audit_throughput.py [--seconds 2] [--writers 1,8,64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.events import AuditEvent
from audit.metrics import AuditMetrics
from audit.verify import verify_database
from audit.writer import AuditWriter
from gateway.db import make_engine, migrate

TARGETS = {"sqlite": 2000, "postgresql": 5000}
_POOL = 64


async def _migrate(url: str, app_role: str | None) -> None:
    await migrate(url, app_role, target="audit@head")


def _event(worker: int, n: int) -> AuditEvent:
    return AuditEvent(
        request_id=f"bench-{worker}-{n}",
        occurred_at=datetime.now(UTC),
        actor=f"apikey:{worker}",
        role="client",
        action="verify_kzg_proof",
        outcome="success",
        http_status=200,
        client_addr="127.0.0.1",
        tls_version="TLSv1.3",
        method="POST",
        path="/v1/kzg/verify-proof",
        input_digests={"commitment": secrets.token_hex(32), "proof": secrets.token_hex(32)},
        result_digest=secrets.token_hex(32),
        latency_ms=0.8,
    )


@dataclass(frozen=True)
class RunResult:
    appends_per_s: float
    mean_batch: float
    verified_per_s: float

    def row(self, store: str, writers: int) -> str:
        return (
            f"{store:<11} {writers:>7} {self.appends_per_s:>10.0f} {self.mean_batch:>10.1f} "
            f"{self.verified_per_s:>11.0f}"
        )


async def _run(url: str, writers: int, seconds: float) -> RunResult:
    engine = make_engine(url)
    registry = CollectorRegistry()
    writer = AuditWriter(engine, commit_timeout=30, metrics=AuditMetrics.create(registry))
    await writer.start()
    # Events are built before the clock starts: the figure is the audit log's, not the
    # benchmark's cost of inventing requests.
    pool = [[_event(w, n) for n in range(_POOL)] for w in range(writers)]
    deadline = time.perf_counter() + seconds
    counts = [0] * writers

    async def client(worker: int) -> None:
        while time.perf_counter() < deadline:
            await writer.append(pool[worker][counts[worker] % _POOL])
            counts[worker] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(w) for w in range(writers)))
    elapsed = time.perf_counter() - started
    await writer.stop()
    verify_started = time.perf_counter()
    report = await verify_database(engine, public_keys={})
    verify_elapsed = time.perf_counter() - verify_started
    await engine.dispose()
    if not report.valid or report.head_seq != sum(counts):
        raise SystemExit(f"chain does not verify after the run: {report.reason}")
    batches = registry.get_sample_value("kzg_audit_batch_size_count") or 1
    return RunResult(
        sum(counts) / elapsed, report.head_seq / batches, report.checked / verify_elapsed
    )


async def _pg_database() -> tuple[str, str, AsyncEngine]:
    env = {k: os.environ.get(f"KZG_TEST_PG_{k}", "") for k in ("HOST", "PORT", "OWNER", "APP")}
    if not all(env.values()):
        raise LookupError("KZG_TEST_PG_* not set (source .pg-test-env)")
    if env["HOST"] not in ("127.0.0.1", "localhost", "::1"):
        raise LookupError("the benchmark only uses a loopback PostgreSQL")
    owner_pw = os.environ["KZG_TEST_PG_OWNER_PASSWORD"]
    app_pw = os.environ["KZG_TEST_PG_APP_PASSWORD"]
    base = f"postgresql+asyncpg://{{}}:{{}}@{env['HOST']}:{env['PORT']}/{{}}"
    admin = create_async_engine(
        base.format(env["OWNER"], owner_pw, "postgres"), isolation_level="AUTOCOMMIT"
    )
    name = f"kzg_bench_{secrets.token_hex(4)}"
    async with admin.connect() as conn:
        await conn.execute(text(f"CREATE DATABASE {name}"))
        await conn.execute(text(f'GRANT CONNECT ON DATABASE {name} TO "{env["APP"]}"'))
    owner_url = base.format(env["OWNER"], owner_pw, name)
    await _migrate(owner_url, env["APP"])
    return name, base.format(env["APP"], app_pw, name), admin


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--writers", default="1,8,64")
    parser.add_argument("--only", choices=("sqlite", "postgresql"))
    args = parser.parse_args()
    counts = [int(w) for w in args.writers.split(",")]
    print(f"{'store':<11} {'writers':>7} {'appends/s':>10} {'mean batch':>10} {'verified/s':>11}")
    results: dict[tuple[str, int], float] = {}

    if args.only in (None, "sqlite"):
        for writers in counts:
            with tempfile.TemporaryDirectory(prefix="kzg-audit-bench-") as tmp:
                url = f"sqlite+aiosqlite:///{tmp}/audit.db"
                await _migrate(url, None)
                result = await _run(url, writers, args.seconds)
            results["sqlite", writers] = result.appends_per_s
            print(result.row("sqlite", writers), flush=True)

    if args.only in (None, "postgresql"):
        for writers in counts:
            try:
                name, app_url, admin = await _pg_database()
            except LookupError as exc:
                print(f"postgresql skipped: {exc}")
                break
            try:
                probe = create_async_engine(app_url)
                async with probe.connect() as conn:
                    sync = (await conn.execute(text("SHOW synchronous_commit"))).scalar()
                await probe.dispose()
                if sync != "on":
                    raise SystemExit(f"synchronous_commit is {sync}; the benchmark needs on")
                result = await _run(app_url, writers, args.seconds)
            finally:
                async with admin.connect() as conn:
                    await conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                await admin.dispose()
            results["postgresql", writers] = result.appends_per_s
            print(result.row("postgresql", writers), flush=True)

    top = max(counts)
    for store, target in TARGETS.items():
        if (store, top) in results:
            rate = results[store, top]
            verdict = "meets" if rate >= target else "BELOW"
            print(f"{store} at {top} writers: {rate / target:.2f}x the target ({verdict})")


if __name__ == "__main__":
    asyncio.run(main())
