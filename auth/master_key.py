"""The master key's protocol and the registry of every secret sealed under it.

``SEALED_SECRETS`` names each sealed column of the database (identity, log and receipt
keys): rotation re-seals all of them in one transaction, and a key must open all of them
before it is recorded. Adding a sealed secret means adding its line here.

The database records which key its secrets are sealed under (``master_key_check``,
migration auth_0003): a process holding another key seals nothing (``claim_master_key``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.events import format_timestamp
from audit.log import begin_write
from auth.crypto import MasterKey, MasterKeyMismatch
from auth.models import master_key_check


@dataclass(frozen=True)
class SealedColumn:
    """A column of sealed values; each row's AAD purpose is ``<purpose>:<key value>``."""

    table: sa.TableClause
    key: sa.ColumnClause[str]
    sealed: sa.ColumnClause[bytes]
    purpose: str

    @classmethod
    def named(cls, table: str, key: str, sealed: str, purpose: str) -> SealedColumn:
        # By name, so that this registry needs none of the packages owning the tables.
        clause = sa.table(table, sa.column(key, sa.String), sa.column(sealed, sa.LargeBinary))
        return cls(clause, clause.c[key], clause.c[sealed], purpose)

    def select_sealed(self) -> sa.Select[str, bytes]:
        """(key, sealed) of every row holding a secret (a person not yet enrolled has none)."""
        return select(self.key, self.sealed).where(self.sealed.is_not(None))

    def aad(self, ident: object) -> str:
        """The associated data a row's secret is sealed under."""
        return f"{self.purpose}:{ident}"


TOTP_SEALED = SealedColumn.named("users", "id", "sealed_totp_secret", "totp")
JWT_SEALED = SealedColumn.named("jwt_keys", "kid", "sealed_private_key", "jwt-key")
RECEIPT_SEALED = SealedColumn.named("receipt_keys", "key_id", "sealed_private_key", "receipt-key")
LOG_SEALED = SealedColumn.named("log_keys", "key_id", "sealed_private_key", "log-key")
IDENTITY_SEALED = (TOTP_SEALED, JWT_SEALED)
# Every sealed secret of the database.
SEALED_SECRETS = (*IDENTITY_SEALED, RECEIPT_SEALED, LOG_SEALED)


async def rewrap_columns(
    conn: AsyncConnection,
    old: MasterKey,
    new: MasterKey,
    columns: Iterable[SealedColumn] = SEALED_SECRETS,
) -> int:
    """Re-seal every value of ``columns`` from ``old`` to ``new`` inside the caller's
    transaction; returns how many. A value that does not open under ``old`` raises."""
    count = 0
    for column in columns:
        for key, sealed in (await conn.execute(column.select_sealed())).all():
            rewrapped = old.rewrap(sealed, column.aad(key), new)
            await conn.execute(
                update(column.table)
                .where(column.key == key)
                .values({column.sealed.name: rewrapped})
            )
            count += 1
    return count


_RECORD = master_key_check.c.id == 1


def _record_stamp() -> str:
    return format_timestamp(datetime.now(UTC))


async def _has_record(conn: AsyncConnection) -> bool:
    return (await conn.execute(select(master_key_check.c.id).where(_RECORD))).first() is not None


async def _mismatch(conn: AsyncConnection) -> MasterKeyMismatch:
    if not await _has_record(conn):
        return MasterKeyMismatch(
            "no master key is recorded for the stored secrets: run 'kzg-gateway init' "
            "with the key that opens them"
        )
    return MasterKeyMismatch(
        "the stored secrets are sealed under another master key than this process holds "
        "(was it rotated?): restart with the current key"
    )


async def claim_master_key(conn: AsyncConnection, key: MasterKey) -> None:
    """Call first in every transaction that seals a secret: lock the master-key record
    and raise MasterKeyMismatch (the caller writes nothing) unless it names ``key``; a
    database that has sealed nothing yet records ``key`` now. Rotation updates the record
    before it reads any secret, so a sealing either commits before rotation reads (and is
    re-sealed by it) or waits for it, sees the new key and refuses."""
    mine = key.check_value()
    # One statement for both cases: on PostgreSQL a waiting UPDATE re-evaluates its
    # condition on the row as committed, so two first sealings with one key both pass.
    claimed = await conn.execute(
        update(master_key_check)
        .where(
            _RECORD,
            or_(master_key_check.c.check_value == mine, master_key_check.c.check_value.is_(None)),
        )
        .values(
            check_value=mine,
            recorded_at=func.coalesce(master_key_check.c.recorded_at, _record_stamp()),
        )
    )
    if claimed.rowcount != 1:
        raise await _mismatch(conn)


async def replace_master_key(conn: AsyncConnection, old: MasterKey, new: MasterKey) -> None:
    """Rotation, inside its write transaction and before it reads any secret: record
    ``new`` where ``old`` was (MasterKeyMismatch if another key is recorded). With no
    record (secrets older than auth_0003), one is created: the re-sealing that follows
    opens every secret with ``old``, which verifies it."""
    replaced = await conn.execute(
        update(master_key_check)
        .where(
            _RECORD,
            or_(
                master_key_check.c.check_value == old.check_value(),
                master_key_check.c.check_value.is_(None),
            ),
        )
        .values(check_value=new.check_value(), recorded_at=_record_stamp())
    )
    if replaced.rowcount == 1:
        return
    if await _has_record(conn):
        raise MasterKeyMismatch(
            "the stored secrets are sealed under another master key than the one given"
        )
    await conn.execute(
        insert(master_key_check).values(
            id=1, check_value=new.check_value(), recorded_at=_record_stamp()
        )
    )


async def record_master_key(
    engine: AsyncEngine, key: MasterKey, sealed: Iterable[SealedColumn] = SEALED_SECRETS
) -> None:
    """For ``init`` and ``serve``: raise MasterKeyMismatch unless the database records
    ``key``. Where none is recorded yet, every secret of ``sealed`` must open with ``key``
    (MasterKeyError otherwise) and ``key`` is recorded."""
    mine = key.check_value()
    async with engine.connect() as conn:
        await begin_write(conn)
        query = select(master_key_check.c.check_value).where(_RECORD).with_for_update()
        row = (await conn.execute(query)).first()
        if row is not None and row.check_value == mine:
            await conn.rollback()
            return
        if row is not None and row.check_value is not None:
            raise await _mismatch(conn)
        for column in sealed:
            for ident, value in (await conn.execute(column.select_sealed())).all():
                key.open(value, column.aad(ident))
        values = {"check_value": mine, "recorded_at": _record_stamp()}
        try:
            if row is None:
                await conn.execute(insert(master_key_check).values(id=1, **values))
            else:
                await conn.execute(update(master_key_check).where(_RECORD).values(**values))
            await conn.commit()
        except IntegrityError:
            # Another instance recorded it first: compare with what it recorded.
            await conn.rollback()
            return await record_master_key(engine, key, sealed)


async def master_key_is_current(engine: AsyncEngine, key: MasterKey) -> bool:
    """Whether ``key`` may still seal: the database records it, or nothing yet."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(master_key_check.c.check_value).where(_RECORD))).first()
    return row is not None and row.check_value in (None, key.check_value())
