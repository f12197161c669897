"""Retention prunes only old, checkpointed ranges, leaves a signed anchor, and the
remaining chain still verifies online and offline."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import issue_checkpoint
from audit.events import format_timestamp
from audit.export import export_lines
from audit.models import audit_anchors, audit_events
from audit.retention import RetentionPolicy, RetentionRefused, run_retention
from audit.verify import verify_database, verify_export_lines
from audit.writer import AuditWriter
from tests.audit.conftest import AuditStore, make_engine
from tests.audit.helpers import BlsSigner, make_event, tamper

OLD = datetime(2018, 5, 1, tzinfo=UTC)
RECENT = datetime(2026, 5, 1, tzinfo=UTC)
NOW = datetime(2026, 6, 1, tzinfo=UTC)
SEVEN_YEARS = RetentionPolicy()


async def _fill(writer: AuditWriter, old: int, recent: int) -> None:
    for n in range(old):
        await writer.append(make_event(n, occurred_at=OLD))
    for n in range(recent):
        await writer.append(make_event(old + n, occurred_at=RECENT))


async def _seqs(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return [r[0] for r in await conn.execute(select(audit_events.c.seq).order_by("seq"))]


def test_policy_file_defaults_to_seven_years(tmp_path: Path) -> None:
    shipped = RetentionPolicy.load(Path(__file__).parents[2] / "policies" / "retention.toml")
    assert shipped.keep_years == 7
    assert RetentionPolicy.load(tmp_path / "absent.toml").keep_years == 7
    custom = tmp_path / "retention.toml"
    custom.write_text("[audit]\nkeep_years = 10\n")
    assert RetentionPolicy.load(custom).cutoff(NOW) == datetime(2016, 6, 1, tzinfo=UTC)
    assert RetentionPolicy().cutoff(datetime(2028, 2, 29, tzinfo=UTC)).day == 28


async def test_nothing_leaves_without_a_checkpoint(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    await _fill(writer, old=3, recent=2)
    result = await run_retention(app_engine, BlsSigner(), SEVEN_YEARS, NOW)
    assert result.pruned == 0 and result.reason == "no checkpoint yet"
    assert await _seqs(app_engine) == [1, 2, 3, 4, 5]


async def test_prunes_old_checkpointed_range_and_the_rest_verifies(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    await _fill(writer, old=6, recent=4)
    await writer.append(make_event(50, occurred_at=OLD))  # old, but after recent records
    checkpoint = await issue_checkpoint(app_engine, signer, NOW)
    assert checkpoint is not None and checkpoint.seq == 11

    result = await run_retention(app_engine, signer, SEVEN_YEARS, NOW)

    # Records 1-6 are old; 7 is recent, so the leading old range ends at 6 (11 stays).
    assert (result.pruned, result.through_seq) == (6, 6)
    assert await _seqs(app_engine) == [7, 8, 9, 10, 11]
    report = await verify_database(app_engine, public_keys=signer.keys)
    assert report.valid, report.reason
    assert (report.checked, report.head_seq, report.anchors) == (5, 11, 1)
    lines = [line async for line in export_lines(app_engine, NOW, signer.keys)]
    assert verify_export_lines(lines).valid

    # The chain keeps growing from the anchor, and a second run has nothing to do.
    await writer.append(make_event(60))
    assert (await verify_database(app_engine, public_keys=signer.keys)).valid
    again = await run_retention(app_engine, signer, SEVEN_YEARS, NOW)
    assert again.pruned == 0


async def test_only_the_checkpointed_part_is_pruned(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    await _fill(writer, old=3, recent=0)
    assert (await issue_checkpoint(app_engine, signer, NOW)) is not None
    await _fill(writer, old=3, recent=1)

    first = await run_retention(app_engine, signer, SEVEN_YEARS, NOW)
    assert (first.pruned, first.through_seq) == (3, 3)
    await issue_checkpoint(app_engine, signer, NOW)
    second = await run_retention(app_engine, signer, SEVEN_YEARS, NOW)
    assert (second.pruned, second.through_seq) == (3, 6)

    assert await _seqs(app_engine) == [7]
    report = await verify_database(app_engine, public_keys=signer.keys)
    assert report.valid and report.anchors == 2 and report.checked == 1
    # A gateway whose clock runs years ahead still cannot prune what the database's
    # own clock calls young: the database's floor bounds the cutoff.
    later = datetime(2034, 1, 1, tzinfo=UTC)
    await issue_checkpoint(app_engine, signer, later)
    third = await run_retention(app_engine, signer, SEVEN_YEARS, later)
    assert third.pruned == 0 and await _seqs(app_engine) == [7]
    assert third.cutoff < format_timestamp(SEVEN_YEARS.cutoff(later))
    assert (await verify_database(app_engine, public_keys=signer.keys)).valid


async def test_a_forged_anchor_does_not_verify(
    audit_store: AuditStore, app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    await _fill(writer, old=4, recent=1)
    await issue_checkpoint(app_engine, signer, NOW)
    await run_retention(app_engine, signer, SEVEN_YEARS, NOW)
    await tamper(audit_store, "UPDATE audit_anchors SET pruned = 3")
    report = await verify_database(app_engine, public_keys=signer.keys)
    assert not report.valid and report.first_bad_seq == 5


async def test_tampered_range_is_refused_and_nothing_leaves(
    audit_store: AuditStore, app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    await _fill(writer, old=4, recent=1)
    await issue_checkpoint(app_engine, signer, NOW)
    await tamper(audit_store, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 2")

    with pytest.raises(RetentionRefused, match="seq 2"):
        await run_retention(app_engine, signer, SEVEN_YEARS, NOW)
    assert await _seqs(app_engine) == [1, 2, 3, 4, 5]
    async with app_engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(audit_anchors))).scalar() == 0


async def test_runtime_role_cannot_prune_outside_retention(pg_store: AuditStore) -> None:
    engine = make_engine(pg_store.app_url)
    writer = AuditWriter(engine)
    await writer.start()
    try:
        await _fill(writer, old=3, recent=0)
        async with engine.connect() as conn:
            row = (await conn.execute(select(audit_events).where(audit_events.c.seq == 2))).one()
        # Old records and the right hash, but no checkpoint covers them.
        with pytest.raises(DBAPIError, match="retention refused: no checkpoint"):
            async with engine.begin() as conn:
                await conn.execute(
                    text("SELECT audit_prune(2, :hash, 2, 2, :newest, 'now', 'k', 'm', 's')"),
                    {"hash": row.hash, "newest": row.occurred_at},
                )
        for statement in (
            "DELETE FROM audit_events WHERE seq = 1",
            "INSERT INTO audit_anchors (through_seq, hash, checkpoint_seq, pruned, issued_at, "
            "key_id, message, signature) VALUES (3, 'h', 3, 3, 'now', 'k', 'm', 's')",
        ):
            with pytest.raises(DBAPIError, match="permission denied"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
        assert await _seqs(engine) == [1, 2, 3]
    finally:
        await writer.stop()
        await engine.dispose()


async def test_checkpoints_and_retention_run_beside_live_appends(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    await _fill(writer, old=40, recent=0)
    stop = asyncio.Event()

    async def traffic() -> int:
        count = 0
        while not stop.is_set():
            await asyncio.gather(*(writer.append(make_event(n, occurred_at=NOW)) for n in range(8)))
            count += 8
        return count

    load = asyncio.create_task(traffic())
    await asyncio.sleep(0.05)
    await issue_checkpoint(app_engine, signer, NOW)
    first, second = await asyncio.gather(
        run_retention(app_engine, signer, SEVEN_YEARS, NOW),
        run_retention(app_engine, signer, SEVEN_YEARS, NOW),
    )
    await issue_checkpoint(app_engine, signer, NOW)
    stop.set()
    appended = await load

    assert appended > 0
    assert sorted([first.pruned, second.pruned]) == [0, 40]
    report = await verify_database(app_engine, public_keys=signer.keys)
    assert report.valid, report.reason
    assert report.head_seq == 40 + appended and report.checked == appended
