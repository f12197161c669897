"""Signed tree heads outside the write path: the writer signs one with every group
commit; this signs the current head when no commit has (a tree built by a migration).

The first release's BLS checkpoints over the hash chain are read here too, so that
``audit verify`` can still check them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.events import format_timestamp
from audit.log import TreeHead, lock_head, tree_head_at
from audit.models import audit_checkpoints, audit_tree_heads
from audit.signing import LogSigner
from audit.tlog import Checkpoint


@dataclass(frozen=True)
class LegacyCheckpoint:
    """A first-release checkpoint: the receipt key's BLS signature over a chain head."""

    seq: int
    hash: str
    issued_at: str
    key_id: str
    message: str
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Any) -> LegacyCheckpoint:
        return cls(**{name: values[name] for name in cls.__dataclass_fields__})


async def legacy_checkpoints(conn: AsyncConnection) -> list[LegacyCheckpoint]:
    rows = await conn.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.seq))
    return [LegacyCheckpoint.from_mapping(row._mapping) for row in rows]


async def sign_head(engine: AsyncEngine, signer: LogSigner, now: datetime) -> TreeHead | None:
    """Sign the current tree head unless it is signed already; None while the tree is
    empty. Returns the signed tree head at the current size."""
    async with engine.connect() as conn:
        head = await lock_head(conn)
        if head.size == 0:
            await conn.rollback()
            return None
        existing = await tree_head_at(conn, head.size)
        if existing is not None:
            await conn.rollback()
            return existing
        key = signer.current()  # the id stored is the signing key's
        signed = TreeHead(
            size=head.size,
            root=head.root,
            issued_at=format_timestamp(now),
            key_id=key.key_id,
            note=key.sign_note(Checkpoint(key.origin, head.size, head.root).text()),
        )
        await conn.execute(insert(audit_tree_heads).values(**asdict(signed)))
        await conn.commit()
        return signed
