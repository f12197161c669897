"""Signed checkpoints: an auditor's old checkpoint is provably extended by later heads."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from blspy import AugSchemeMPL, G1Element, G2Element
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import canonical_json
from audit.checkpoints import Checkpoint, issue_checkpoint, latest_checkpoint
from audit.export import export_lines
from audit.signing import checkpoint_message, sign_message
from audit.verify import verify_database, verify_export_lines
from audit.writer import AuditWriter
from tests.audit.helpers import BlsSigner, make_event

EARLY = datetime(2026, 3, 1, 12, tzinfo=UTC)
LATER = datetime(2026, 3, 2, 12, tzinfo=UTC)


async def test_checkpoint_signs_the_head_like_a_receipt(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    assert await issue_checkpoint(app_engine, signer, EARLY) is None

    head = None
    for n in range(3):
        head = await writer.append(make_event(n))
    checkpoint = await issue_checkpoint(app_engine, signer, EARLY)

    assert checkpoint is not None and head is not None
    assert (checkpoint.seq, checkpoint.hash) == (head.seq, head.hash)
    assert json.loads(checkpoint.message) == {
        "seq": head.seq,
        "hash": head.hash,
        "issued_at": "2026-03-01T12:00:00.000000Z",
    }
    assert checkpoint.message == canonical_json(json.loads(checkpoint.message))
    assert AugSchemeMPL.verify(
        G1Element.from_bytes(signer.public_key),
        checkpoint.message.encode(),
        G2Element.from_bytes(bytes.fromhex(checkpoint.signature)),
    )
    async with app_engine.connect() as conn:
        assert await latest_checkpoint(conn) == checkpoint
    # Nothing new since: the same head is not signed twice.
    assert await issue_checkpoint(app_engine, signer, LATER) == checkpoint


async def test_later_head_extends_an_earlier_checkpoint(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    for n in range(4):
        await writer.append(make_event(n))
    held = await issue_checkpoint(app_engine, signer, EARLY)
    for n in range(4, 9):
        await writer.append(make_event(n))
    later = await issue_checkpoint(app_engine, signer, LATER)
    assert held is not None and later is not None and later.seq == 9

    report = await verify_database(app_engine, public_keys=signer.keys, held=held)
    assert report.valid, report.reason
    assert report.head_seq == 9 and report.checkpoints == 2
    lines = [line async for line in export_lines(app_engine, LATER, signer.keys)]
    assert verify_export_lines(lines, held=held).valid


async def test_a_forked_checkpoint_is_not_extended(
    app_engine: AsyncEngine, writer: AuditWriter
) -> None:
    signer = BlsSigner()
    for n in range(4):
        await writer.append(make_event(n))
    real = await issue_checkpoint(app_engine, signer, EARLY)
    assert real is not None
    for n in range(4, 7):
        await writer.append(make_event(n))
    # A validly signed checkpoint for another history at seq 2 (a fork).
    fork_hash = "ab" * 32
    message = checkpoint_message(2, fork_hash, real.issued_at)
    fork = Checkpoint(2, fork_hash, real.issued_at, signer.key_id, message, "")
    fork = Checkpoint(**{**fork.to_dict(), "signature": sign_message(signer, message)})

    report = await verify_database(app_engine, public_keys=signer.keys, held=fork)
    assert not report.valid and report.first_bad_seq == 2
    lines = [line async for line in export_lines(app_engine, LATER, signer.keys)]
    assert verify_export_lines(lines, held=fork).first_bad_seq == 2
