"""Master-key rotation: re-seal every secret stored under the old key.

Each domain names its sealed columns; the caller passes them all so that one transaction
moves every secret of the database to the new key, or none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Column, Table, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from auth.crypto import MasterKey
from auth.models import jwt_keys, users


@dataclass(frozen=True)
class SealedColumn:
    """A column of sealed values; each row's AAD purpose is ``<purpose>:<key value>``."""

    table: Table
    key: Column
    sealed: Column
    purpose: str

    def aad(self, ident: object) -> str:
        """The associated data a row's secret is sealed under."""
        return f"{self.purpose}:{ident}"


IDENTITY_SEALED = (
    SealedColumn(users, users.c.id, users.c.sealed_totp_secret, "totp"),
    SealedColumn(jwt_keys, jwt_keys.c.kid, jwt_keys.c.sealed_private_key, "jwt-key"),
)


async def rewrap_columns(
    conn: AsyncConnection, old: MasterKey, new: MasterKey, columns: Iterable[SealedColumn]
) -> int:
    """Re-seal every value of ``columns`` from ``old`` to ``new`` inside the caller's
    transaction; returns how many. A value that does not open under ``old`` raises."""
    count = 0
    for column in columns:
        for key, sealed in (await conn.execute(select(column.key, column.sealed))).all():
            rewrapped = old.rewrap(sealed, column.aad(key), new)
            await conn.execute(
                update(column.table)
                .where(column.key == key)
                .values({column.sealed.name: rewrapped})
            )
            count += 1
    return count
