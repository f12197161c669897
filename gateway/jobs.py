"""Jobs: every named job, listed in ``JOBS`` below, run on schedule inside the server and
by hand with ``kzg-gateway jobs run NAME``. Each run writes its own audit record."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import sign_head
from audit.jobs import JOB_ACTOR, checkpoint_job, job_actor, job_event, retention_job
from audit.retention import RetentionRefused
from audit.writer import AuditWriter
from auth.crypto import MasterKey
from gateway import identity_jobs
from gateway.config import Config
from gateway.receipts import LogKeySigner

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What a job may use; ``now`` is the (injectable) clock, ``actor`` whom its audit
    records name (``cli:<os user>`` when run by hand)."""

    config: Config
    engine: AsyncEngine
    writer: AuditWriter
    master_key: MasterKey
    signer: LogKeySigner
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    actor: str = JOB_ACTOR


JobFn = Callable[[JobContext], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Job:
    name: str
    run: JobFn
    # Seconds between runs in the server (from config); None: only by hand.
    interval: Callable[[Config], float | None]


def _job(
    name: str, fn: JobFn, interval: Callable[[Config], float | None] | float | None = None
) -> Job:
    """``fn`` as job ``name``; ``[jobs] <name>_interval_seconds`` overrides ``interval``
    (seconds, or a function of the config) and 0 turns scheduling off."""

    def schedule(config: Config) -> float | None:
        configured = config.jobs.intervals.get(name)
        if configured is not None:
            return configured or None
        return interval(config) if callable(interval) else interval

    return Job(name, fn, schedule)


async def run_job(name: str, ctx: JobContext) -> dict[str, Any]:
    """Run one job. Jobs audit their own runs; a failure they did not audit is audited here.
    Afterwards the tree head is signed (a no-op when the job's own record signed it), so a
    verifier never waits for the next request to see what a job did."""
    job = JOBS.get(name)
    if job is None:
        raise KeyError(f"unknown job {name!r}; known: {', '.join(sorted(JOBS))}")
    token = job_actor.set(ctx.actor)
    try:
        result = await job.run(ctx)
    except RetentionRefused:
        await _sign_after_failure(ctx)
        raise
    except Exception as exc:
        await ctx.writer.append(
            job_event(name, "failure", ctx.now(), {"error": type(exc).__name__})
        )
        await _sign_after_failure(ctx)
        raise
    finally:
        job_actor.reset(token)
    await sign_head(ctx.engine, ctx.signer, ctx.now())
    return result


async def _sign_after_failure(ctx: JobContext) -> None:
    """Sign the head after a failed run too, without hiding the job's own error."""
    try:
        await sign_head(ctx.engine, ctx.signer, ctx.now())
    except Exception:
        log.exception("signing the tree head after a failed job")


async def _checkpoint(ctx: JobContext) -> dict[str, Any]:
    return await checkpoint_job(ctx.writer, ctx.now())


async def _retention(ctx: JobContext) -> dict[str, Any]:
    policy = ctx.config.audit.retention()
    return await retention_job(ctx.engine, ctx.writer, policy, ctx.now())


# Every job, in one place: the scheduler, ``jobs run`` and ``run_job`` know these and no
# others, whichever modules happen to be imported.
JOBS: dict[str, Job] = {
    job.name: job
    for job in (
        _job("checkpoint", _checkpoint, lambda c: c.audit.checkpoint_interval_seconds),
        _job("retention", _retention, lambda c: c.audit.retention_interval_seconds),
        _job("rotate-keys", identity_jobs.rotate_keys, 3600.0),
        _job("access-review", identity_jobs.access_review, 86400.0),
    )
}


class Scheduler:
    """Runs every registered job at its interval in the server; a failing run is logged
    (and audited) and retried at the next interval."""

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for job in JOBS.values():
            interval = job.interval(self._ctx.config)
            if interval:
                self._tasks.append(
                    asyncio.create_task(self._loop(job.name, interval), name=f"job-{job.name}")
                )

    async def _loop(self, name: str, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await run_job(name, self._ctx)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("job %s failed", name)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
