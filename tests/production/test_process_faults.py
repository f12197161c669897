"""Process-level faults of one real gateway: the embedded SQLite's disk filling up (fail
closed with 503, recover without a restart), SIGKILL under load (after a restart every
acknowledged receipt verifies and the new checkpoint extends its tree) and SIGTERM
during a rolling restart (/readyz turns 503, in-flight requests finish, the listener
closes, exit 0)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import os
import resource
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy import func, select

from audit.models import audit_tree_heads
from auth.crypto import MasterKey
from gateway.db import DEFAULT_DATABASE_FILE, make_engine
from tests.conftest import PgDatabase, free_port
from tests.gateway.helpers import IDENTITY_PROOF, check_receipt, input_digests, make_blob
from tests.production.test_instances import (
    CHEAP_ARGON2,
    Instance,
    _call,
    _verify_chain,
    _verify_proof,
    assert_consistent,
    check_acknowledged,
    log_vkeys,
    recorded_request_ids,
)

MiB = 1024 * 1024
DISK_BYTES = 64 * MiB
DRAIN_SECONDS = 2.0
SHUTDOWN_TIMEOUT_SECONDS = 30.0  # a bound for a loaded machine; ~3 s used here


def _gateway_env(**config: str) -> dict[str, str]:
    """The test's environment without any KZG_GATEWAY_* setting of the caller's shell, so
    the SQLite test really runs on the embedded default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KZG_GATEWAY_")}
    return {
        **env,
        "KZG_GATEWAY_MASTER_KEY": MasterKey.generate().hex(),
        "KZG_GATEWAY_ENGINE__NAME": "ckzg",
        "KZG_GATEWAY_POOL__WORKERS": "1",
        "KZG_GATEWAY_AUTH__PASSWORDS": CHEAP_ARGON2,
        "KZG_GATEWAY_AUDIT__COMMIT_TIMEOUT_SECONDS": "2",
        **config,
    }


def _mount_tmpfs(where: Path, size: int) -> bool:
    """Mount a tmpfs of ``size`` bytes on ``where``; False where that is not allowed."""
    where.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError as exc:  # no mount binary
        print(f"cannot mount a tmpfs ({exc}); limiting the file size instead")
        return False
    if result.returncode != 0:
        print(f"cannot mount a tmpfs ({result.stderr.strip()}); limiting the file size instead")
        return False
    return True


def _unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "--lazy", str(where)], capture_output=True, check=False)


class _Disk:
    """The data dir's disk: ``fill`` makes writes that need new space fail, ``free``
    undoes it. On the tmpfs a filler file takes every free block (ENOSPC); without a
    mount the running gateway's file-size limit is lowered to the size of its WAL
    file, so appending to it fails (EFBIG) as it would on a full disk."""

    def __init__(self, root: Path, mounted: bool) -> None:
        self.root = root
        self.mounted = mounted
        self.filler = root / "filler"

    def fill(self, gateway: Instance) -> None:
        if not self.mounted:
            assert gateway.process is not None
            wal = gateway.data_dir / f"{DEFAULT_DATABASE_FILE}-wal"
            size = wal.stat().st_size if wal.exists() else 0
            _, hard = resource.prlimit(gateway.process.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(gateway.process.pid, resource.RLIMIT_FSIZE, (size, hard))
            return
        chunk = b"\xff" * MiB
        with self.filler.open("wb", buffering=0) as handle:
            while True:
                try:
                    handle.write(chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
        # A short last write may hide a few free blocks: a 1-byte write proves none are left.
        with pytest.raises(OSError) as full, (self.root / "probe").open("wb", buffering=0) as probe:
            probe.write(b"x")
        assert full.value.errno == errno.ENOSPC

    def free(self, gateway: Instance) -> None:
        if not self.mounted:
            assert gateway.process is not None
            _, hard = resource.prlimit(gateway.process.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(gateway.process.pid, resource.RLIMIT_FSIZE, (DISK_BYTES, hard))
            return
        self.filler.unlink()
        (self.root / "probe").unlink(missing_ok=True)


def _disk_usage(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def test_disk_full_fails_closed_and_recovers(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    mounted = _mount_tmpfs(root, DISK_BYTES)
    disk = _Disk(root, mounted)
    gateway = Instance(
        "disk",
        root / "data",
        free_port(),
        _gateway_env(),
        log_file=tmp_path / "serve.log",
        fsize_limit=None if mounted else DISK_BYTES,
    )
    # A full disk must mean a quick 503, not a request stuck on the store.
    timeout = aiohttp.ClientTimeout(total=15)
    answered: list[str] = []
    try:
        gateway.cli("init", "--json")
        # init leaves well under a megabyte: the rest of the disk is room for the WAL.
        assert _disk_usage(gateway.data_dir) < DISK_BYTES // 16
        gateway.start()
        await gateway.wait_ready()
        assert gateway.process is not None
        key = gateway.cli("admin", "api-keys", "create", "--name", "disk", "--role", "client")
        async with aiohttp.ClientSession(timeout=timeout) as session:
            status, request_id = await _call(gateway, key["api_key"], session)
            assert status == 200, gateway.log()
            answered.append(request_id)

            disk.fill(gateway)
            try:
                sequential = [(await _call(gateway, key["api_key"], session))[0] for _ in range(4)]
                concurrent = await asyncio.gather(
                    *(_call(gateway, key["api_key"], session) for _ in range(4))
                )
                statuses = sequential + [s for s, _ in concurrent]
                # Fail closed: no answer without its audit record, and no 500 either.
                assert set(statuses) == {503}, (statuses, gateway.log())
                assert gateway.process.poll() is None, gateway.log()
            finally:
                disk.free(gateway)

            deadline = time.monotonic() + 15
            while True:
                status, request_id = await _call(gateway, key["api_key"], session)
                if status == 200:
                    answered.append(request_id)
                    break
                assert status == 503, status
                assert time.monotonic() < deadline, f"service did not resume: {gateway.log()}"
                await asyncio.sleep(0.3)
            for status, request_id in await asyncio.gather(
                *(_call(gateway, key["api_key"], session) for _ in range(4))
            ):
                assert status == 200, gateway.log()
                answered.append(request_id)
        # Recovered in place: the same process served before, during and after.
        assert gateway.process.poll() is None, gateway.log()
        gateway.stop()
        assert gateway.process.returncode == 0, gateway.log()

        database = (gateway.data_dir / DEFAULT_DATABASE_FILE).resolve()
        _verify_chain(gateway, f"sqlite:///{database}")
        recorded = await recorded_request_ids(f"sqlite+aiosqlite:///{database}")
        assert set(answered) <= recorded, "an answered request has no audit record"
    finally:
        gateway.stop(signal.SIGKILL)
        if mounted:
            _unmount(root)


async def _stored_tree_size(db_url: str) -> int:
    """The size of the newest signed tree head stored in the database."""
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(select(func.max(audit_tree_heads.c.size)))).scalar())
    finally:
        await engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
async def test_sigkill_under_load_then_restart_proves_every_acknowledged_receipt(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given one gateway (the embedded SQLite, or PostgreSQL) answering a steady load.
    config: dict[str, str] = {}
    data_dir = tmp_path / "kill"
    db_url = f"sqlite+aiosqlite:///{(data_dir / DEFAULT_DATABASE_FILE).resolve()}"
    if kind == "postgresql":
        database: PgDatabase = request.getfixturevalue("pg_database")
        db_url = database.owner_url
        config = {
            "KZG_GATEWAY_DATABASE_URL": database.app_url,
            "KZG_GATEWAY_DATABASE_OWNER_URL": database.owner_url,
            "KZG_GATEWAY_DATABASE_APP_ROLE": database.app_role,
        }
    gateway = Instance("kill", data_dir, free_port(), _gateway_env(**config))
    try:
        gateway.cli("init", "--json")
        gateway.start()
        await gateway.wait_ready()
        key = gateway.cli("admin", "api-keys", "create", "--name", "kill", "--role", "client")
        api_key = key["api_key"]
        acknowledged: list[tuple[str, Any]] = []

        async def client(session: aiohttp.ClientSession) -> None:
            while True:
                try:
                    status, request_id, answer = await _verify_proof(gateway, api_key, session)
                except aiohttp.ClientError:
                    return  # the process is gone
                if status == 200:
                    acknowledged.append((request_id, answer))

        async with aiohttp.ClientSession() as session:
            vkeys = await log_vkeys(gateway, session)
            load = [asyncio.create_task(client(session)) for _ in range(6)]
            deadline = time.monotonic() + 30
            while len(acknowledged) < 50:
                assert time.monotonic() < deadline, f"no load got through: {gateway.log()}"
                await asyncio.sleep(0.05)
            # When the process is killed in the middle of it, group commits in flight,
            gateway.stop(signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*load), timeout=60)
            stored = await _stored_tree_size(db_url)
            recorded = await recorded_request_ids(db_url)
            assert {rid for rid, _ in acknowledged} <= recorded, "an answer has no record"

            # and it is started again on the same database,
            gateway.start()
            await gateway.wait_ready()
            assert await log_vkeys(gateway, session) == vkeys
            # then every answer that left before the kill carries a receipt that verifies,
            # and the checkpoint the restarted process serves extends each receipt's tree.
            latest = await check_acknowledged(
                gateway, api_key, session, acknowledged, input_digests(IDENTITY_PROOF)
            )
            assert latest[0] > stored, "the restarted log lost signed entries"
            # The log goes on from there: a new answer's tree extends that checkpoint too.
            status, request_id, answer = await _verify_proof(gateway, api_key, session)
            assert status == 200, answer
            after = check_receipt(answer, request_id, vkeys, input_digests(IDENTITY_PROOF))
            await assert_consistent(
                gateway, api_key, session, latest, (after["size"], after["root"])
            )
        _verify_chain(gateway, db_url.replace("+aiosqlite", ""))
    finally:
        gateway.stop(signal.SIGKILL)


@pytest.fixture
def draining_gateway(tmp_path: Path, pg_database: PgDatabase) -> Iterator[Instance]:
    env = _gateway_env(
        KZG_GATEWAY_DATABASE_URL=pg_database.app_url,
        KZG_GATEWAY_DATABASE_OWNER_URL=pg_database.owner_url,
        KZG_GATEWAY_DATABASE_APP_ROLE=pg_database.app_role,
        KZG_GATEWAY_SERVER__DRAIN_SECONDS=str(DRAIN_SECONDS),
        KZG_GATEWAY_SERVER__SHUTDOWN_TIMEOUT_SECONDS=str(SHUTDOWN_TIMEOUT_SECONDS),
        # Room to queue the heavy requests behind the one worker instead of shedding them,
        # and for the one key sending them all to hold that many calls in flight.
        KZG_GATEWAY_POOL__MAX_QUEUE="64",
        KZG_GATEWAY_AUTH__ENGINE_SHARE__CLIENT__MAX_IN_FLIGHT="64",
    )
    gateway = Instance("drain", tmp_path / "drain", free_port(), env)
    gateway.cli("init", "--json")
    yield gateway
    gateway.stop(signal.SIGKILL)


@dataclass(frozen=True)
class _Answer:
    sent: float
    done: float
    status: int
    request_id: str


async def _timed(call: Callable[[], Awaitable[tuple[int, str]]]) -> _Answer:
    sent = time.monotonic()
    status, request_id = await call()
    return _Answer(sent, time.monotonic(), status, request_id)


async def _compute_cells(
    gateway: Instance, key: str, blob: bytes, session: aiohttp.ClientSession
) -> tuple[int, str]:
    """The heaviest single-blob call (about 0.3 s of the worker on this machine)."""
    async with session.post(
        f"{gateway.url}/v1/kzg/compute-cells-and-proofs",
        data=blob,
        headers={"X-API-Key": key, "Content-Type": "application/octet-stream"},
        ssl=gateway.ssl(),
    ) as response:
        await response.read()
        return response.status, response.headers.get("X-Request-ID", "")


async def _refused_at(gateway: Instance, deadline: float) -> float:
    """Poll with plain TCP connects until the listener refuses one; return when."""
    while True:
        assert time.monotonic() < deadline, "the listener did not close"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        except ConnectionRefusedError:
            return time.monotonic()
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        await asyncio.sleep(0.05)


async def test_sigterm_drains_for_a_rolling_restart(
    draining_gateway: Instance, pg_database: PgDatabase
) -> None:
    gateway = draining_gateway
    gateway.start()
    await gateway.wait_ready()
    process = gateway.process
    assert process is not None
    key = gateway.cli("admin", "api-keys", "create", "--name", "drain", "--role", "client")
    api_key = key["api_key"]
    blob = make_blob(7)
    load: list[_Answer] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                load.append(await _timed(lambda: _call(gateway, api_key, session)))
            except aiohttp.ClientError:
                # Refused once the listener is closed: expected, and never an answer.
                await asyncio.sleep(0.05)

    # A new connection per request, as clients behind a load balancer would open, so
    # that the closed listener shows as refused connections, not as reused keep-alives.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        # Enough heavy calls to keep the one worker busy about 3 s from a second before the
        # listener closes, timed here on an idle gateway.
        one = await _timed(lambda: _compute_cells(gateway, api_key, blob, session))
        assert one.status == 200, gateway.log()
        heavy_count = min(48, max(4, math.ceil(4.0 / (one.done - one.sent))))
        clients = [asyncio.create_task(client(session)) for _ in range(3)]
        heavy: list[asyncio.Task[_Answer]] = []
        try:
            deadline = time.monotonic() + 30
            while sum(a.status == 200 for a in load) < 10:
                assert time.monotonic() < deadline, f"no load got through: {gateway.log()}"
                await asyncio.sleep(0.05)

            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            while True:
                try:
                    async with session.get(f"{gateway.url}/readyz", ssl=gateway.ssl()) as reply:
                        if reply.status == 503:
                            unready = time.monotonic()
                            assert not (await reply.json())["checks"]["accepting"]
                            break
                        assert reply.status == 200
                except aiohttp.ClientError as exc:
                    raise AssertionError(f"gone before /readyz said 503: {exc!r}") from exc
                assert time.monotonic() - signalled < 1.0, "/readyz still 200 after SIGTERM"
                await asyncio.sleep(0.02)
            assert unready - signalled < 1.0  # measured 0.04-0.09 s: one TLS round trip
            assert process.poll() is None, "exited instead of draining"

            # Sent inside the drain window, queued behind the one worker: they are still
            # being computed when the listener closes, so they must finish regardless.
            await asyncio.sleep(max(0.0, signalled + DRAIN_SECONDS - 1.0 - time.monotonic()))
            heavy += [
                asyncio.create_task(_timed(lambda: _compute_cells(gateway, api_key, blob, session)))
                for _ in range(heavy_count)
            ]
            refused = await _refused_at(gateway, signalled + DRAIN_SECONDS + 10)
            assert process.poll() is None, "exited with requests in flight"
            heavy_answers = await asyncio.gather(*heavy)
            stop.set()
            await asyncio.gather(*clients)
        finally:
            stop.set()
            for task in [*clients, *heavy]:
                task.cancel()

    exit_code = await asyncio.to_thread(
        process.wait, timeout=DRAIN_SECONDS + SHUTDOWN_TIMEOUT_SECONDS + 10
    )
    exited = time.monotonic()
    assert exit_code == 0, gateway.log()
    # The listener stayed open for the whole drain, then closed while work was in flight.
    assert refused - signalled >= DRAIN_SECONDS - 0.05, refused - signalled
    assert [a.status for a in heavy_answers] == [200] * len(heavy_answers), gateway.log()
    assert max(a.done for a in heavy_answers) > refused, "nothing was in flight at the close"
    # Connections accepted during the drain were served normally; none was half-answered.
    assert {a.status for a in load} == {200}, sorted({a.status for a in load})
    assert any(a.sent > unready and a.status == 200 for a in load), "drain served nothing"
    assert exited - signalled < DRAIN_SECONDS + SHUTDOWN_TIMEOUT_SECONDS, exited - signalled

    answered = {a.request_id for a in [one, *load, *heavy_answers] if a.status == 200}
    recorded = await recorded_request_ids(pg_database.owner_url)
    assert answered <= recorded, "an answered request has no audit record"
    _verify_chain(gateway, pg_database.owner_url)
