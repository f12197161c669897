"""Signed tree heads: ``sign_head`` signs a tree the migration built (once), every stored
head is a C2SP checkpoint of this log that opens with the log's verifier key and says
what its row says, and the database never takes a head that goes back nor changes one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import sign_head
from audit.events import format_timestamp
from audit.log import TreeHead, latest_tree_head, read_head
from audit.models import audit_tree_heads
from audit.signing import NoteLogSigner
from audit.tlog import Checkpoint
from audit.writer import AuditWriter
from gateway.db import migrate
from migrations import AUDIT_TARGETS
from tests.audit import reference_tlog as ref
from tests.audit.conftest import TEST_ORIGIN, AuditStore, make_engine
from tests.audit.helpers import make_event
from tests.audit.test_migration import Chain, chain_events, write_chain
from tests.audit.test_writer import assert_one_tree, read_entries, read_tree_heads
from tests.conftest import PgDatabase

EARLY = datetime(2026, 3, 1, 12, tzinfo=UTC)
LATER = datetime(2026, 3, 2, 12, tzinfo=UTC)
MIGRATED = 300


@pytest.fixture(params=["sqlite", "postgresql"])
async def migrated(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[AuditStore, Chain]:
    """A first-release chain of 300 records migrated to the tree: no signed head yet."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
        store, role = AuditStore("sqlite", url, url), None
    else:
        pg: PgDatabase = request.getfixturevalue("pg_database")
        store, role = AuditStore("postgresql", pg.owner_url, pg.app_url), pg.app_role
    await migrate(store.owner_url, role, target="audit@audit_0002")
    chain = await write_chain(store.owner_url, chain_events(MIGRATED), checkpoint_at=(MIGRATED,))
    await migrate(store.owner_url, role, target=AUDIT_TARGETS)
    return store, chain


@pytest.fixture
async def migrated_engine(migrated: tuple[AuditStore, Chain]) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(migrated[0].app_url)
    yield engine
    await engine.dispose()


async def test_sign_head_signs_the_migrated_tree_once(
    migrated: tuple[AuditStore, Chain], migrated_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    _, chain = migrated
    assert await read_tree_heads(migrated_engine) == []

    signed = await sign_head(migrated_engine, log_signer, EARLY)

    root = ref.tree_hash([entry.encode() for entry in chain.entries])
    # Ed25519 is deterministic: the note is exactly the key's signature of the checkpoint.
    assert signed == TreeHead(
        size=MIGRATED,
        root=root,
        issued_at=format_timestamp(EARLY),
        key_id=log_signer.key_id,
        note=log_signer.sign_note(Checkpoint(TEST_ORIGIN, MIGRATED, root).text()),
    )
    assert ref.open_checkpoint(signed.note, [log_signer.vkey]) == (TEST_ORIGIN, MIGRATED, root)
    assert await read_tree_heads(migrated_engine) == [signed]
    # Idempotent: the head is signed already, so a later call returns that same head.
    assert await sign_head(migrated_engine, log_signer, LATER) == signed
    assert await read_tree_heads(migrated_engine) == [signed]
    await assert_one_tree(migrated_engine, [log_signer.vkey], entries=chain.entries)


async def test_racing_sign_heads_store_one_head(
    migrated_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    # Several instances start at once over the migrated tree: each signs under the head
    # lock, so one stores the head and the others return it.
    heads = await asyncio.gather(*(sign_head(migrated_engine, log_signer, EARLY) for _ in range(4)))
    assert heads[0] is not None and all(h == heads[0] for h in heads)
    assert await read_tree_heads(migrated_engine) == [heads[0]]


async def test_sign_head_returns_what_the_writer_signed(
    app_engine: AsyncEngine, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    assert await sign_head(app_engine, log_signer, EARLY) is None  # nothing to sign yet
    assert await read_tree_heads(app_engine) == []

    results = [await writer.append(make_event(n)) for n in range(3)]
    stored = await read_tree_heads(app_engine)

    again = await sign_head(app_engine, log_signer, LATER)
    assert again is not None and again.note == results[-1].batch.checkpoint
    assert await read_tree_heads(app_engine) == stored
    assert [h.size for h in stored] == [1, 2, 3]


async def test_every_stored_note_opens_with_the_vkey_and_says_what_its_row_says(
    app_engine: AsyncEngine, writer: AuditWriter, log_signer: NoteLogSigner
) -> None:
    for burst in (1, 5, 2):
        await asyncio.gather(*(writer.append(make_event(n)) for n in range(burst)))
    heads = await read_tree_heads(app_engine)
    assert heads

    name, _, _ = ref.parse_vkey(log_signer.vkey)
    assert name == TEST_ORIGIN
    for head in heads:
        assert ref.open_checkpoint(head.note, [log_signer.vkey]) == (
            TEST_ORIGIN,
            head.size,
            head.root,
        )
        # The note is the checkpoint body, a blank line and one signature line by the key.
        body = Checkpoint(TEST_ORIGIN, head.size, head.root).text()
        assert head.note.startswith(body + "\n\u2014 " + TEST_ORIGIN + " ")
        assert head.note.count("\n") == 5
        assert head.key_id == log_signer.key_id
    stranger = NoteLogSigner.generate(TEST_ORIGIN)
    with pytest.raises(AssertionError, match="no verified signature"):
        ref.open_checkpoint(heads[-1].note, [stranger.vkey])
    async with app_engine.connect() as conn:
        assert await latest_tree_head(conn) == heads[-1]
        assert (await read_head(conn)).size == heads[-1].size


async def _insert_head(engine: AsyncEngine, head: TreeHead) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(audit_tree_heads).values(**asdict(head)))


async def test_the_database_refuses_a_head_that_goes_back(
    migrated: tuple[AuditStore, Chain], migrated_engine: AsyncEngine, log_signer: NoteLogSigner
) -> None:
    store, chain = migrated
    writer = AuditWriter(migrated_engine, log_signer)
    await writer.start()
    try:
        appended = await writer.append(make_event(MIGRATED))
    finally:
        await writer.stop()
    assert appended.size == MIGRATED + 1
    # The migrated size was never signed; a correctly signed head for it now comes too late.
    root = ref.tree_hash([entry.encode() for entry in chain.entries])
    late = TreeHead(
        size=MIGRATED,
        root=root,
        issued_at=format_timestamp(LATER),
        key_id=log_signer.key_id,
        note=log_signer.sign_note(Checkpoint(TEST_ORIGIN, MIGRATED, root).text()),
    )
    assert ref.open_checkpoint(late.note, [log_signer.vkey])[1] == MIGRATED

    owner = make_engine(store.owner_url)
    try:
        for engine in (migrated_engine, owner):
            with pytest.raises(DBAPIError, match="never goes back"):
                await _insert_head(engine, late)
        # sign_head signs the current head only, never a past size.
        assert (await sign_head(migrated_engine, log_signer, LATER)).size == MIGRATED + 1
    finally:
        await owner.dispose()
    heads = await read_tree_heads(migrated_engine)
    assert [h.size for h in heads] == [MIGRATED + 1]
    await assert_one_tree(
        migrated_engine, [log_signer.vkey], entries=await read_entries(migrated_engine)
    )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_tree_heads SET note = 'forged'",
        "UPDATE audit_tree_heads SET issued_at = '2000-01-01T00:00:00.000000Z'",
        "UPDATE audit_tree_heads SET root = (SELECT root FROM audit_tree_heads WHERE size = 1)",
        "UPDATE audit_tree_heads SET size = size + 10",
        "DELETE FROM audit_tree_heads",
    ],
)
async def test_a_stored_head_never_changes_for_any_role(
    audit_store: AuditStore,
    app_engine: AsyncEngine,
    writer: AuditWriter,
    log_signer: NoteLogSigner,
    statement: str,
) -> None:
    for n in range(3):
        await writer.append(make_event(n))
    before = await read_tree_heads(app_engine)
    # PostgreSQL's runtime role holds no UPDATE or DELETE at all; the triggers refuse
    # everyone else, the schema owner included.
    runtime_refusal = "permission denied" if audit_store.kind == "postgresql" else "append-only"
    owner = make_engine(audit_store.owner_url)
    try:
        for engine, refusal in ((app_engine, runtime_refusal), (owner, "append-only|refused")):
            with pytest.raises(DBAPIError, match=refusal):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
        if audit_store.kind == "postgresql":
            with pytest.raises(DBAPIError, match="TRUNCATE on audit_tree_heads refused"):
                async with owner.begin() as conn:
                    await conn.execute(text("TRUNCATE audit_tree_heads"))
    finally:
        await owner.dispose()
    assert await read_tree_heads(app_engine) == before
    await assert_one_tree(app_engine, [log_signer.vkey])
