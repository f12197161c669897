"""Log keys and receipts.

The log key (Ed25519, a C2SP signed-note key named after the log's origin) signs every
tree head the audit writer commits. A KZG answer's receipt is ``{"entry", "proof"}``: the
logged audit entry (canonical JSON) and its C2SP tlog-proof against the signed checkpoint
of its own group commit, so anyone holding the log's verifier key checks it offline.
Private keys live only sealed under the master key (AES-256-GCM); keys are retired, never
deleted. The BLS receipt keys of the first release stay listed (``/v1/keys/receipts``)
so its receipts and checkpoints stay verifiable; they sign nothing any more.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import (
    Column,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.chain import canonical_json
from audit.events import format_timestamp
from audit.log import begin_write
from audit.note import NoteSigner
from audit.signing import NoteLogSigner
from audit.writer import AppendResult
from auth.core import Committer
from auth.crypto import MasterKey
from auth.master_key import LOG_SEALED, RECEIPT_SEALED, SEALED_SECRETS, claim_master_key
from auth.models import CURRENT_ONLY
from gateway.context import RequestContext

CURRENT, RETIRED = "current", "retired"

metadata = MetaData()
# Schema changes go through migrations/versions/gateway_*.py only.
receipt_keys = Table(
    "receipt_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("public_key", String(96), nullable=False, unique=True),
    Column("sealed_private_key", LargeBinary, nullable=False),
    Column("not_before", String(27), nullable=False),
    Column("not_after", String(27)),
    Column("status", String(16), nullable=False),
    Index("ix_receipt_keys_status", "status"),
    Index("ux_receipt_keys_one_current", "status", unique=True, **CURRENT_ONLY),
)
log_keys = Table(
    "log_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("vkey", Text, nullable=False, unique=True),
    Column("sealed_private_key", LargeBinary, nullable=False),
    Column("not_before", String(27), nullable=False),
    Column("not_after", String(27)),
    Column("status", String(16), nullable=False),
    Index("ux_log_keys_one_current", "status", unique=True, **CURRENT_ONLY),
)

# What rotation re-seals and what a key must open before it is recorded.
__all__ = ["LOG_SEALED", "RECEIPT_SEALED", "SEALED_SECRETS"]


class NoLogKey(RuntimeError):
    """No current log key: run ``kzg-gateway init``."""


class OriginMismatch(RuntimeError):
    """The configured ``[audit] origin`` is not the current log key's name."""


@dataclass(frozen=True)
class ReceiptKeyInfo:
    """A first-release BLS receipt key (never the private part)."""

    key_id: str
    public_key: str
    not_before: str
    not_after: str | None
    status: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "public_key": "0x" + self.public_key,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "status": self.status,
        }


@dataclass(frozen=True)
class LogKeyInfo:
    """A published log key: its C2SP verifier key, never the private part."""

    key_id: str
    vkey: str
    not_before: str
    not_after: str | None
    status: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "vkey": self.vkey,
            "status": self.status,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }


def _new_log_key_id(now: datetime) -> str:
    return f"log-{now:%Y%m%d}-{secrets.token_hex(4)}"


async def _insert_log_key(
    conn: AsyncConnection, master_key: MasterKey, origin: str, now: datetime, key_id: str
) -> LogKeyInfo:
    seed = secrets.token_bytes(32)
    signer = NoteSigner(origin, seed)
    info = LogKeyInfo(key_id, signer.vkey, format_timestamp(now), None, CURRENT)
    await conn.execute(
        insert(log_keys).values(
            key_id=key_id,
            vkey=info.vkey,
            sealed_private_key=master_key.seal(seed, LOG_SEALED.aad(key_id)),
            not_before=info.not_before,
            not_after=None,
            status=CURRENT,
        )
    )
    return info


async def rotate_log_key(
    engine: AsyncEngine,
    master_key: MasterKey,
    origin: str,
    now: datetime | None = None,
    commit: Committer | None = None,
) -> LogKeyInfo:
    """Make a new current log key; the previous one is retired (kept, so everything it
    signed stays verifiable). Returns the new key. ``commit`` commits it with its audit
    record (``gateway.identity.audited``); without one, in a transaction of its own."""
    now = now or datetime.now(UTC)
    key_id = _new_log_key_id(now)
    created: list[LogKeyInfo] = []

    async def change(conn: AsyncConnection) -> None:
        # First, as every sealing does: the master-key record is always locked before
        # any secret's row, so rotation and sealing cannot deadlock.
        await claim_master_key(conn, master_key)
        await conn.execute(
            update(log_keys)
            .where(log_keys.c.status == CURRENT)
            .values(status=RETIRED, not_after=format_timestamp(now))
        )
        created.append(await _insert_log_key(conn, master_key, origin, now, key_id))

    if commit is not None:
        await commit(change, {"new_key": key_id})
    else:
        async with engine.connect() as conn:
            await begin_write(conn)
            await change(conn)
            await conn.commit()
    return created[-1]


async def ensure_log_key(
    engine: AsyncEngine, master_key: MasterKey, origin: str
) -> LogKeyInfo | None:
    """Create the first log key unless a current one exists; return it when created."""
    async with engine.connect() as conn:
        await begin_write(conn)
        existing = (
            await conn.execute(select(log_keys.c.key_id).where(log_keys.c.status == CURRENT))
        ).first()
        if existing is not None:
            await conn.rollback()
            return None
        await claim_master_key(conn, master_key)
        now = datetime.now(UTC)
        info = await _insert_log_key(conn, master_key, origin, now, _new_log_key_id(now))
        await conn.commit()
    return info


async def _public_rows(engine: AsyncEngine, table: Table) -> list[dict[str, Any]]:
    """Every key of ``table`` without its sealed private key, oldest first."""
    columns = [c for c in table.c if c.name != "sealed_private_key"]
    async with engine.connect() as conn:
        rows = await conn.execute(select(*columns).order_by(table.c.not_before))
        return [dict(row._mapping) for row in rows]


async def list_log_keys(engine: AsyncEngine) -> list[LogKeyInfo]:
    """Every log key ever used, oldest first (retired keys stay listed)."""
    return [LogKeyInfo(**row) for row in await _public_rows(engine, log_keys)]


async def list_receipt_keys(engine: AsyncEngine) -> list[ReceiptKeyInfo]:
    """Every BLS receipt key of the first release, oldest first."""
    return [ReceiptKeyInfo(**row) for row in await _public_rows(engine, receipt_keys)]


def input_digest(value: bytes | list[bytes] | list[int]) -> str:
    """SHA-256 (hex) of an input: bytes as they are, a list of byte strings concatenated,
    a list of indices as 8-byte big-endian integers (the spec's uint64)."""
    digest = hashlib.sha256()
    if isinstance(value, bytes | bytearray | memoryview):
        digest.update(value)
    else:
        for item in value:
            digest.update(item.to_bytes(8, "big") if isinstance(item, int) else item)
    return digest.hexdigest()


def result_digest(body: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of an answer's body without its receipt: the
    audit entry's ``result_digest``, which binds the entry to the answer."""
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


class LogKeySigner:
    """The current log key of this process; satisfies ``audit.signing.LogSigner``.
    ``refresh`` picks up a rotation done by another process or instance."""

    def __init__(self, engine: AsyncEngine, master_key: MasterKey, origin: str) -> None:
        self._engine = engine
        self._master_key = master_key
        # The key and its id change together, as one immutable pair: a signature and
        # the id recorded with it always come from the same key.
        self._current: NoteLogSigner | None = None
        self.origin = origin
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._current is not None

    def current(self) -> NoteLogSigner:
        """The (key id, key) pair in use now; a later refresh does not change it."""
        if self._current is None:
            raise NoLogKey("the log key is not loaded")
        return self._current

    @property
    def key_id(self) -> str:
        return self._current.key_id if self._current is not None else ""

    @property
    def vkey(self) -> str:
        return self.current().vkey

    async def refresh(self) -> bool:
        """Load the current key if it changed; True when it did. Raises NoLogKey, and
        OriginMismatch when the key is not named after the configured origin."""
        async with self._lock, self._engine.connect() as conn:
            row = (await conn.execute(select(log_keys).where(log_keys.c.status == CURRENT))).first()
        if row is None:
            raise NoLogKey("no current log key: run 'kzg-gateway init'")
        if row.key_id == self.key_id:
            return False
        name = row.vkey.split("+", 1)[0]
        if name != self.origin:
            raise OriginMismatch(
                f"the log key is named {name!r} but [audit] origin is {self.origin!r}: "
                "every instance must share one origin (rotate the log key to change it)"
            )
        seed = self._master_key.open(row.sealed_private_key, LOG_SEALED.aad(row.key_id))
        self._current = NoteLogSigner(NoteSigner(name, seed), row.key_id)
        return True

    def sign_note(self, text: str) -> str:
        return self.current().sign_note(text)


async def load_log_signer(engine: AsyncEngine, master_key: MasterKey, origin: str) -> LogKeySigner:
    """The current log key, loaded (raises NoLogKey or OriginMismatch)."""
    signer = LogKeySigner(engine, master_key, origin)
    await signer.refresh()
    return signer


class ReceiptResponse(web.Response):
    """A result whose body is finished only once its audit record is committed: the
    audit middleware calls ``complete`` with the committed record, so the receipt carries
    the very entry that holds this body's digest, and its proof."""

    def __init__(self, ctx: RequestContext, output: dict[str, Any]) -> None:
        super().__init__(status=200, content_type="application/json")
        self._output = output
        ctx.result_digest = result_digest(output)

    def complete(self, appended: AppendResult) -> None:
        receipt = {"entry": appended.entry, "proof": appended.inclusion_proof()}
        self.body = json.dumps({**self._output, "receipt": receipt}).encode("utf-8")
