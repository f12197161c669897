"""JSON Lines export carrying everything offline verification needs.

Lines, in order: ``header``; one ``key`` per receipt public key; ``anchor`` lines
(retention); ``checkpoint`` lines; one ``event`` per record in seq order (its fields,
``seq``, ``prev_hash`` and ``hash``); and last the ``head`` the export was cut at, so a
truncated file does not verify. All of it is read from one database snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import datetime

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import canonical_json
from audit.events import format_timestamp
from audit.models import HEAD_ID, audit_anchors, audit_chain_head, audit_checkpoints, audit_events
from audit.query import event_item
from audit.verify import load_public_keys

EXPORT_FORMAT = "kzg-gateway-audit-export"
EXPORT_VERSION = 1


def _line(kind: str, values: Mapping) -> str:
    return canonical_json({"type": kind, **values}) + "\n"


async def export_lines(
    engine: AsyncEngine, now: datetime, public_keys: Mapping[str, bytes] | None = None
) -> AsyncIterator[str]:
    """Yield the export line by line (each ends with a newline)."""
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        else:
            await conn.exec_driver_sql("BEGIN")
        head = (
            await conn.execute(select(audit_chain_head).where(audit_chain_head.c.id == HEAD_ID))
        ).one()
        keys = dict(public_keys) if public_keys is not None else await load_public_keys(conn)
        yield _line(
            "header",
            {
                "format": EXPORT_FORMAT,
                "version": EXPORT_VERSION,
                "exported_at": format_timestamp(now),
            },
        )
        for key_id in sorted(keys):
            yield _line("key", {"key_id": key_id, "public_key": keys[key_id].hex()})
        for table, order in (
            (audit_anchors, audit_anchors.c.through_seq),
            (audit_checkpoints, audit_checkpoints.c.seq),
        ):
            kind = "anchor" if table is audit_anchors else "checkpoint"
            for row in (await conn.execute(select(table).order_by(order))).mappings():
                yield _line(kind, dict(row))
        result = await conn.stream(
            select(audit_events)
            .where(audit_events.c.seq <= head.seq)
            .order_by(audit_events.c.seq)
            .execution_options(yield_per=2000)
        )
        async for row in result.mappings():
            yield _line("event", event_item(row))
        yield _line("head", {"seq": head.seq, "hash": head.hash})
