"""The database itself guards retention (migrations audit_0002, gateway_0002): the
runtime role cannot anchor and prune young records, whatever key it signs with, and
cannot change a receipt key's public key. The verifier says whose keys it trusted and
refuses anchors younger than the retention floor it is told about."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import issue_checkpoint
from audit.events import format_timestamp
from audit.export import export_lines
from audit.models import audit_anchors, audit_events
from audit.retention import RetentionPolicy, run_retention, store_retention_policy
from audit.signing import anchor_message, sign_message
from audit.verify import verify_database, verify_export_lines
from audit.writer import AuditWriter
from auth.crypto import MasterKey
from gateway.cli_audit import EXIT_INVALID, EXIT_VALID
from gateway.db import migrate
from gateway.receipts import list_receipt_keys, rotate_receipt_key
from tests.audit.conftest import AuditStore, make_engine
from tests.audit.helpers import BlsSigner, make_event
from tests.audit.test_cli import _run, _sync_url
from tests.conftest import PgDatabase

OLD = datetime(2018, 5, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AuditStore:
    """Every branch migrated (receipt_keys too), as ``kzg-gateway init`` does."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        await migrate(url)
        return AuditStore("sqlite", url, url)
    pg: PgDatabase = request.getfixturevalue("pg_database")
    await migrate(pg.owner_url, pg.app_role)
    return AuditStore("postgresql", pg.owner_url, pg.app_url)


@pytest.fixture
async def app(store: AuditStore) -> AsyncIterator[tuple[AsyncEngine, AuditWriter]]:
    engine = make_engine(store.app_url)
    writer = AuditWriter(engine)
    await writer.start()
    yield engine, writer
    await writer.stop()
    await engine.dispose()


async def _records(engine: AsyncEngine) -> list[tuple[int, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(select(audit_events.c.seq, audit_events.c.hash).order_by("seq"))
        return [(r.seq, r.hash) for r in rows]


async def _anchor_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(audit_anchors))).scalar())


async def _add_receipt_key(engine: AsyncEngine, signer: BlsSigner, status: str) -> None:
    """Insert a receipt key row as the runtime role (the private key is not needed here)."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO receipt_keys (key_id, public_key, sealed_private_key, not_before, "
                "status) VALUES (:key_id, :public_key, :sealed, :not_before, :status)"
            ),
            {
                "key_id": signer.key_id,
                "public_key": signer.public_key.hex(),
                "sealed": b"not a sealed key",
                "not_before": format_timestamp(datetime.now(UTC)),
                "status": status,
            },
        )


async def _prune_as_runtime(engine: AsyncEngine, signer: BlsSigner, **claim: object) -> None:
    """What a runtime-role intruder would do: sign an anchor and prune through it, by
    the path the database offers that role (audit_prune on PostgreSQL; on SQLite, where
    every connection may write, insert the anchor and delete)."""
    now = format_timestamp(datetime.now(UTC))
    message = anchor_message(
        claim["through_seq"],  # type: ignore[arg-type]
        claim["hash"],  # type: ignore[arg-type]
        claim["checkpoint_seq"],  # type: ignore[arg-type]
        claim["pruned"],  # type: ignore[arg-type]
        now,
        claim["newest_occurred_at"],  # type: ignore[arg-type]
    )
    anchor = {
        **claim,
        "issued_at": now,
        "key_id": signer.key_id,
        "message": message,
        "signature": sign_message(signer, message),
    }
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text(
                    "SELECT audit_prune(:through_seq, :hash, :checkpoint_seq, :pruned, "
                    ":newest_occurred_at, :issued_at, :key_id, :message, :signature)"
                ),
                anchor,
            )
        else:
            columns = ", ".join(anchor)
            values = ", ".join(f":{name}" for name in anchor)
            await conn.execute(
                text(f"INSERT INTO audit_anchors ({columns}) VALUES ({values})"), anchor
            )
            await conn.execute(
                text("DELETE FROM audit_events WHERE seq <= :through"),
                {"through": anchor["through_seq"]},
            )


async def test_the_reported_attack_fails_and_changes_nothing(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter]
) -> None:
    engine, writer = app
    gateway_key = BlsSigner("receipt-gateway")
    await _add_receipt_key(engine, gateway_key, "current")
    for n in range(5):
        await writer.append(make_event(n, occurred_at=datetime.now(UTC)))
    checkpoint = await issue_checkpoint(engine, gateway_key, datetime.now(UTC))
    assert checkpoint is not None and checkpoint.seq == 5
    before = await _records(engine)

    # Given an intruder holding the runtime role but no master key: it adds its own BLS
    # key to receipt_keys (rotation needs INSERT, so that still works)...
    intruder = BlsSigner("receipt-intruder")
    await _add_receipt_key(engine, intruder, "retired")
    # ...when it signs an anchor at the current head and prunes through it...
    head_seq, head_hash = before[-1]
    with pytest.raises(DBAPIError, match="younger than the retention floor"):
        await _prune_as_runtime(
            engine,
            intruder,
            through_seq=head_seq,
            hash=head_hash,
            checkpoint_seq=checkpoint.seq,
            pruned=head_seq,
            newest_occurred_at=format_timestamp(OLD),  # lying about the age changes nothing
        )
    if store.kind == "postgresql":
        # ...and the old single-argument prune and a direct anchor are gone too.
        with pytest.raises(DBAPIError, match="does not exist"):
            async with engine.begin() as conn:
                await conn.execute(text("SELECT audit_prune(5)"))
        with pytest.raises(DBAPIError, match="permission denied"):
            async with engine.begin() as conn:
                await conn.execute(
                    text(
                        "INSERT INTO audit_anchors (through_seq, hash, checkpoint_seq, pruned, "
                        "issued_at, key_id, message, signature) "
                        "VALUES (5, :hash, 5, 5, 'now', 'k', 'm', 's')"
                    ),
                    {"hash": head_hash},
                )

    # Then every record is still there and the chain verifies, even against the keys
    # the database supplies (which now include the intruder's).
    assert await _records(engine) == before
    assert await _anchor_count(engine) == 0
    for keys in (gateway_key.keys, None):
        report = await verify_database(engine, public_keys=keys)
        assert report.valid and report.checked == 5, report.reason
    assert report.keys_source == "database"


async def test_the_database_checks_every_part_of_an_anchor(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter]
) -> None:
    engine, writer = app
    gateway_key = BlsSigner()
    for n in range(3):
        await writer.append(make_event(n, occurred_at=OLD + timedelta(hours=n)))
    await writer.append(make_event(3, occurred_at=datetime.now(UTC)))
    checkpoint = await issue_checkpoint(engine, gateway_key, datetime.now(UTC))
    assert checkpoint is not None
    records = await _records(engine)
    old_end = {
        "through_seq": 3,
        "hash": records[2][1],
        "checkpoint_seq": checkpoint.seq,
        "pruned": 3,
        "newest_occurred_at": format_timestamp(OLD + timedelta(hours=2)),
    }
    refusals = [
        ({"through_seq": 4, "hash": records[3][1], "pruned": 4}, "younger than the retention"),
        ({"hash": records[1][1]}, "not the chain hash"),
        ({"through_seq": 9}, "beyond the chain head"),
        ({"pruned": 2}, "pruned does not count"),
        ({"checkpoint_seq": 2}, "no checkpoint"),
        ({"newest_occurred_at": format_timestamp(OLD)}, "newest_occurred_at"),
    ]
    for change, reason in refusals:
        with pytest.raises(DBAPIError, match=reason):
            await _prune_as_runtime(engine, gateway_key, **{**old_end, **change})
    assert await _records(engine) == records and await _anchor_count(engine) == 0

    # The honest anchor passes (old records, through a checkpoint), and only once.
    await _prune_as_runtime(engine, gateway_key, **old_end)
    assert [seq for seq, _ in await _records(engine)] == [4]
    with pytest.raises(DBAPIError, match="does not move past"):
        await _prune_as_runtime(engine, gateway_key, **old_end)
    assert (await verify_database(engine, public_keys=gateway_key.keys)).valid


async def test_retention_prunes_old_records_and_the_chain_verifies(
    app: tuple[AsyncEngine, AuditWriter],
) -> None:
    engine, writer = app
    signer = BlsSigner()
    for n in range(4):
        await writer.append(make_event(n, occurred_at=OLD))
    for n in range(4, 6):
        await writer.append(make_event(n, occurred_at=datetime.now(UTC)))
    now = datetime.now(UTC)
    await issue_checkpoint(engine, signer, now)

    result = await run_retention(engine, signer, RetentionPolicy(), now)

    assert (result.pruned, result.through_seq) == (4, 4)
    assert [seq for seq, _ in await _records(engine)] == [5, 6]
    floor = RetentionPolicy().cutoff(now)
    report = await verify_database(engine, public_keys=signer.keys, retention_floor=floor)
    assert report.valid and report.checked == 2 and report.anchors == 1, report.reason
    assert report.keys_source == "pinned"
    assert report.retention_floor == format_timestamp(floor)
    lines = [line async for line in export_lines(engine, now, signer.keys)]
    exported = verify_export_lines(lines, retention_floor=floor)
    assert exported.valid and exported.keys_source == "export"
    pinned = verify_export_lines(lines, trusted_keys=signer.keys, retention_floor=floor)
    assert pinned.valid and pinned.keys_source == "pinned"


async def test_the_floor_is_the_owners_and_the_database_clock_applies(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter]
) -> None:
    engine, writer = app
    signer = BlsSigner()
    two_years_ago = datetime.now(UTC) - timedelta(days=2 * 366)
    for n in range(3):
        await writer.append(make_event(n, occurred_at=two_years_ago))
    await issue_checkpoint(engine, signer, datetime.now(UTC))
    one_year = RetentionPolicy(keep_years=1)

    # Given a gateway whose own policy says one year, the database still holds seven.
    kept = await run_retention(engine, signer, one_year, datetime.now(UTC))
    assert kept.pruned == 0 and len(await _records(engine)) == 3
    if store.kind == "postgresql":
        with pytest.raises(DBAPIError, match="permission denied"):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE audit_retention SET keep_years = 1"))

    # When the owner (as ``init`` does) stores the one-year policy, the records go.
    owner = make_engine(store.owner_url)
    try:
        await store_retention_policy(owner, one_year)
    finally:
        await owner.dispose()
    pruned = await run_retention(engine, signer, one_year, datetime.now(UTC))
    assert pruned.pruned == 3 and await _records(engine) == []
    floor = one_year.cutoff(datetime.now(UTC))
    assert (await verify_database(engine, signer.keys, retention_floor=floor)).valid

    # A verifier told a longer retention (seven years) refuses that anchor.
    strict = RetentionPolicy().cutoff(datetime.now(UTC))
    report = await verify_database(engine, signer.keys, retention_floor=strict)
    assert not report.valid and report.first_bad_seq == 4
    assert "younger than the retention floor" in (report.reason or "")


async def test_an_anchor_without_an_age_verifies_only_when_no_floor_is_asked(
    app: tuple[AsyncEngine, AuditWriter],
) -> None:
    engine, writer = app
    signer = BlsSigner()
    for n in range(2):
        await writer.append(make_event(n, occurred_at=OLD))
    now = datetime.now(UTC)
    await issue_checkpoint(engine, signer, now)
    await run_retention(engine, signer, RetentionPolicy(), now)
    lines = [line async for line in export_lines(engine, now)]

    # An anchor as written before audit_0002: signed without newest_occurred_at.
    def older_format(line: str) -> str:
        item = json.loads(line)
        if item["type"] != "anchor":
            return line
        item["newest_occurred_at"] = None
        item["message"] = anchor_message(
            item["through_seq"],
            item["hash"],
            item["checkpoint_seq"],
            item["pruned"],
            item["issued_at"],
        )
        item["signature"] = sign_message(signer, item["message"])
        return json.dumps(item) + "\n"

    old_lines = [older_format(line) for line in lines]
    assert verify_export_lines(old_lines, trusted_keys=signer.keys).valid
    report = verify_export_lines(
        old_lines, trusted_keys=signer.keys, retention_floor=RetentionPolicy().cutoff(now)
    )
    assert not report.valid and report.reason == "retention anchor does not state its age"


async def test_receipt_keys_rotate_but_never_change_their_public_key(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter]
) -> None:
    engine, _ = app
    master_key = MasterKey(MasterKey.generate())
    first = await rotate_receipt_key(engine, master_key)
    second = await rotate_receipt_key(engine, master_key)
    keys = {k.key_id: k for k in await list_receipt_keys(engine)}
    assert keys[first.key_id].status == "retired" and keys[first.key_id].not_after
    assert keys[second.key_id].status == "current"

    intruder = BlsSigner()
    refused = "permission denied" if store.kind == "postgresql" else "never change"
    for change in ("public_key = :public_key", "key_id = 'receipt-intruder'"):
        with pytest.raises(DBAPIError, match=refused):
            async with engine.begin() as conn:
                await conn.execute(
                    text(f"UPDATE receipt_keys SET {change} WHERE key_id = :key_id"),
                    {"public_key": intruder.public_key.hex(), "key_id": first.key_id},
                )
    # The trigger holds for every role, the schema owner included.
    owner = make_engine(store.owner_url)
    try:
        with pytest.raises(DBAPIError, match="never change"):
            async with owner.begin() as conn:
                await conn.execute(
                    text("UPDATE receipt_keys SET public_key = :public_key WHERE key_id = :id"),
                    {"public_key": intruder.public_key.hex(), "id": second.key_id},
                )
    finally:
        await owner.dispose()
    after = {k.key_id: k.public_key for k in await list_receipt_keys(engine)}
    assert after == {first.key_id: first.public_key, second.key_id: second.public_key}


async def test_cli_says_whose_keys_it_used_and_applies_the_floor(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter]
) -> None:
    engine, writer = app
    signer = BlsSigner()
    for n in range(2):
        await writer.append(make_event(n, occurred_at=datetime.now(UTC) - timedelta(days=800)))
    owner = make_engine(store.owner_url)
    try:
        await store_retention_policy(owner, RetentionPolicy(keep_years=2))
    finally:
        await owner.dispose()
    now = datetime.now(UTC)
    await issue_checkpoint(engine, signer, now)
    assert (await run_retention(engine, signer, RetentionPolicy(keep_years=2), now)).pruned == 2
    source = ("audit", "verify", "--db-url", _sync_url(store.app_url))
    pinned = ("--key", f"{signer.key_id}={signer.public_key.hex()}")

    code, out = await asyncio.to_thread(_run, *source)
    assert code == EXIT_INVALID  # the test signer is not in receipt_keys
    code, out = await asyncio.to_thread(_run, *source, *pinned, "--keep-years", "2")
    assert code == EXIT_VALID and "against the pinned keys" in out, out
    code, out = await asyncio.to_thread(_run, *source, *pinned, "--keep-years", "3", "--json")
    assert code == EXIT_INVALID and json.loads(out)["retention_floor"] is not None
    assert "younger than the retention floor" in json.loads(out)["reason"]

    await _add_receipt_key(engine, signer, "current")
    code, out = await asyncio.to_thread(_run, *source)
    assert code == EXIT_VALID and "keys read from the database being verified" in out, out
