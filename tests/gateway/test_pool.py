"""Load shedding and worker crashes: the queue in front of the workers is bounded, a
saturated pool answers 503 + Retry-After at once, a dead worker fails only its call."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from auth.crypto import MASTER_KEY_ENV, MasterKey
from gateway.appkeys import KZG_POOL
from gateway.config import ConfigError
from gateway.identity import AUTH_SERVICE
from gateway.pool import (
    EnginePool,
    EngineShare,
    PoolSettings,
    ShareExceeded,
    WorkerCrashed,
    stop_engine_servers,
)
from tests.gateway.conftest import CHEAP_ARGON2, Gateway, StartGateway
from tests.gateway.helpers import hold_worker, hx, kill_worker, make_blob, reference_engine

Z = bytes(32)


@contextlib.asynccontextmanager
async def _running_pool(settings: PoolSettings) -> AsyncIterator[EnginePool]:
    pool = EnginePool(settings)
    await pool.start()
    try:
        yield pool
    finally:
        await pool.stop()


def _verify_body() -> dict[str, str]:
    eng = reference_engine()
    blob = make_blob(3)
    commitment = eng.blob_to_kzg_commitment(blob)
    proof, y = eng.compute_kzg_proof(blob, Z)
    return {"commitment": hx(commitment), "z": hx(Z), "y": hx(y), "proof": hx(proof)}


async def test_saturated_pool_sheds_with_503_and_retry_after(start_gateway: StartGateway) -> None:
    gw = await start_gateway(pool={"workers": 1, "max_queue": 1, "retry_after_seconds": 2})
    pool = gw.app[KZG_POOL]
    verify = _verify_body()  # computed before the worker is held, not inside its 1.5 s
    busy = asyncio.create_task(pool.call(hold_worker, 1.5))
    queued = asyncio.create_task(pool.call(hold_worker, 0.0))
    while pool.queue_depth < 1:
        await asyncio.sleep(0.01)

    response, body = await gw.post("/v1/kzg/verify-proof", verify)
    assert response.status == 503
    assert response.headers["Retry-After"] == "2"
    assert body["error"]["code"] == "overloaded" and "receipt" not in body
    [record] = await gw.audit_records(response.headers["X-Request-ID"])
    assert record["http_status"] == 503 and record["outcome"] == "unavailable"

    assert await busy == "ckzg" and await queued == "ckzg"
    response, body = await gw.post("/v1/kzg/verify-proof", _verify_body())
    assert response.status == 200 and body["valid"] is True


async def test_concurrent_load_beyond_the_queue_is_shed_not_queued(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(pool={"workers": 1, "max_queue": 2})
    body = {"blob": hx(make_blob(5))}
    results = await asyncio.gather(
        *(gw.post("/v1/kzg/compute-cells-and-proofs", body) for _ in range(12))
    )
    statuses = [r.status for r, _ in results]
    assert 200 in statuses and 503 in statuses
    assert set(statuses) == {200, 503}
    assert all(r.headers["Retry-After"] == "1" for r, _ in results if r.status == 503)


async def test_a_dead_worker_fails_only_its_call_and_is_replaced() -> None:
    async with _running_pool(PoolSettings(engine="ckzg", workers=2)) as pool:
        survivor = asyncio.create_task(pool.call(hold_worker, 0.5))
        await asyncio.sleep(0.05)
        with pytest.raises(WorkerCrashed):
            await pool.call(kill_worker)
        assert await survivor == "ckzg"
        for _ in range(200):
            if pool.ready:
                break
            await asyncio.sleep(0.01)
        assert pool.ready and pool.size == 2
        results = await asyncio.gather(*(pool.call(hold_worker, 0.01) for _ in range(4)))
        assert results == ["ckzg"] * 4


async def test_engine_errors_cross_the_process_boundary() -> None:
    from kzg import KZGError

    async with _running_pool(PoolSettings(engine="ckzg", workers=1)) as pool:
        with pytest.raises(KZGError):
            await pool.call("blob_to_kzg_commitment", b"\x00" * 10)


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable mapping of process ``pid`` holds ``needle`` (read from the
    outside through /proc, so the search puts nothing into that process)."""
    chunk = 64 << 20
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or fields[-1] in ("[vvar]", "[vsyscall]", "[vdso]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            for offset in range(start, end, chunk):
                try:
                    mem.seek(offset)
                    data = mem.read(min(chunk + len(needle), end - offset))
                except (OSError, ValueError, OverflowError):
                    break
                if needle in data:
                    return True
    return False


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def test_engine_workers_hold_no_secret_of_the_server(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers parse attacker-supplied blobs: neither they nor the process they are forked
    from may hold the master key, in memory or in the environment, nor the database URL."""
    key_text = MasterKey.generate().hex()
    database_secret = f"postgresql://kzg:{secrets.token_hex(16)}@db.internal/kzg"
    monkeypatch.setenv(MASTER_KEY_ENV, key_text)
    monkeypatch.setenv("KZG_GATEWAY_TEST_DATABASE_URL", database_secret)
    data_dir = tmp_path / "gw"
    data_dir.mkdir(mode=0o700)
    (data_dir / "master.key").write_text(key_text + "\n")
    (data_dir / "master.key").chmod(0o600)
    stop_engine_servers()  # the engine server starts now, with the secrets in the environment
    gw = await start_gateway()
    response, body = await gw.post("/v1/kzg/verify-proof", _verify_body())
    assert response.status == 200 and body["valid"] is True, body

    pool = gw.app[KZG_POOL]
    workers = [worker.pid for worker in pool._workers]
    assert len(workers) == 2
    engine_servers = {_parent_of(pid) for pid in workers} - {os.getpid()}
    assert len(engine_servers) == 1  # forked from the engine server, not from the server
    secrets_held = [bytes.fromhex(key_text), key_text.encode(), database_secret.encode()]
    assert _memory_holds(os.getpid(), bytes.fromhex(key_text))  # the search finds it here
    for pid in [*workers, *engine_servers]:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert MASTER_KEY_ENV.encode() not in environ and b"DATABASE_URL" not in environ
        for secret in secrets_held:
            assert not _memory_holds(pid, secret), f"process {pid} holds a secret"


async def test_an_unknown_start_method_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="start_method"):
        PoolSettings(start_method="thread")


async def test_spawned_workers_answer_and_hold_a_clean_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(MASTER_KEY_ENV, MasterKey.generate().hex())
    async with _running_pool(PoolSettings(engine="ckzg", workers=1, start_method="spawn")) as pool:
        assert await pool.call(hold_worker, 0.0) == "ckzg"
        [worker] = pool._workers
        assert MASTER_KEY_ENV.encode() not in Path(f"/proc/{worker.pid}/environ").read_bytes()


def started_at(engine: object, seconds: float) -> int:
    """Runs in a worker: when the call started (CLOCK_MONOTONIC is one clock for every
    process), after which it holds the worker ``seconds``."""
    start = time.monotonic_ns()
    time.sleep(seconds)
    return start


async def test_a_flooding_principal_cannot_starve_another() -> None:
    """One worker; a principal floods it. Beyond its cap it is refused at once, so the
    queue keeps room for others, and a freed worker goes to the principals in turn: the
    other principal's call runs after at most one more of the flood, not after all."""
    async with _running_pool(PoolSettings(engine="ckzg", workers=1, max_queue=6)) as pool:
        flooder = EngineShare("principal:flood", max_in_flight=4)
        other = EngineShare("principal:other", max_in_flight=4)
        flood = [asyncio.create_task(pool.call(started_at, 0.3, share=flooder)) for _ in range(4)]
        while pool.queue_depth < 3:
            await asyncio.sleep(0.005)
        with pytest.raises(ShareExceeded, match="at most 4 at once, 4 already in flight"):
            await pool.call(started_at, 0.0, share=flooder)
        assert pool.free_slots == 3 and pool.in_flight("principal:flood") == 4

        theirs = await pool.call(started_at, 0.0, share=other)
        starts = await asyncio.gather(*flood)
        # The running call, then the flood's turn, then the other principal's.
        assert sum(start < theirs for start in starts) == 2
        assert pool.in_flight("principal:flood") == 0 and pool.queue_depth == 0


async def test_a_batch_counts_each_call_against_the_cap() -> None:
    async with _running_pool(PoolSettings(engine="ckzg", workers=2)) as pool:
        share = EngineShare("principal:batch", max_in_flight=3)
        with pytest.raises(ShareExceeded):
            await pool.call_many([(started_at, (0.0,))] * 4, share)
        done = await pool.call_many([(started_at, (0.0,))] * 3, share)
        assert all(call.error is None for call in done)
        assert pool.in_flight("principal:batch") == 0


async def _principal_id(gw: Gateway, role: str) -> str:
    service = gw.app[AUTH_SERVICE]
    principal = await service.authenticate_api_key(
        await gw.api_key(role), "127.0.0.1", lambda: None
    )
    return principal.id


async def test_the_engine_share_is_enforced_per_principal_over_https(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(
        auth={**CHEAP_ARGON2, "engine_share": {"client": {"max_in_flight": 2}}}
    )
    verify = {"operation": "verify_kzg_proof", **_verify_body()}
    response, body = await gw.post("/v1/kzg/batch", {"operations": [verify] * 3})
    assert response.status == 429 and body["error"]["code"] == "engine_share_exceeded", body
    assert "at most 2 at once" in body["error"]["message"]
    assert int(response.headers["Retry-After"]) >= 1
    [record] = await gw.audit_records(response.headers["X-Request-ID"])
    assert (record["http_status"], record["outcome"]) == (429, "rate_limited")

    # Two calls held by this client: a third is refused, another client's call is not.
    pool = gw.app[KZG_POOL]
    share = EngineShare(f"principal:{await _principal_id(gw, 'client')}", 2)
    held = [asyncio.create_task(pool.call(hold_worker, 1.0, share=share)) for _ in range(2)]
    while pool.in_flight(share.owner) < 2:
        await asyncio.sleep(0.005)
    refused, _ = await gw.post("/v1/kzg/verify-proof", _verify_body())
    other_key = (await gw.app[AUTH_SERVICE].create_api_key("other", "client", "tests"))["api_key"]
    answered, body = await gw.post(
        "/v1/kzg/verify-proof", _verify_body(), role=None, headers={"X-API-Key": other_key}
    )
    await asyncio.gather(*held)
    assert refused.status == 429
    assert answered.status == 200 and body["valid"] is True
