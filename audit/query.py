"""Auditor queries over the retained events: filters and a seq cursor."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.events import format_timestamp
from audit.models import audit_events, fields_from_row

MAX_LIMIT = 1000


@dataclass(frozen=True)
class EventQuery:
    """``since`` is inclusive, ``until`` exclusive; results come in seq order after
    ``after_seq``, at most ``limit`` of them."""

    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    outcome: str | None = None
    http_status: int | None = None
    after_seq: int = 0
    limit: int = 100

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
        if self.after_seq < 0:
            raise ValueError("after_seq must not be negative")


@dataclass(frozen=True)
class EventPage:
    events: list[dict[str, Any]]
    next_after_seq: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"events": self.events, "next_after_seq": self.next_after_seq}


def event_item(row: Any) -> dict[str, Any]:
    """Return one stored record as the API and the export show it."""
    return {"seq": row["seq"], **fields_from_row(row)}


async def query_events(engine: AsyncEngine, query: EventQuery) -> EventPage:
    """Return one page of matching events and the cursor of the next page (None at the end)."""
    table = audit_events
    statement = select(table).where(table.c.seq > query.after_seq)
    if query.since is not None:
        statement = statement.where(table.c.occurred_at >= format_timestamp(query.since))
    if query.until is not None:
        statement = statement.where(table.c.occurred_at < format_timestamp(query.until))
    for column, value in (
        (table.c.actor, query.actor),
        (table.c.action, query.action),
        (table.c.outcome, query.outcome),
        (table.c.http_status, query.http_status),
    ):
        if value is not None:
            statement = statement.where(column == value)
    statement = statement.order_by(table.c.seq).limit(query.limit + 1)
    async with engine.connect() as conn:
        rows = list((await conn.execute(statement)).mappings())
    more = len(rows) > query.limit
    events = [event_item(row) for row in rows[: query.limit]]
    return EventPage(events, events[-1]["seq"] if more else None)
