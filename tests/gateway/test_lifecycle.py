"""Graceful shutdown lets in-flight requests finish; the in-server scheduler runs the
jobs, each run audited."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from sqlalchemy import select

from audit.models import audit_events, audit_tree_heads
from gateway.appkeys import DB_ENGINE, KZG_POOL
from tests.audit import reference_tlog
from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import ORIGIN, check_receipt, hold_worker, hx, make_blob, vkeys_of


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
    # Its receipt is complete: the checkpoint it carries was stored before the answer left.
    vkeys = [str(k) for k in await _stored_vkeys(gw)]
    check_receipt(body, response.headers["X-Request-ID"], vkeys)


async def _stored_vkeys(gw: Any) -> list[str]:
    from gateway.db import make_engine
    from gateway.receipts import log_keys

    engine = make_engine(gw.app_url)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(select(log_keys.c.vkey))).scalars())
    finally:
        await engine.dispose()


async def test_scheduler_runs_jobs_and_audits_each_run(start_gateway: StartGateway) -> None:
    gw = await start_gateway(jobs={"enabled": True, "checkpoint_interval_seconds": 0.2})
    await gw.request("GET", "/healthz", role=None)
    # Two runs take ~0.4 s here; poll rather than sleep so a slow disk only waits longer.
    deadline = time.monotonic() + 15
    while True:
        async with gw.app[DB_ENGINE].connect() as conn:
            runs = (
                await conn.execute(
                    select(audit_events.c.seq, audit_events.c.outcome, audit_events.c.detail)
                    .where(audit_events.c.action == "job:checkpoint")
                    .order_by(audit_events.c.seq)
                )
            ).all()
            heads = (
                await conn.execute(select(audit_tree_heads).order_by(audit_tree_heads.c.size))
            ).all()
        if len(runs) >= 2:
            break
        assert time.monotonic() < deadline, runs
        await asyncio.sleep(0.1)
    assert {run.outcome for run in runs} == {"success"}
    # Each run's own record got a signed tree head covering it: a quiet log still shows
    # a young checkpoint, signed by the current log key.
    _, listing = await gw.request("GET", "/v1/log/keys", role=None)
    vkeys = vkeys_of(listing)
    current = next(k for k in listing["keys"] if k["status"] == "current")
    sizes = {head.size for head in heads}
    for run in runs:
        assert any(size >= run.seq for size in sizes), (run.seq, sizes)
        assert json.loads(run.detail)["key_id"] == current["key_id"]
    for head in heads:
        origin, size, root = reference_tlog.open_checkpoint(head.note, vkeys)
        assert (origin, size, root) == (ORIGIN, head.size, bytes(head.root))
        assert head.key_id == current["key_id"]
