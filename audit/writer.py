"""Group-commit writer: callers await their record's durable commit; one background task
appends every waiting record in a single transaction under the head lock, extends the
Merkle tree and signs the new tree head (a C2SP checkpoint) in that same transaction, so
no answer leaves before the checkpoint that proves it is stored.

A record may carry a change (``append(event, change)``): the change runs in the batch's
transaction under a SAVEPOINT, so it commits together with its record or not at all. A
change that raises is rolled back to its savepoint and fails its caller alone; its record
leaves the batch.

The head lock lives in the database (``SELECT ... FOR UPDATE`` on PostgreSQL, a write
transaction taken up front on SQLite), so several processes and instances sharing one
database still build one gapless tree.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Table, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.breaker import CircuitBreaker
from audit.chain import EntryTemplate
from audit.errors import AuditUnavailable
from audit.events import EVENT_FIELDS, AuditEvent, format_timestamp
from audit.log import HEAD_ID, LogHead, begin_write, lock_head
from audit.merkle import BatchTree, leaf_hash
from audit.metrics import AuditMetrics
from audit.models import (
    TILE_HEIGHT,
    audit_events,
    audit_log_head,
    audit_tree,
    audit_tree_heads,
    column_values,
)
from audit.signing import LogSigner
from audit.tlog import Checkpoint, TlogProof

log = logging.getLogger(__name__)

_EVENT_COLUMNS = ("seq", *EVENT_FIELDS)
_TREE_COLUMNS = ("level", "idx", "hash")
__all__ = ["AppendResult", "AuditWriter", "Change", "begin_write", "lock_head"]
# A database change that commits with its audit record: it runs inside the writer's
# transaction and must not open another connection to the database.
Change = Callable[[AsyncConnection], Awaitable[None]]
T = TypeVar("T")


def _values_refused(exc: BaseException) -> bool:
    """True when the database answered and refused the data itself (SQLSTATE class 22,
    e.g. a character its encoding cannot hold), rather than being unreachable."""
    sqlstate = getattr(exc.orig, "sqlstate", None) if isinstance(exc, DBAPIError) else None
    return str(sqlstate or "").startswith("22")


@functools.cache
def _bulk_insert_sql(table: Table, columns: tuple[str, ...], dialect: Dialect) -> str | None:
    """The driver-level bulk INSERT, None for drivers without one. PostgreSQL gets one
    statement over arrays (``unnest``), one round trip for the whole batch; SQLite an
    executemany, which measured about 10% more appends/s than a Core insert."""
    names = ", ".join(columns)
    # Only fixed identifiers and types from the table definitions are interpolated;
    # values are bound.
    if dialect.paramstyle == "numeric_dollar":
        arrays = ", ".join(
            f"${n}::{table.c[name].type.compile(dialect=dialect)}[]"
            for n, name in enumerate(columns, start=1)
        )
        return f"INSERT INTO {table.name} ({names}) SELECT * FROM unnest({arrays})"  # noqa: S608
    if dialect.paramstyle == "qmark":
        marks = ", ".join("?" * len(columns))
        return f"INSERT INTO {table.name} ({names}) VALUES ({marks})"  # noqa: S608
    return None


async def _insert_rows(
    conn: AsyncConnection, table: Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
) -> None:
    if not rows:
        return
    sql = _bulk_insert_sql(table, columns, conn.dialect)
    if sql is None:
        await conn.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])
    elif conn.dialect.paramstyle == "numeric_dollar":
        await conn.exec_driver_sql(sql, tuple(list(column) for column in zip(*rows, strict=True)))
    else:
        await conn.exec_driver_sql(sql, rows)


async def _apply_changes(conn: AsyncConnection, batch: list[_Pending]) -> list[_Pending]:
    """Run each record's change under its own SAVEPOINT; return the records to append
    (those without a change, or whose change succeeded). A failed change fails its caller
    with its own exception."""
    kept: list[_Pending] = []
    for item in batch:
        if item.future.done():
            continue  # failed earlier (a batch retried record by record)
        if item.change is not None:
            try:
                async with conn.begin_nested():
                    await item.change(conn)
            except Exception as exc:
                if isinstance(exc, DBAPIError) and not isinstance(exc, IntegrityError):
                    raise  # the store itself failed: the whole batch is unavailable
                item.future.set_exception(exc)
                continue
        kept.append(item)
    return kept


@dataclass(frozen=True)
class SignedBatch:
    """What one group commit produced: its signed checkpoint and the tree to prove its
    entries from, without another database read."""

    checkpoint: str
    tree: BatchTree


@dataclass(frozen=True)
class AppendResult:
    """A committed record: its seq (leaf index seq - 1), the logged entry (canonical JSON,
    the leaf's bytes) and the batch whose signed checkpoint includes it."""

    seq: int
    entry: str
    batch: SignedBatch

    @property
    def size(self) -> int:
        """The size of the tree in the checkpoint that includes this record."""
        return self.batch.tree.size

    def inclusion_proof(self) -> str:
        """The C2SP tlog-proof of this entry against its batch's signed checkpoint."""
        index = self.seq - 1
        hashes = self.batch.tree.inclusion_proof(index)
        return TlogProof(index, tuple(hashes), self.batch.checkpoint).text()


@dataclass
class _Pending:
    template: EntryTemplate
    values: tuple[Any, ...]  # the event's column values in EVENT_FIELDS order
    future: asyncio.Future[AppendResult]
    change: Change | None = None


class AuditWriter:
    """Appends events to the tree; ``append`` returns only after the commit of the
    records and of the signed checkpoint that includes them."""

    def __init__(
        self,
        engine: AsyncEngine,
        signer: LogSigner,
        *,
        max_batch: int = 2048,
        commit_timeout: float = 5.0,
        metrics: AuditMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._engine = engine
        self._signer = signer
        self._max_batch = max_batch
        self._commit_timeout = commit_timeout
        self._metrics = metrics
        self._clock = clock
        # Told the outcome of every commit; its callers check it before doing any work.
        self.breaker = breaker
        # time.monotonic() of the last failed commit: readiness turns false at once.
        self.last_failure: float | None = None
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._healthy = False

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        if self._task is not None:
            return
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        """Commit everything already waiting, then stop taking records."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        await self._task
        self._task = None

    @property
    def signer(self) -> LogSigner:
        return self._signer

    async def append(self, event: AuditEvent, change: Change | None = None) -> AppendResult:
        """Return the committed record once it and its signed checkpoint are durable.

        ``change`` commits in the same transaction as the record, or neither does.
        Raises AuditUnavailable when the store cannot commit it, and whatever ``change``
        raised when it failed (then nothing of it, nor the record, is stored).
        """
        fields = event.fields()
        if self._task is None or self._closing:
            raise AuditUnavailable("the audit writer is not running")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        # Prepared here, while the background task waits on the database, so the work
        # done under the head lock stays small.
        self._pending.append(_Pending(EntryTemplate(fields), column_values(fields), future, change))
        self._set_queue_depth()
        self._wake.set()
        # A cancelled caller does not withdraw its record: it is committed all the same.
        return await future

    async def commit_change(
        self, event: AuditEvent, change: Callable[[AsyncConnection], Awaitable[T]]
    ) -> tuple[AppendResult, T]:
        """``append(event, change)``, returning also what ``change`` returned."""
        results: list[T] = []

        async def apply(conn: AsyncConnection) -> None:
            results.append(await change(conn))

        appended = await self.append(event, apply)
        return appended, results[0]

    async def ready(self) -> bool:
        """True when the writer runs and the store answers within the commit timeout."""
        if self._task is None or self._task.done() or self._closing:
            return False
        try:
            async with asyncio.timeout(self._commit_timeout), self._engine.connect() as conn:
                await conn.execute(
                    select(audit_log_head.c.size).where(audit_log_head.c.id == HEAD_ID)
                )
        except Exception:
            return False
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                try:
                    await self._commit()
                except Exception:
                    # _commit fails its batch itself; whatever escapes must not end the task
                    # that every later append waits on.
                    log.exception("audit writer: unexpected error after a commit")
            if self._closing:
                return

    def _take_batch(self) -> list[_Pending]:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        self._set_queue_depth()
        return batch

    async def _commit(self, batch: list[_Pending] | None = None) -> None:
        """Commit ``batch``, or whatever is waiting once the head lock is held."""
        started = self._clock()
        taken = batch or []
        try:
            async with asyncio.timeout(self._commit_timeout), self._engine.connect() as conn:
                head = await lock_head(conn)
                if batch is None:
                    # Taken only now: records that arrived while the lock was on its way join in.
                    taken = self._take_batch()
                results = await self._append(conn, head, await _apply_changes(conn, taken))
        except Exception as exc:
            taken = taken or self._take_batch()
            if len(taken) > 1 and _values_refused(exc):
                # The store is up but refused some record's values: commit one by one, so
                # that record fails alone instead of every request batched with it.
                log.warning("audit batch of %d refused (%r); committing singly", len(taken), exc)
                for item in taken:
                    await self._commit([item])
                return
            self._healthy = False
            self.last_failure = time.monotonic()
            if self.breaker is not None and not _values_refused(exc):
                self.breaker.record_failure()
            if self._metrics:
                self._metrics.failures.inc()
            log.warning("audit commit of %d records failed: %r", len(taken), exc)
            for item in taken:
                if not item.future.done():
                    item.future.set_exception(AuditUnavailable("the audit store is unavailable"))
            return
        if not results:
            return  # every record's change failed: nothing was appended
        if not self._healthy:
            log.info("audit store available; head at seq %d", results[-1][1].seq)
            self._healthy = True
        if self.breaker is not None:
            self.breaker.record_success()
        if self._metrics:
            self._metrics.batch_size.observe(len(taken))
            self._metrics.commit_latency.observe(self._clock() - started)
            self._metrics.head_seq.set(results[-1][1].seq)
            self._metrics.tree_size.set(results[-1][1].size)
            self._metrics.checkpoint_time.set(time.time())
        for item, result in results:
            if not item.future.done():
                item.future.set_result(result)

    async def _append(
        self, conn: AsyncConnection, head: LogHead, batch: list[_Pending]
    ) -> list[tuple[_Pending, AppendResult]]:
        """Append ``batch`` to the locked tree, sign its new head, and commit."""
        if not batch:
            await conn.rollback()
            return []
        compact = head.compact_range()
        if compact.root() != head.root:
            # The head row is the one row the runtime role may update: never extend a
            # compact range that is not the signed tree's, which would fork the log.
            raise AuditUnavailable("the head's compact range does not match its root")
        before = compact.copy()
        event_rows: list[tuple[Any, ...]] = []
        tree_rows: list[tuple[Any, ...]] = []
        entries: list[str] = []
        leaves: list[bytes] = []
        seq = head.size
        for item in batch:
            seq += 1
            entry = item.template.entry(seq)
            leaf = leaf_hash(entry.encode("utf-8"))
            for (level, index), value in compact.append(leaf):
                if level % TILE_HEIGHT == 0:
                    tree_rows.append((level, index, value))
            entries.append(entry)
            leaves.append(leaf)
            event_rows.append((seq, *item.values))
        root = compact.root()
        # One (key id, key) pair for the signature and the id stored with it.
        key = self._signer.current()
        key_id = key.key_id
        checkpoint = self._sign(key, compact.size, root)
        await _insert_rows(conn, audit_events, _EVENT_COLUMNS, event_rows)
        await _insert_rows(conn, audit_tree, _TREE_COLUMNS, tree_rows)
        await conn.execute(
            insert(audit_tree_heads).values(
                size=compact.size,
                root=root,
                issued_at=format_timestamp(datetime.now(UTC)),
                key_id=key_id,
                note=checkpoint,
            )
        )
        await conn.execute(
            update(audit_log_head)
            .where(audit_log_head.c.id == HEAD_ID)
            .values(size=compact.size, root=root, compact=compact.to_bytes())
        )
        await conn.commit()
        signed = SignedBatch(checkpoint, BatchTree(before, leaves))
        first = head.size + 1
        return [
            (item, AppendResult(first + i, entry, signed))
            for i, (item, entry) in enumerate(zip(batch, entries, strict=True))
        ]

    def _sign(self, key: LogSigner, size: int, root: bytes) -> str:
        try:
            return key.sign_note(Checkpoint(key.origin, size, root).text())
        except Exception:
            if self._metrics:
                self._metrics.signing_failures.inc()
            raise

    def _set_queue_depth(self) -> None:
        if self._metrics:
            self._metrics.queue_depth.set(len(self._pending))
