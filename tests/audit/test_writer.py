"""The group-commit writer on SQLite and PostgreSQL: one gapless chain, append-only
storage, fail-closed when the store is gone, and recovery without a restart."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import GENESIS_HASH, chain_hash, record_for
from audit.errors import AuditUnavailable
from audit.events import AuditEvent
from audit.metrics import AuditMetrics
from audit.models import audit_events, fields_from_row
from audit.verify import verify_database
from audit.writer import AuditWriter
from tests.audit.conftest import AuditStore, make_engine
from tests.audit.helpers import make_event, sqlite_write_lock
from tests.audit.proxy import CuttableProxy

REPO = Path(__file__).resolve().parents[2]


async def test_concurrent_appends_build_one_gapless_verifiable_chain(
    writer: AuditWriter, app_engine: AsyncEngine
) -> None:
    results = await asyncio.gather(*(writer.append(make_event(n)) for n in range(120)))

    assert sorted(r.seq for r in results) == list(range(1, 121))
    report = await verify_database(app_engine, public_keys={})
    assert report.valid, report.reason
    assert report.checked == 120
    assert report.head_seq == 120
    assert report.head_hash == max(results, key=lambda r: r.seq).hash


async def test_stored_record_hashes_as_the_chain_formula_says(
    writer: AuditWriter, app_engine: AsyncEngine
) -> None:
    first = await writer.append(make_event(1))
    second = await writer.append(make_event(2))

    async with app_engine.connect() as conn:
        rows = (await conn.execute(select(audit_events).order_by(audit_events.c.seq))).mappings()
        rows = list(rows)
    expected_first = chain_hash(GENESIS_HASH, record_for(1, make_event(1).fields()))
    assert first.hash == rows[0]["hash"] == expected_first
    assert rows[1]["prev_hash"] == first.hash
    assert second.hash == chain_hash(first.hash, record_for(2, fields_from_row(rows[1])))
    assert fields_from_row(rows[1]) == make_event(2).fields()


async def test_waiting_records_share_one_transaction(app_engine: AsyncEngine) -> None:
    registry = CollectorRegistry()
    writer = AuditWriter(app_engine, metrics=AuditMetrics.create(registry))
    await writer.start()
    try:
        await asyncio.gather(*(writer.append(make_event(n)) for n in range(200)))
    finally:
        await writer.stop()

    batches = registry.get_sample_value("kzg_audit_batch_size_count")
    records = registry.get_sample_value("kzg_audit_batch_size_sum")
    assert records == 200
    assert batches is not None and batches < 50
    assert registry.get_sample_value("kzg_audit_head_seq") == 200
    assert registry.get_sample_value("kzg_audit_queue_depth") == 0


async def test_stop_commits_what_is_waiting_and_refuses_after(app_engine: AsyncEngine) -> None:
    writer = AuditWriter(app_engine)
    await writer.start()
    pending = [asyncio.ensure_future(writer.append(make_event(n))) for n in range(10)]
    await asyncio.sleep(0)
    await writer.stop()

    assert sorted(r.seq for r in await asyncio.gather(*pending)) == list(range(1, 11))
    with pytest.raises(AuditUnavailable):
        await writer.append(make_event(11))
    assert not await writer.ready()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET actor = 'someone-else' WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 1",
        "DELETE FROM audit_events",
        "UPDATE audit_chain_head SET seq = 0, hash = '{genesis}'",
        "DELETE FROM audit_chain_head",
    ],
)
async def test_gateway_connection_cannot_rewrite_history(
    writer: AuditWriter, app_engine: AsyncEngine, statement: str
) -> None:
    await writer.append(make_event(1))
    await writer.append(make_event(2))

    with pytest.raises(DBAPIError):
        async with app_engine.begin() as conn:
            await conn.execute(text(statement.format(genesis=GENESIS_HASH)))

    report = await verify_database(app_engine, public_keys={})
    assert report.valid and report.checked == 2


async def test_even_the_owner_is_refused_by_the_triggers(
    audit_store: AuditStore, writer: AuditWriter
) -> None:
    await writer.append(make_event(1))
    owner = make_engine(audit_store.owner_url)
    try:
        for statement in (
            "UPDATE audit_events SET outcome = 'denied'",
            "DELETE FROM audit_events",
        ):
            with pytest.raises(DBAPIError, match=r"append-only|refused"):
                async with owner.begin() as conn:
                    await conn.execute(text(statement))
    finally:
        await owner.dispose()


async def test_postgres_runtime_role_appends_and_reads_only(pg_store: AuditStore) -> None:
    engine = make_engine(pg_store.app_url)
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
                "WHERE grantee = current_user AND table_name LIKE 'audit%'"
            )
        )
        grants = {(r.table_name, r.privilege_type) for r in rows}
    await engine.dispose()
    for table in ("audit_events", "audit_checkpoints"):
        assert {p for t, p in grants if t == table} == {"INSERT", "SELECT"}
    # Anchors are written only by audit_prune (SECURITY DEFINER), under its checks.
    for table in ("audit_anchors", "audit_retention"):
        assert {p for t, p in grants if t == table} == {"SELECT"}
    assert {p for t, p in grants if t == "audit_chain_head"} == {"SELECT", "UPDATE"}


# Long enough (~0.5 s on SQLite) that two writers started together surely overlap.
PER_PROCESS = 1000


async def write_many(url: str, count: int, tag: str) -> None:
    """Run in a separate OS process: once told to go on stdin, append ``count`` events
    through its own writer."""
    engine = make_engine(url)
    writer = AuditWriter(engine, commit_timeout=30)
    await writer.start()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    try:
        for start in range(0, count, 20):
            await asyncio.gather(
                *(
                    writer.append(make_event(n, request_id=f"{tag}-{n}"))
                    for n in range(start, min(start + 20, count))
                )
            )
    finally:
        await writer.stop()
        await engine.dispose()


async def test_two_processes_share_one_gapless_chain(
    audit_store: AuditStore, app_engine: AsyncEngine
) -> None:
    code = "import asyncio, sys; from tests.audit.test_writer import write_many; " + (
        "asyncio.run(write_many(sys.argv[1], int(sys.argv[2]), sys.argv[3]))"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            audit_store.app_url,
            str(PER_PROCESS),
            tag,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for tag in ("proc-a", "proc-b")
    ]
    # Both start together, once both are connected and their writers running.
    for p in procs:
        assert p.stdout is not None and await p.stdout.readline() == b"ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"go\n")
        await p.stdin.drain()
    assert [await p.wait() for p in procs] == [0, 0]

    report = await verify_database(app_engine, public_keys={})
    assert report.valid, report.reason
    assert report.checked == report.head_seq == 2 * PER_PROCESS
    async with app_engine.connect() as conn:
        ids = [
            r[0]
            for r in await conn.execute(
                select(audit_events.c.request_id).order_by(audit_events.c.seq)
            )
        ]
    assert sorted(ids) == sorted(
        f"{t}-{n}" for t in ("proc-a", "proc-b") for n in range(PER_PROCESS)
    )
    # Both processes really interleaved rather than running one after the other.
    owners = [i.split("-")[1] for i in ids]
    assert sum(1 for a, b in itertools.pairwise(owners) if a != b) > 1


def _via_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


async def _append_until_ok(writer: AuditWriter, deadline: float) -> int:
    while True:
        try:
            return (await writer.append(make_event(99))).seq
        except AuditUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_postgres_unreachable_fails_closed_then_recovers(pg_store: AuditStore) -> None:
    pg_port = int(os.environ["KZG_TEST_PG_PORT"])
    proxy = CuttableProxy(os.environ["KZG_TEST_PG_HOST"], pg_port)
    await proxy.start()
    engine = make_engine(_via_port(pg_store.app_url, proxy.port))
    writer = AuditWriter(engine, commit_timeout=2.0)
    await writer.start()
    try:
        assert (await writer.append(make_event(1))).seq == 1
        assert await writer.ready()

        await proxy.cut()
        with pytest.raises(AuditUnavailable):
            await writer.append(make_event(2))
        assert not await writer.ready()

        await proxy.start()
        seq = await _append_until_ok(writer, time.monotonic() + 10)
        assert seq == 2
        assert await writer.ready()
        report = await verify_database(engine, public_keys={})
        assert report.valid and report.head_seq == 2
    finally:
        await writer.stop()
        await engine.dispose()
        await proxy.cut()


async def test_sqlite_locked_out_fails_closed_then_recovers(sqlite_store: AuditStore) -> None:
    engine = make_engine(sqlite_store.app_url, busy_timeout=0.5)
    writer = AuditWriter(engine, commit_timeout=1.0)
    await writer.start()
    try:
        with sqlite_write_lock(sqlite_store.app_url) as release:
            with pytest.raises(AuditUnavailable):
                await writer.append(make_event(1))
            release()
            seq = await _append_until_ok(writer, time.monotonic() + 10)
        assert seq == 1
        report = await verify_database(engine, public_keys={})
        assert report.valid and report.head_seq == 1
    finally:
        await writer.stop()
        await engine.dispose()


async def acknowledge_forever(url: str) -> None:
    """Run in a separate OS process: append without end, printing each acknowledged
    request id only after its append returned (as the gateway answers only then)."""
    engine = make_engine(url)
    writer = AuditWriter(engine, commit_timeout=30)
    await writer.start()

    async def client(worker: int) -> None:
        n = 0
        while True:
            request_id = f"w{worker}-{n}"
            await writer.append(make_event(n, request_id=request_id))
            print(request_id, flush=True)
            n += 1

    await asyncio.gather(*(client(w) for w in range(16)))


async def test_sigkill_under_load_loses_no_acknowledged_record(
    audit_store: AuditStore, app_engine: AsyncEngine
) -> None:
    code = "import asyncio, sys; from tests.audit.test_writer import acknowledge_forever; " + (
        "asyncio.run(acknowledge_forever(sys.argv[1]))"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, audit_store.app_url, cwd=REPO, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    acknowledged: list[str] = []
    while len(acknowledged) < 300:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        assert line, "the writer process ended early"
        acknowledged.append(line.decode().strip())
    proc.kill()  # SIGKILL: no flush, no clean shutdown
    rest, _ = await proc.communicate()
    acknowledged.extend(rest.decode().split())

    async with app_engine.connect() as conn:
        stored = {r[0] for r in await conn.execute(select(audit_events.c.request_id))}
    assert set(acknowledged) <= stored
    report = await verify_database(app_engine, public_keys={})
    assert report.valid and report.checked == len(stored)


async def test_client_bytes_the_database_refuses_are_stored_escaped(
    writer: AuditWriter, app_engine: AsyncEngine
) -> None:
    # A URL path may decode to NUL (PostgreSQL text refuses it) and a value may hold a
    # lone surrogate (not UTF-8): both are escaped before hashing, so the record is
    # committed and hashes the same when read back.
    event = make_event(1, path="/a\x00b", detail={"subject": "x\udcff"})
    result = await writer.append(event)
    async with app_engine.connect() as conn:
        row = (await conn.execute(select(audit_events))).mappings().one()
    fields = fields_from_row(row)
    assert fields["path"] == "/a\\x00b" and fields["detail"]["subject"] == "x\\udcff"
    assert result.hash == chain_hash(GENESIS_HASH, record_for(1, fields))
    report = await verify_database(app_engine, public_keys={})
    assert report.valid and report.checked == 1, report.reason


class _Unescaped(AuditEvent):
    """An event whose path skips the escaping, as a new field someone forgot might."""

    def fields(self) -> dict[str, Any]:
        return {**super().fields(), "path": "/\x00"}


async def test_a_refused_record_fails_alone_not_its_whole_batch(pg_store: AuditStore) -> None:
    engine = make_engine(pg_store.app_url)
    writer = AuditWriter(engine)
    await writer.start()
    try:
        bad = _Unescaped(**vars(make_event(99)))
        outcomes = await asyncio.gather(
            *(writer.append(make_event(n)) for n in range(10)),
            writer.append(bad),
            *(writer.append(make_event(n)) for n in range(10, 20)),
            return_exceptions=True,
        )
        assert isinstance(outcomes[10], AuditUnavailable), outcomes[10]
        good = [o for i, o in enumerate(outcomes) if i != 10]
        assert sorted(o.seq for o in good) == list(range(1, 21)), good
        report = await verify_database(engine, public_keys={})
        assert report.valid and report.checked == 20, report.reason
    finally:
        await writer.stop()
        await engine.dispose()
