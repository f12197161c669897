"""The audit branch's migrations on both databases, and above all audit_0003: a log written
by the first release (a hash chain with BLS checkpoints) becomes an RFC 9162 tree whose
leaves are exactly the entries the chain hashed, and a chain retention already pruned is
refused without touching it.

The chain is written here as the first release wrote it, row by row with its own
columns (``prev_hash``, ``hash`` from ``audit.chain.chain_hash``), not by today's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.chain import GENESIS_HASH, canonical_json, chain_hash, record_for
from audit.checkpoints import LegacyCheckpoint, legacy_checkpoints, sign_head
from audit.events import EVENT_FIELDS, AuditEvent, format_timestamp
from audit.log import consistency_proof, inclusion_proof, read_head
from audit.merkle import CompactRange, leaf_hash, root_from_leaves
from audit.models import audit_legacy_chain, audit_tree_heads, columns_for
from audit.signing import NoteLogSigner, bls_signature_valid, legacy_checkpoint_message
from audit.writer import AuditWriter
from gateway.db import alembic_config, migrate
from migrations import AUDIT_TARGETS
from tests.audit import reference_tlog as ref
from tests.audit.conftest import TEST_ORIGIN, AuditStore, make_engine, migrate_audit
from tests.audit.helpers import AUDIT_TABLES, BlsSigner, make_event
from tests.audit.test_writer import (
    assert_one_tree,
    assert_receipts,
    assert_stored_hashes,
    read_entries,
)
from tests.conftest import PgDatabase

BEFORE_TREE = "audit@audit_0002"
HEAD = AUDIT_TARGETS
TREE_TABLES = {*AUDIT_TABLES, "audit_retention"}
CHAIN_TABLES = {"audit_events", "audit_chain_head", "audit_checkpoints", "audit_anchors"}
LONG_AGO = datetime(2012, 3, 4, 5, 6, 7, tzinfo=UTC)

# The first release's tables, with the columns it wrote.
OLD_EVENTS = sa.table(
    "audit_events",
    *(sa.column(name) for name in ("seq", "prev_hash", "hash", *EVENT_FIELDS)),
)
OLD_CHAIN_HEAD = sa.table("audit_chain_head", sa.column("id"), sa.column("seq"), sa.column("hash"))
OLD_CHECKPOINTS = sa.table(
    "audit_checkpoints",
    *(sa.column(n) for n in ("seq", "hash", "issued_at", "key_id", "message", "signature")),
)


@dataclass(frozen=True)
class Fresh:
    """An empty database, not migrated yet."""

    kind: str
    owner_url: str
    app_url: str
    app_role: str | None


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Fresh:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'audit.db'}"
        return Fresh("sqlite", url, url, None)
    pg: PgDatabase = request.getfixturevalue("pg_database")
    return Fresh("postgresql", pg.owner_url, pg.app_url, pg.app_role)


@dataclass
class Chain:
    """A log as the first release left it."""

    entries: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)  # the chain hash at seq i + 1
    checkpoints: list[LegacyCheckpoint] = field(default_factory=list)

    @property
    def head(self) -> tuple[int, str]:
        return len(self.hashes), self.hashes[-1] if self.hashes else GENESIS_HASH


async def write_chain(
    owner_url: str,
    events: list[AuditEvent],
    *,
    checkpoint_at: tuple[int, ...] = (),
    bls: BlsSigner | None = None,
) -> Chain:
    """Append ``events`` to a database at audit_0002 as the first release did: each row
    with prev_hash and its chain hash, the chain head moved onto the last, and BLS
    checkpoints (the receipt key's) at the given seqs."""
    chain = Chain()
    rows = []
    previous = GENESIS_HASH
    for seq, event in enumerate(events, start=1):
        fields = event.fields()
        record = record_for(seq, fields)
        current = chain_hash(previous, record)
        rows.append({"seq": seq, "prev_hash": previous, "hash": current, **columns_for(fields)})
        chain.entries.append(canonical_json(record))
        chain.hashes.append(current)
        previous = current
    bls = bls or BlsSigner()
    for seq in checkpoint_at:
        issued_at = format_timestamp(datetime(2020, 1, 1, tzinfo=UTC))
        message = legacy_checkpoint_message(seq, chain.hashes[seq - 1], issued_at)
        signature = bls.sign(message.encode()).hex()
        chain.checkpoints.append(
            LegacyCheckpoint(seq, chain.hashes[seq - 1], issued_at, bls.key_id, message, signature)
        )
    engine = make_engine(owner_url)
    try:
        async with engine.begin() as conn:
            if rows:
                await conn.execute(OLD_EVENTS.insert(), rows)
            seq, head = chain.head
            # The 0001 trigger lets the head move only onto a stored record with that hash.
            await conn.execute(
                OLD_CHAIN_HEAD.update().where(OLD_CHAIN_HEAD.c.id == 1).values(seq=seq, hash=head)
            )
            for checkpoint in chain.checkpoints:
                await conn.execute(OLD_CHECKPOINTS.insert().values(**checkpoint.to_dict()))
    finally:
        await engine.dispose()
    return chain


def chain_events(count: int) -> list[AuditEvent]:
    """Varied records: non-ASCII, escaped NUL, nulls, nested details."""
    events = []
    for n in range(count):
        if n % 7 == 3:
            events.append(make_event(n, actor=None, role=None, http_status=None, latency_ms=None))
        elif n % 11 == 5:
            events.append(make_event(n, path=f"/ü/\x00/{n}", detail={"z": [n, {"b": "é"}]}))
        else:
            events.append(make_event(n))
    return events


async def _version(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT version_num FROM alembic_version"))
        return {row[0] for row in rows if row[0].startswith("audit_")}


def _tables(connection: Connection) -> set[str]:
    return {name for name in inspect(connection).get_table_names() if name.startswith("audit_")}


def _columns(connection: Connection, table: str) -> set[str]:
    return {column["name"] for column in inspect(connection).get_columns(table)}


def _downgrade(connection: Connection, target: str) -> None:
    command.downgrade(alembic_config(connection), target)


async def test_head_has_the_tree_tables_and_audit_0003_cannot_be_undone(
    audit_store: AuditStore,
) -> None:
    engine = make_engine(audit_store.owner_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == TREE_TABLES
            columns = await conn.run_sync(_columns, "audit_events")
        assert columns == {"seq", *EVENT_FIELDS}
        with pytest.raises(RuntimeError, match="not reversible"):
            async with engine.begin() as conn:
                await conn.run_sync(_downgrade, "audit@audit_0002")
        assert await _version(engine) == {"audit_0003", "audit_0004"}
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == TREE_TABLES
    finally:
        await engine.dispose()


async def test_audit_0004_goes_down_and_up_again(audit_store: AuditStore) -> None:
    engine = make_engine(audit_store.owner_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "audit_v2@base")
        assert await _version(engine) == {"audit_0003"}
    finally:
        await engine.dispose()
    await migrate_audit(audit_store.owner_url)
    engine = make_engine(audit_store.owner_url)
    try:
        assert await _version(engine) == {"audit_0003", "audit_0004"}
    finally:
        await engine.dispose()


async def test_the_chain_migrations_still_go_up_and_down(fresh: Fresh) -> None:
    await migrate(fresh.owner_url, fresh.app_role, target=BEFORE_TREE)
    engine = make_engine(fresh.owner_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == CHAIN_TABLES | {"audit_retention"}
        async with engine.begin() as conn:
            await conn.run_sync(_downgrade, "audit@base")
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == set()
    finally:
        await engine.dispose()


async def test_a_chain_becomes_the_tree_of_the_same_entries(fresh: Fresh) -> None:
    await migrate(fresh.owner_url, fresh.app_role, target=BEFORE_TREE)
    bls = BlsSigner()
    # 600 records: two complete tiles of 256 (level-8 rows) and a partial one.
    chain = await write_chain(
        fresh.owner_url, chain_events(600), checkpoint_at=(1, 256, 600), bls=bls
    )

    await migrate(fresh.owner_url, fresh.app_role, target=HEAD)

    engine = make_engine(fresh.app_url)
    try:
        leaves = [leaf_hash(entry.encode()) for entry in chain.entries]
        async with engine.connect() as conn:
            head = await read_head(conn)
            legacy = (await conn.execute(select(audit_legacy_chain))).one()
            old_checkpoints = await legacy_checkpoints(conn)
            signed = (await conn.execute(select(audit_tree_heads))).all()
            columns = await conn.run_sync(_columns, "audit_events")
        assert head.size == 600
        assert head.root == root_from_leaves(leaves)
        assert head.root == ref.tree_hash([entry.encode() for entry in chain.entries])
        compact = CompactRange()
        for leaf in leaves:
            compact.append(leaf)
        assert head.compact == compact.to_bytes()
        # The chain's head is kept, and its BLS checkpoints still verify against it.
        assert (legacy.id, legacy.through_seq, legacy.hash) == (1, *chain.head)
        assert old_checkpoints == chain.checkpoints
        for checkpoint in old_checkpoints:
            assert bls_signature_valid(
                bls.keys, checkpoint.key_id, checkpoint.message, checkpoint.signature
            )
        assert old_checkpoints[-1].hash == legacy.hash
        # The entries are the bytes the chain hashed; the chain's columns are gone.
        assert columns == {"seq", *EVENT_FIELDS}
        assert await read_entries(engine) == chain.entries
        await assert_stored_hashes(engine, chain.entries)
        assert signed == []  # the first signed tree head is the gateway's to make

        # The tree goes on: its head signed as serve does, then appends; proofs of the
        # migrated leaves come from the hashes the migration stored.
        log_signer = NoteLogSigner.generate(TEST_ORIGIN)
        first = await sign_head(engine, log_signer, datetime.now(UTC))
        assert first is not None and (first.size, first.root) == (600, head.root)
        writer = AuditWriter(engine, log_signer)
        await writer.start()
        try:
            results = [await writer.append(make_event(n)) for n in range(600, 603)]
        finally:
            await writer.stop()
        assert [r.seq for r in results] == [601, 602, 603]
        assert_receipts(results, [log_signer.vkey])
        entries = await read_entries(engine)
        heads = await assert_one_tree(engine, [log_signer.vkey], entries=entries)
        assert [h.size for h in heads] == [600, 601, 602, 603]
        async with engine.connect() as conn:
            for index in (0, 255, 256, 511, 599):
                proof = await inclusion_proof(conn, index, 603)
                assert ref.verify_inclusion(leaves[index], index, 603, proof, heads[-1].root)
            proof = await consistency_proof(conn, 600, 603)
        assert ref.verify_consistency(600, 603, head.root, heads[-1].root, proof)
    finally:
        await engine.dispose()


async def test_an_empty_chain_becomes_an_empty_tree(fresh: Fresh) -> None:
    await migrate(fresh.owner_url, fresh.app_role, target=BEFORE_TREE)
    await migrate(fresh.owner_url, fresh.app_role, target=HEAD)

    engine = make_engine(fresh.app_url)
    log_signer = NoteLogSigner.generate(TEST_ORIGIN)
    try:
        async with engine.connect() as conn:
            head = await read_head(conn)
            legacy = (await conn.execute(select(audit_legacy_chain))).one()
        assert (head.size, head.root, head.compact) == (0, ref.tree_hash([]), b"")
        assert (legacy.through_seq, legacy.hash) == (0, GENESIS_HASH)
        assert await sign_head(engine, log_signer, datetime.now(UTC)) is None
        writer = AuditWriter(engine, log_signer)
        await writer.start()
        try:
            result = await writer.append(make_event(1))
        finally:
            await writer.stop()
        assert result.seq == 1
        assert_receipts([result], [log_signer.vkey])
        await assert_one_tree(engine, [log_signer.vkey])
    finally:
        await engine.dispose()


async def _prune_the_old_way(owner_url: str, chain: Chain, through: int, checkpoint: int) -> None:
    """What the first release's retention did: a guarded anchor, then the delete."""
    newest = format_timestamp(LONG_AGO)
    anchor = {
        "through_seq": through,
        "hash": chain.hashes[through - 1],
        "checkpoint_seq": checkpoint,
        "pruned": through,
        "newest_occurred_at": newest,
        "issued_at": format_timestamp(datetime.now(UTC)),
        "key_id": "receipt-test-1",
        "message": canonical_json({"type": "audit_anchor", "through_seq": through}),
        "signature": "00",
    }
    engine = make_engine(owner_url)
    try:
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
                    text("DELETE FROM audit_events WHERE seq <= :through"), {"through": through}
                )
    finally:
        await engine.dispose()


async def _assert_chain_guarded(owner_url: str, remaining: list[int]) -> None:
    """The first release's guards still hold, for the owner too."""
    engine = make_engine(owner_url)
    try:
        for statement in (
            "UPDATE audit_events SET outcome = 'denied'",
            f"DELETE FROM audit_events WHERE seq = {remaining[-1]}",
            "UPDATE audit_chain_head SET seq = 0",
            "DELETE FROM audit_chain_head",
            "UPDATE audit_checkpoints SET signature = '00'",
        ):
            with pytest.raises(DBAPIError, match=r"append-only|refused|moves forward"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))
        async with engine.connect() as conn:
            seqs = [r[0] for r in await conn.execute(text("SELECT seq FROM audit_events"))]
        assert sorted(seqs) == remaining
    finally:
        await engine.dispose()


async def test_a_chain_retention_already_pruned_is_refused_and_left_as_it_was(
    fresh: Fresh,
) -> None:
    await migrate(fresh.owner_url, fresh.app_role, target=BEFORE_TREE)
    events = [make_event(n, occurred_at=LONG_AGO) for n in range(5)]
    chain = await write_chain(fresh.owner_url, events, checkpoint_at=(5,))
    await _prune_the_old_way(fresh.owner_url, chain, through=3, checkpoint=5)

    with pytest.raises(RuntimeError, match="already pruned"):
        await migrate(fresh.owner_url, fresh.app_role, target=HEAD)

    engine = make_engine(fresh.owner_url)
    try:
        assert await _version(engine) == {"audit_0002"}
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) == CHAIN_TABLES | {"audit_retention"}
            assert await conn.run_sync(_columns, "audit_events") >= {"prev_hash", "hash"}
    finally:
        await engine.dispose()
    await _assert_chain_guarded(fresh.owner_url, [4, 5])


async def test_a_chain_with_a_gap_is_refused(fresh: Fresh) -> None:
    await migrate(fresh.owner_url, fresh.app_role, target=BEFORE_TREE)
    chain = await write_chain(
        fresh.owner_url, [make_event(n) for n in range(3)], checkpoint_at=(3,)
    )
    # A record inserted past a gap (the chain head moves onto any stored record).
    engine = make_engine(fresh.owner_url)
    try:
        async with engine.begin() as conn:
            fields = make_event(9).fields()
            record_hash = chain_hash(chain.hashes[-1], record_for(5, fields))
            await conn.execute(
                OLD_EVENTS.insert().values(
                    seq=5, prev_hash=chain.hashes[-1], hash=record_hash, **columns_for(fields)
                )
            )
            await conn.execute(
                OLD_CHAIN_HEAD.update()
                .where(OLD_CHAIN_HEAD.c.id == 1)
                .values(seq=5, hash=record_hash)
            )
    finally:
        await engine.dispose()

    with pytest.raises(RuntimeError, match="not gapless at seq 4"):
        await migrate(fresh.owner_url, fresh.app_role, target=HEAD)

    engine = make_engine(fresh.owner_url)
    try:
        assert await _version(engine) == {"audit_0002"}
    finally:
        await engine.dispose()
    await _assert_chain_guarded(fresh.owner_url, [1, 2, 3, 5])
