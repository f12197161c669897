"""The audit log's scheduled jobs. Each one writes its own audit record.

They take what they need as arguments; the gateway's job registry adapts its job
context to them, so this package stays free of gateway code.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import issue_checkpoint
from audit.events import AuditEvent
from audit.retention import RetentionPolicy, RetentionRefused, run_retention
from audit.signing import Signer
from audit.writer import AuditWriter

JOB_ACTOR = "system:jobs"


def job_event(name: str, outcome: str, now: datetime, detail: dict[str, Any]) -> AuditEvent:
    """Return the audit record of one job run."""
    return AuditEvent(
        request_id=f"job-{uuid.uuid4().hex}",
        occurred_at=now,
        actor=JOB_ACTOR,
        role="system",
        action=f"job:{name}",
        outcome=outcome,
        detail=detail,
    )


async def checkpoint_job(
    engine: AsyncEngine, writer: AuditWriter, signer: Signer, now: datetime
) -> dict[str, Any]:
    """Sign the chain head; returns {seq, hash, key_id} (seq None while the chain is empty)."""
    checkpoint = await issue_checkpoint(engine, signer, now)
    summary: dict[str, Any] = {
        "seq": checkpoint.seq if checkpoint else None,
        "hash": checkpoint.hash if checkpoint else None,
        "key_id": signer.key_id,
    }
    await writer.append(job_event("checkpoint", "success", now, summary))
    return summary


async def retention_job(
    engine: AsyncEngine,
    writer: AuditWriter,
    signer: Signer,
    policy: RetentionPolicy,
    now: datetime,
) -> dict[str, Any]:
    """Checkpoint the head, then prune what the policy allows; the run is audited even
    when the range to prune fails verification (then nothing is pruned)."""
    await issue_checkpoint(engine, signer, now)
    try:
        result = await run_retention(engine, signer, policy, now)
    except RetentionRefused as exc:
        await writer.append(job_event("retention", "failure", now, {"error": str(exc)}))
        raise
    summary = {**result.to_dict(), "keep_years": policy.keep_years}
    await writer.append(job_event("retention", "success", now, summary))
    return summary
