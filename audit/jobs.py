"""The audit log's scheduled jobs. Each one writes its own audit record.

They take what they need as arguments; the gateway's job registry adapts its job
context to them, so this package stays free of gateway code.
"""

from __future__ import annotations

import base64
import uuid
from contextvars import ContextVar
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from audit.events import AuditEvent
from audit.retention import RetentionPolicy, RetentionRefused, run_retention
from audit.writer import AuditWriter

JOB_ACTOR = "system:jobs"
# Who runs the job in this task: the scheduler (JOB_ACTOR) or, run by hand, the CLI's
# ``cli:<os user>``. A context variable, so every job's records carry it unasked.
job_actor: ContextVar[str] = ContextVar("job_actor", default=JOB_ACTOR)


def job_event(name: str, outcome: str, now: datetime, detail: dict[str, Any]) -> AuditEvent:
    """Return the audit record of one job run, attributed to whoever runs it."""
    actor = job_actor.get()
    return AuditEvent(
        request_id=f"job-{uuid.uuid4().hex}",
        occurred_at=now,
        actor=actor,
        role="system" if actor == JOB_ACTOR else "operator",
        action=f"job:{name}",
        outcome=outcome,
        detail=detail,
    )


async def checkpoint_job(writer: AuditWriter, now: datetime) -> dict[str, Any]:
    """Append the job's own record, whose group commit signs a fresh tree head: a quiet
    log still shows a young checkpoint. Returns {size, root, key_id} of that head."""
    appended = await writer.append(
        job_event("checkpoint", "success", now, {"key_id": writer.signer.key_id})
    )
    return {
        "size": appended.size,
        "root": base64.b64encode(appended.batch.tree.root()).decode(),
        "key_id": writer.signer.key_id,
    }


async def retention_job(
    engine: AsyncEngine, writer: AuditWriter, policy: RetentionPolicy, now: datetime
) -> dict[str, Any]:
    """Prune what the policy allows; the run is audited even when the range to prune
    fails verification (then nothing is pruned)."""
    try:
        result = await run_retention(engine, writer.signer, policy, now)
    except RetentionRefused as exc:
        await writer.append(job_event("retention", "failure", now, {"error": str(exc)}))
        raise
    summary = {**result.to_dict(), "keep_years": policy.keep_years}
    await writer.append(job_event("retention", "success", now, summary))
    return summary
