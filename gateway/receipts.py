"""BLS receipts: the receipt key (blspy AugSchemeMPL) signs every KZG result and the
audit checkpoints. Private keys live only sealed under the master key (AES-256-GCM).

A receipt is ``{key_id, scheme, message, signature}``: ``message`` is the canonical JSON
of ``{operation, request_id, audit_seq, issued_at, input_sha256, output}`` and
``signature`` the 0x-hex AugSchemeMPL signature over its UTF-8 bytes. Public keys are
published as 0x-hex too (stored as plain hex, as the audit verifier reads them).
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
from blspy import AugSchemeMPL, PrivateKey
from sqlalchemy import Column, LargeBinary, MetaData, String, Table, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.chain import canonical_json
from audit.events import format_timestamp
from audit.writer import begin_write
from auth.crypto import MasterKey
from auth.rewrap import IDENTITY_SEALED, SealedColumn
from auth.service import claim_master_key
from gateway.context import RequestContext

SCHEME = "bls12381-aug"
CURRENT, RETIRED = "current", "retired"

metadata = MetaData()
# Schema changes go through migrations/versions/gateway_*.py only.
receipt_keys = Table(
    "receipt_keys",
    metadata,
    Column("key_id", String(64), primary_key=True),
    Column("public_key", String(96), nullable=False),
    Column("sealed_private_key", LargeBinary, nullable=False),
    Column("not_before", String(27), nullable=False),
    Column("not_after", String(27)),
    Column("status", String(16), nullable=False),
)

RECEIPT_SEALED = SealedColumn(
    receipt_keys, receipt_keys.c.key_id, receipt_keys.c.sealed_private_key, "receipt-key"
)
# Every sealed secret of the database: what rotation re-seals and what a key must open
# before it is recorded (auth.service.record_master_key).
SEALED_SECRETS = (*IDENTITY_SEALED, RECEIPT_SEALED)


class NoReceiptKey(RuntimeError):
    """No current receipt key: run ``kzg-gateway init``."""


@dataclass(frozen=True)
class ReceiptKeyInfo:
    """A published receipt key (never the private part)."""

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


def _new_key_id(now: datetime) -> str:
    return f"receipt-{now:%Y%m%d}-{secrets.token_hex(4)}"


async def _insert_key(
    conn: AsyncConnection, master_key: MasterKey, now: datetime
) -> ReceiptKeyInfo:
    secret = AugSchemeMPL.key_gen(secrets.token_bytes(32))
    key_id = _new_key_id(now)
    info = ReceiptKeyInfo(
        key_id, bytes(secret.get_g1()).hex(), format_timestamp(now), None, CURRENT
    )
    await conn.execute(
        insert(receipt_keys).values(
            key_id=key_id,
            public_key=info.public_key,
            sealed_private_key=master_key.seal(bytes(secret), RECEIPT_SEALED.aad(key_id)),
            not_before=info.not_before,
            not_after=None,
            status=CURRENT,
        )
    )
    return info


async def rotate_receipt_key(
    engine: AsyncEngine, master_key: MasterKey, now: datetime | None = None
) -> ReceiptKeyInfo:
    """Make a new current receipt key; the previous one is retired (kept, so its
    receipts stay verifiable). Returns the new key."""
    now = now or datetime.now(UTC)
    async with engine.connect() as conn:
        await begin_write(conn)
        # First, as every sealing does: the master-key record is always locked before
        # any secret's row, so rotation and sealing cannot deadlock.
        await claim_master_key(conn, master_key)
        await conn.execute(
            update(receipt_keys)
            .where(receipt_keys.c.status == CURRENT)
            .values(status=RETIRED, not_after=format_timestamp(now))
        )
        info = await _insert_key(conn, master_key, now)
        await conn.commit()
    return info


async def ensure_receipt_key(engine: AsyncEngine, master_key: MasterKey) -> ReceiptKeyInfo | None:
    """Create the first receipt key unless a current one exists; return it when created."""
    async with engine.connect() as conn:
        await begin_write(conn)
        existing = (
            await conn.execute(
                select(receipt_keys.c.key_id).where(receipt_keys.c.status == CURRENT)
            )
        ).first()
        if existing is not None:
            await conn.rollback()
            return None
        await claim_master_key(conn, master_key)
        info = await _insert_key(conn, master_key, datetime.now(UTC))
        await conn.commit()
    return info


async def list_receipt_keys(engine: AsyncEngine) -> list[ReceiptKeyInfo]:
    """Every receipt key ever used, oldest first (retired keys stay listed)."""
    columns = [c for c in receipt_keys.c if c.name != "sealed_private_key"]
    async with engine.connect() as conn:
        rows = await conn.execute(select(*columns).order_by(receipt_keys.c.not_before))
        return [ReceiptKeyInfo(**row._mapping) for row in rows]


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


def output_digest(output: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a receipt's ``output``: the audit record's
    result digest, so the record and the receipt name the same result."""
    return hashlib.sha256(canonical_json(output).encode("utf-8")).hexdigest()


class ReceiptSigner:
    """The current receipt key of this process. Satisfies ``audit.signing.Signer``;
    ``refresh`` picks up a rotation done by another process or instance."""

    def __init__(self, engine: AsyncEngine, master_key: MasterKey) -> None:
        self._engine = engine
        self._master_key = master_key
        self._secret: PrivateKey | None = None
        self.key_id = ""
        self.public_key = b""
        self._lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._secret is not None

    async def refresh(self) -> bool:
        """Load the current key if it changed; True when it did. Raises NoReceiptKey."""
        async with self._lock, self._engine.connect() as conn:
            row = (
                await conn.execute(select(receipt_keys).where(receipt_keys.c.status == CURRENT))
            ).first()
        if row is None:
            raise NoReceiptKey("no current receipt key: run 'kzg-gateway init'")
        if row.key_id == self.key_id:
            return False
        raw = self._master_key.open(row.sealed_private_key, RECEIPT_SEALED.aad(row.key_id))
        self._secret = PrivateKey.from_bytes(raw)
        self.public_key = bytes.fromhex(row.public_key)
        self.key_id = row.key_id
        return True

    def sign(self, message: bytes) -> bytes:
        if self._secret is None:
            raise NoReceiptKey("the receipt key is not loaded")
        return bytes(AugSchemeMPL.sign(self._secret, message))

    def receipt(
        self,
        operation: str,
        request_id: str,
        audit_seq: int,
        input_sha256: dict[str, str],
        output: dict[str, Any],
        issued_at: datetime | None = None,
    ) -> dict[str, str]:
        """Return the signed receipt of one result."""
        message = canonical_json(
            {
                "operation": operation,
                "request_id": request_id,
                "audit_seq": audit_seq,
                "issued_at": format_timestamp(issued_at or datetime.now(UTC)),
                "input_sha256": input_sha256,
                "output": output,
            }
        )
        key_id = self.key_id
        signature = self.sign(message.encode("utf-8"))
        return {
            "key_id": key_id,
            "scheme": SCHEME,
            "message": message,
            "signature": "0x" + signature.hex(),
        }


class ReceiptResponse(web.Response):
    """A result whose body is finished only once its audit record is committed: the
    audit middleware calls ``complete(seq)``, so the receipt names the seq of the very
    record that carries this result's digest."""

    def __init__(
        self,
        signer: ReceiptSigner,
        ctx: RequestContext,
        operation: str,
        input_sha256: dict[str, str],
        output: dict[str, Any],
        receipt_output: dict[str, Any],
    ) -> None:
        super().__init__(status=200, content_type="application/json")
        self._signer = signer
        self._operation = operation
        self._request_id = ctx.request_id
        self._input_sha256 = input_sha256
        self._output = output
        self._receipt_output = receipt_output
        ctx.result_digest = output_digest(receipt_output)

    async def complete(self, audit_seq: int) -> None:
        # blspy releases the GIL while it signs: in a thread, the signature (~0.8 ms)
        # runs beside the event loop instead of stalling it.
        receipt = await asyncio.get_running_loop().run_in_executor(
            None,
            self._signer.receipt,
            self._operation,
            self._request_id,
            audit_seq,
            self._input_sha256,
            self._receipt_output,
        )
        self.body = json.dumps({**self._output, "receipt": receipt}).encode("utf-8")
