"""Load shedding and worker crashes: the queue in front of the workers is bounded, a
saturated pool answers 503 + Retry-After at once, a dead worker fails only its call."""

from __future__ import annotations

import asyncio

import pytest

from gateway.appkeys import KZG_POOL
from gateway.pool import EnginePool, PoolSettings, WorkerCrashed
from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import hold_worker, hx, kill_worker, make_blob, reference_engine

Z = bytes(32)


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
    pool = EnginePool(PoolSettings(engine="ckzg", workers=2))
    await pool.start()
    try:
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
    finally:
        await pool.stop()


async def test_engine_errors_cross_the_process_boundary() -> None:
    from kzg import KZGError

    pool = EnginePool(PoolSettings(engine="ckzg", workers=1))
    await pool.start()
    try:
        with pytest.raises(KZGError):
            await pool.call("blob_to_kzg_commitment", b"\x00" * 10)
    finally:
        await pool.stop()
