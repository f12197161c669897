"""Graceful shutdown lets in-flight requests finish; the in-server scheduler runs the
jobs, each run audited."""

from __future__ import annotations

import asyncio

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
    await asyncio.sleep(1.0)
    async with gw.app[DB_ENGINE].connect() as conn:
        checkpoints = (await conn.execute(select(audit_checkpoints.c.seq))).scalars().all()
        runs = (
            (
                await conn.execute(
                    select(audit_events.c.outcome).where(audit_events.c.action == "job:checkpoint")
                )
            )
            .scalars()
            .all()
        )
    assert len(checkpoints) >= 2
    assert len(runs) >= 2 and set(runs) == {"success"}
