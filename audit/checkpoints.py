"""Signed checkpoints: the receipt key vouches for the chain head at a moment, so an
auditor holding an old checkpoint can prove that any later head extends it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.events import format_timestamp
from audit.models import audit_checkpoints
from audit.signing import Signer, checkpoint_message, sign_message
from audit.writer import lock_head


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    issued_at: str
    key_id: str
    message: str
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Any) -> Checkpoint:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})


async def latest_checkpoint(conn: AsyncConnection) -> Checkpoint | None:
    """Return the checkpoint of the highest seq, or None before the first one."""
    row = (
        await conn.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.seq.desc()))
    ).first()
    return Checkpoint.from_mapping(row._mapping) if row is not None else None


async def issue_checkpoint(engine: AsyncEngine, signer: Signer, now: datetime) -> Checkpoint | None:
    """Sign the current chain head; None while the chain is empty. A head that is
    already checkpointed (by this or another instance) returns that checkpoint."""
    async with engine.connect() as conn:
        # Under the head lock only briefly (one signature): appends wait that long.
        seq, head_hash = await lock_head(conn)
        if seq == 0:
            await conn.rollback()
            return None
        existing = await _checkpoint_at(conn, seq)
        if existing is not None:
            await conn.rollback()
            return existing
        issued_at = format_timestamp(now)
        message = checkpoint_message(seq, head_hash, issued_at)
        checkpoint = Checkpoint(
            seq=seq,
            hash=head_hash,
            issued_at=issued_at,
            key_id=signer.key_id,
            message=message,
            signature=sign_message(signer, message),
        )
        await conn.execute(insert(audit_checkpoints).values(**checkpoint.to_dict()))
        await conn.commit()
        return checkpoint


async def _checkpoint_at(conn: AsyncConnection, seq: int) -> Checkpoint | None:
    row = (
        await conn.execute(select(audit_checkpoints).where(audit_checkpoints.c.seq == seq))
    ).first()
    return Checkpoint.from_mapping(row._mapping) if row is not None else None
