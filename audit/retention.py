"""Retention: the only path by which records leave the audit log.

Prunes the oldest whole range of records that is both older than the policy and
covered by a signed checkpoint, after checking that range against the checkpoint, and
leaves a signed anchor (the hash of the last pruned record and the time of the newest)
from which the retained chain verifies. The database has the last word (migration
``audit_0002``): it refuses an anchor unless every record it covers is older than the
retention floor it holds, by its own clock, and the anchor matches the stored chain. On
PostgreSQL the anchor and the delete go through ``audit_prune`` (SECURITY DEFINER),
because the runtime role may neither insert anchors nor delete records.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.chain import GENESIS_HASH
from audit.checkpoints import Checkpoint, latest_checkpoint
from audit.events import format_timestamp
from audit.models import audit_anchors, audit_events, audit_retention, fields_from_row
from audit.signing import Signer, anchor_message, sign_message
from audit.verify import ChainVerifier
from audit.writer import begin_write

DEFAULT_KEEP_YEARS = 7
_PRUNE_LOCK = 0x6B7A6761  # advisory lock id of retention runs (audit_prune takes it too)
# The floor as migration audit_0002's SQLite trigger computes it (SQLite has millisecond
# time; the padding gives the canonical timestamp form).
_SQLITE_FLOOR = (
    "SELECT strftime('%Y-%m-%dT%H:%M:%f', 'now', '-' || keep_years || ' years') || '000Z' "
    "FROM audit_retention WHERE id = 1"
)
_PRUNE_CALL = (
    "SELECT audit_prune(:through_seq, :hash, :checkpoint_seq, :pruned, :newest_occurred_at, "
    ":issued_at, :key_id, :message, :signature)"
)


class RetentionRefused(RuntimeError):
    """The range to prune does not verify against its checkpoint, or the database refused
    the anchor: nothing is removed."""


@dataclass(frozen=True)
class RetentionPolicy:
    keep_years: int = DEFAULT_KEEP_YEARS

    def __post_init__(self) -> None:
        if self.keep_years < 1:
            raise ValueError("audit retention must keep at least one year")

    def cutoff(self, now: datetime) -> datetime:
        """Return the instant before which records may be pruned."""
        try:
            return now.replace(year=now.year - self.keep_years)
        except ValueError:  # 29 February in a year that has none
            return now.replace(year=now.year - self.keep_years, day=28)

    @classmethod
    def load(cls, path: Path) -> RetentionPolicy:
        """Read ``[audit] keep_years`` from a policy file; defaults when the file is absent."""
        if not path.exists():
            return cls()
        with path.open("rb") as handle:
            section = tomllib.load(handle).get("audit", {})
        return cls(keep_years=int(section.get("keep_years", DEFAULT_KEEP_YEARS)))


@dataclass(frozen=True)
class RetentionResult:
    pruned: int
    through_seq: int | None
    cutoff: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _latest_anchor(conn: AsyncConnection) -> tuple[int, str]:
    row = (
        await conn.execute(
            select(audit_anchors.c.through_seq, audit_anchors.c.hash).order_by(
                audit_anchors.c.through_seq.desc()
            )
        )
    ).first()
    return (int(row.through_seq), str(row.hash)) if row is not None else (0, GENESIS_HASH)


async def _prunable_through(conn: AsyncConnection, cutoff: str, limit_seq: int) -> int:
    """Return the last seq of the leading range older than ``cutoff``, at most ``limit_seq``."""
    first_young = (
        await conn.execute(
            select(func.min(audit_events.c.seq)).where(audit_events.c.occurred_at >= cutoff)
        )
    ).scalar()
    through = limit_seq if first_young is None else min(limit_seq, first_young - 1)
    return int(through)


async def database_floor(conn: AsyncConnection) -> str:
    """Return the retention floor the database enforces now, by its own clock: only
    records that occurred before it may leave."""
    query = "SELECT audit_retention_floor()" if conn.dialect.name == "postgresql" else _SQLITE_FLOOR
    floor = (await conn.execute(text(query))).scalar()
    if floor is None:
        raise RetentionRefused("the database holds no retention floor")
    return str(floor)


async def store_retention_policy(owner_engine: AsyncEngine, policy: RetentionPolicy) -> None:
    """Write the policy's floor into the database; run as the migration owner (on
    PostgreSQL the runtime role may only read it)."""
    async with owner_engine.begin() as conn:
        await conn.execute(update(audit_retention).values(keep_years=policy.keep_years))


async def run_retention(
    engine: AsyncEngine, signer: Signer, policy: RetentionPolicy, now: datetime
) -> RetentionResult:
    """Prune what the policy and the database's floor both allow; return what was done.

    The range is read and verified without blocking appends; only the anchor and the
    delete run in a write transaction, which re-checks that no other run pruned first.
    """
    async with engine.connect() as conn:
        # The database refuses anything younger than its floor, whatever our clock says.
        cutoff = min(format_timestamp(policy.cutoff(now)), await database_floor(conn))
        checkpoint = await latest_checkpoint(conn)
        if checkpoint is None:
            return RetentionResult(0, None, cutoff, "no checkpoint yet")
        anchored_seq, anchored_hash = await _latest_anchor(conn)
        through = await _prunable_through(conn, cutoff, checkpoint.seq)
        if through <= anchored_seq:
            return RetentionResult(0, None, cutoff, "nothing older than the policy")
        through_hash, newest = await _verified_range(
            conn, checkpoint, anchored_seq, anchored_hash, through
        )
        await conn.rollback()

        await begin_write(conn)
        if conn.dialect.name == "postgresql":
            # SQLite's write lock already serialises retention runs; PostgreSQL needs one.
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PRUNE_LOCK})
        if await _latest_anchor(conn) != (anchored_seq, anchored_hash):
            await conn.rollback()
            return RetentionResult(0, None, cutoff, "another retention run pruned first")
        issued_at = format_timestamp(now)
        pruned = through - anchored_seq
        message = anchor_message(through, through_hash, checkpoint.seq, pruned, issued_at, newest)
        anchor = {
            "through_seq": through,
            "hash": through_hash,
            "checkpoint_seq": checkpoint.seq,
            "pruned": pruned,
            "newest_occurred_at": newest,
            "issued_at": issued_at,
            "key_id": signer.key_id,
            "message": message,
            "signature": sign_message(signer, message),
        }
        try:
            removed = await _prune(conn, anchor)
        except DBAPIError as exc:
            if "retention refused" in str(exc.orig):
                raise RetentionRefused(str(exc.orig)) from exc
            raise
        await conn.commit()
    return RetentionResult(removed, through, cutoff, "pruned")


async def _prune(conn: AsyncConnection, anchor: dict[str, Any]) -> int:
    """Write ``anchor`` and delete the records it covers; return how many left."""
    if conn.dialect.name == "postgresql":
        return int((await conn.execute(text(_PRUNE_CALL), anchor)).scalar_one())
    await conn.execute(insert(audit_anchors).values(**anchor))
    deleted = await conn.execute(
        delete(audit_events).where(audit_events.c.seq <= anchor["through_seq"])
    )
    return int(deleted.rowcount)


async def _verified_range(
    conn: AsyncConnection,
    checkpoint: Checkpoint,
    anchored_seq: int,
    anchored_hash: str,
    through: int,
) -> tuple[str, str]:
    """Verify records from the anchor to the checkpoint; return the hash at ``through``
    and the newest ``occurred_at`` up to it."""
    verifier = ChainVerifier({}, start_seq=anchored_seq, start_hash=anchored_hash)
    through_hash = anchored_hash
    newest = ""
    rows = await conn.stream(
        select(audit_events)
        .where(audit_events.c.seq > anchored_seq, audit_events.c.seq <= checkpoint.seq)
        .order_by(audit_events.c.seq)
        .execution_options(yield_per=2000)
    )
    async for row in rows.mappings():
        verifier.add_record(row["seq"], row["prev_hash"], row["hash"], fields_from_row(row))
        if row["seq"] <= through:
            newest = max(newest, row["occurred_at"])
        if row["seq"] == through:
            through_hash = row["hash"]
    report = verifier.finish(checkpoint.seq, checkpoint.hash)
    if not report.valid:
        raise RetentionRefused(
            f"records up to checkpoint {checkpoint.seq} do not verify: "
            f"seq {report.first_bad_seq}: {report.reason}"
        )
    return through_hash, newest
