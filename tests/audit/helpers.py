"""Small builders shared by the audit tests."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from blspy import AugSchemeMPL
from sqlalchemy import text

from audit.events import AuditEvent
from tests.audit.conftest import AuditStore, make_engine


def make_event(n: int = 0, **overrides: object) -> AuditEvent:
    """An event that looks like a verified-proof request; ``n`` varies its content."""
    values: dict[str, object] = {
        "request_id": f"req-{n}",
        "occurred_at": datetime(2026, 1, 2, 3, 4, 5, n % 1_000_000, tzinfo=UTC),
        "actor": f"apikey:{n % 3}",
        "role": "client",
        "action": "verify_kzg_proof",
        "outcome": "success",
        "http_status": 200,
        "client_addr": "127.0.0.1",
        "tls_version": "TLSv1.3",
        "method": "POST",
        "path": "/v1/kzg/verify-proof",
        "input_digests": {"commitment": f"{n:064x}"},
        "result_digest": f"{n + 1:064x}",
        "latency_ms": 1.25 + n,
        "detail": {"note": "ünïcode ok", "n": n},
    }
    values.update(overrides)
    return AuditEvent(**values)  # type: ignore[arg-type]


class BlsSigner:
    """A real receipt-style signer (blspy AugSchemeMPL) with a fresh key."""

    def __init__(self, key_id: str = "receipt-test-1") -> None:
        self._secret = AugSchemeMPL.key_gen(secrets.token_bytes(32))
        self.key_id = key_id
        self.public_key = bytes(self._secret.get_g1())

    def sign(self, message: bytes) -> bytes:
        return bytes(AugSchemeMPL.sign(self._secret, message))

    @property
    def keys(self) -> dict[str, bytes]:
        return {self.key_id: self.public_key}


AUDIT_TABLES = (
    "audit_events",
    "audit_tree",
    "audit_tree_heads",
    "audit_log_head",
    "audit_legacy_chain",
    "audit_checkpoints",
    "audit_anchors",
)
# A statement, or one with bound parameters.
Statement = str | tuple[str, dict[str, Any]]


async def tamper(store: AuditStore, *statements: Statement) -> None:
    """Rewrite history as the database owner would: switch the guards off, then write."""
    engine = make_engine(store.owner_url)
    try:
        async with engine.begin() as conn:
            if store.kind == "sqlite":
                names = await conn.execute(
                    text("SELECT name FROM sqlite_master WHERE type = 'trigger'")
                )
                for (name,) in list(names):
                    await conn.execute(text(f"DROP TRIGGER {name}"))
            else:
                for table in AUDIT_TABLES:
                    await conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            for statement in statements:
                if isinstance(statement, str):
                    await conn.exec_driver_sql(statement)
                else:
                    await conn.execute(text(statement[0]), statement[1])
    finally:
        await engine.dispose()


@contextlib.contextmanager
def sqlite_write_lock(url: str) -> Iterator[Callable[[], None]]:
    """Another process holds the SQLite database's write lock, as a stuck writer would
    (readers still read in WAL mode); yields the function that releases it."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(60)",
            url.split("///", 1)[1],
        ],
        stdout=subprocess.PIPE,
        text=True,
    )

    def release() -> None:
        holder.kill()
        holder.wait()

    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield release
    finally:
        release()
        if holder.stdout is not None:
            holder.stdout.close()
