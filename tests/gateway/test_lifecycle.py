"""Graceful shutdown lets in-flight requests finish; the in-server scheduler runs the
jobs, each run audited."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import select

from audit.models import audit_checkpoints, audit_events
from gateway.appkeys import DB_ENGINE, KZG_POOL
from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import hold_worker, hx, make_blob


async def test_shutdown_drains_in_flight_requests(start_gateway: StartGateway) -> None:
    gw = await start_gateway(pool={"workers": 1})
    await gw.api_key()
    blocker = asyncio.create_task(gw.app[KZG_POOL].call(hold_worker, 1.0))
    await asyncio.sleep(0.1)
    in_flight = asyncio.create_task(
        gw.post("/v1/kzg/blob-to-commitment", {"blob": hx(make_blob(4))})
    )
    await asyncio.sleep(0.3)
    await gw.runner.cleanup()
    response, body = await in_flight
    assert response.status == 200 and "receipt" in body
    assert await blocker == "ckzg"


async def test_scheduler_runs_jobs_and_audits_each_run(start_gateway: StartGateway) -> None:
    gw = await start_gateway(jobs={"enabled": True, "checkpoint_interval_seconds": 0.2})
    await gw.request("GET", "/healthz", role=None)
    # Two runs take ~0.4 s here; poll rather than sleep so a slow disk only waits longer.
    deadline = time.monotonic() + 15
    while True:
        async with gw.app[DB_ENGINE].connect() as conn:
            seqs = select(audit_checkpoints.c.seq).order_by(audit_checkpoints.c.seq)
            checkpoints = (await conn.scalars(seqs)).all()
            outcomes = select(audit_events.c.outcome)
            runs = (
                await conn.scalars(outcomes.where(audit_events.c.action == "job:checkpoint"))
            ).all()
        if len(checkpoints) >= 2 and len(runs) >= 2:
            break
        assert time.monotonic() < deadline, (checkpoints, runs)
        await asyncio.sleep(0.1)
    assert checkpoints == sorted(set(checkpoints))
    assert len(runs) >= 2 and set(runs) == {"success"}
