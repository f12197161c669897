"""The database itself guards retention (migrations audit_0002 and audit_0003) and the
keys (gateway_0002, gateway_0003): whoever holds the runtime role, whatever key it signs
with, cannot anchor and prune young records, nor an anchor whose tree head, counts or
times are not the range's; on PostgreSQL it can prune only through ``audit_prune``; and
no key's identity or public key ever changes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.events import format_timestamp
from audit.merkle import EMPTY_ROOT
from audit.models import audit_anchors, audit_events
from audit.retention import (
    RetentionPolicy,
    database_floor,
    run_retention,
    store_retention_policy,
)
from audit.signing import NoteLogSigner, anchor_text
from audit.tlog import Checkpoint
from audit.verify import verify_database
from audit.writer import AuditWriter
from auth.crypto import MasterKey
from gateway.db import migrate
from gateway.receipts import list_log_keys, rotate_log_key
from tests.audit import reference_tlog as ref
from tests.audit.conftest import TEST_ORIGIN, AuditStore, make_engine
from tests.audit.helpers import BlsSigner, make_event
from tests.audit.test_retention import assert_anchor
from tests.audit.test_writer import assert_one_tree, read_entries, read_tree_heads
from tests.conftest import PgDatabase

OLD = datetime(2018, 5, 1, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AuditStore:
    """Every branch migrated (log_keys and receipt_keys too), as ``kzg-gateway init`` does."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        await migrate(url)
        return AuditStore("sqlite", url, url)
    pg: PgDatabase = request.getfixturevalue("pg_database")
    await migrate(pg.owner_url, pg.app_role)
    return AuditStore("postgresql", pg.owner_url, pg.app_url)


@pytest.fixture
async def app(
    store: AuditStore, log_signer: NoteLogSigner
) -> AsyncIterator[tuple[AsyncEngine, AuditWriter]]:
    engine = make_engine(store.app_url)
    writer = AuditWriter(engine, log_signer)
    await writer.start()
    yield engine, writer
    await writer.stop()
    await engine.dispose()


async def _seqs(engine: AsyncEngine) -> list[int]:
    async with engine.connect() as conn:
        return [r[0] for r in await conn.execute(select(audit_events.c.seq).order_by("seq"))]


async def _anchor_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(audit_anchors))).scalar())


async def _prune_as_runtime(engine: AsyncEngine, signer: NoteLogSigner, **claim: object) -> None:
    """What a runtime-role intruder would do: sign an anchor with a key of its own and
    prune through it, by the path the database offers that role (audit_prune on
    PostgreSQL; on SQLite, where every connection may write, insert the anchor and delete)."""
    issued_at = format_timestamp(datetime.now(UTC))
    compact = str(claim.get("compact", ""))
    note = signer.sign_note(
        anchor_text(
            claim["through_seq"],  # type: ignore[arg-type]
            claim["tree_size"],  # type: ignore[arg-type]
            claim["pruned"],  # type: ignore[arg-type]
            claim["newest_occurred_at"],  # type: ignore[arg-type]
            issued_at,
            compact,
        )
    )
    anchor = {
        **claim,
        "issued_at": issued_at,
        "compact": compact,
        "key_id": signer.key_id,
        "note": note,
    }
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(
                text(
                    "SELECT audit_prune(:through_seq, :tree_size, :pruned, :newest_occurred_at, "
                    ":issued_at, :compact, :key_id, :note)"
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
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter], log_signer: NoteLogSigner
) -> None:
    engine, writer = app
    for n in range(5):
        await writer.append(make_event(n, occurred_at=datetime.now(UTC)))
    entries = await read_entries(engine)
    heads = await read_tree_heads(engine)

    # Given an intruder holding the runtime role but no master key: it publishes a log key
    # of its own (rotation needs INSERT on log_keys, so that still works)...
    intruder = NoteLogSigner.generate(TEST_ORIGIN)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO log_keys (key_id, vkey, sealed_private_key, not_before, status) "
                "VALUES (:key_id, :vkey, :sealed, :not_before, 'retired')"
            ),
            {
                "key_id": "log-intruder",
                "vkey": intruder.vkey,
                "sealed": b"not a sealed key",
                "not_before": format_timestamp(datetime.now(UTC)),
            },
        )
    # ...when it signs an anchor over the whole tree and prunes through it, lying about
    # the age of what it prunes...
    with pytest.raises(DBAPIError, match="younger than the retention floor"):
        await _prune_as_runtime(
            engine,
            intruder,
            through_seq=5,
            tree_size=5,
            pruned=5,
            newest_occurred_at=format_timestamp(OLD),
        )
    if store.kind == "postgresql":
        # ...and the first release's prune functions and the direct ways are gone too.
        for call in (
            "SELECT audit_prune(5)",
            "SELECT audit_prune(5, 'h', 5, 5, 'x', 'now', 'k', 'm', 's')",
        ):
            with pytest.raises(DBAPIError, match="does not exist"):
                async with engine.begin() as conn:
                    await conn.execute(text(call))
        for statement in (
            "INSERT INTO audit_anchors (through_seq, tree_size, pruned, newest_occurred_at, "
            "issued_at, compact, key_id, note) VALUES (5, 5, 5, 'x', 'now', '', 'k', 'n')",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
        ):
            with pytest.raises(DBAPIError, match="permission denied"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement))

    # Then every record and every tree head is still there, and the tree still proves.
    assert await _seqs(engine) == [1, 2, 3, 4, 5]
    assert await _anchor_count(engine) == 0
    assert await read_tree_heads(engine) == heads
    await assert_one_tree(engine, [log_signer.vkey], entries=entries)


async def test_the_database_checks_every_part_of_an_anchor(
    app: tuple[AsyncEngine, AuditWriter], log_signer: NoteLogSigner
) -> None:
    engine, writer = app
    for n in range(3):
        await writer.append(make_event(n, occurred_at=OLD + timedelta(hours=n)))
    await writer.append(make_event(3, occurred_at=datetime.now(UTC)))
    assert [h.size for h in await read_tree_heads(engine)] == [1, 2, 3, 4]
    honest = {
        "through_seq": 3,
        "tree_size": 4,
        "pruned": 3,
        "newest_occurred_at": format_timestamp(OLD + timedelta(hours=2)),
    }
    refusals = [
        ({"through_seq": 4, "pruned": 4}, "younger than the retention floor"),
        ({"tree_size": 9}, "no signed tree head covers"),
        # A signed head exists at 2, but it does not cover seq 3.
        ({"tree_size": 2}, "no signed tree head covers"),
        ({"through_seq": 9, "pruned": 9}, "no signed tree head covers"),
        ({"pruned": 2}, "pruned does not count"),
        ({"through_seq": 2}, "pruned does not count"),
        ({"newest_occurred_at": format_timestamp(OLD)}, "newest_occurred_at"),
        ({"through_seq": 0, "pruned": 0}, "does not move past"),
    ]
    for change, reason in refusals:
        with pytest.raises(DBAPIError, match=reason):
            await _prune_as_runtime(engine, log_signer, **{**honest, **change})
    assert await _seqs(engine) == [1, 2, 3, 4] and await _anchor_count(engine) == 0

    # The honest anchor passes (old records, under a signed head), and only once.
    await _prune_as_runtime(engine, log_signer, **honest)
    assert await _seqs(engine) == [4]
    with pytest.raises(DBAPIError, match="does not move past"):
        await _prune_as_runtime(engine, log_signer, **honest)
    # With the range gone, deleting a retained record is refused again.
    with pytest.raises(DBAPIError, match=r"refused|permission denied"):
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM audit_events WHERE seq = 4"))
    assert await _seqs(engine) == [4]


async def test_retention_through_the_guarded_path_leaves_a_tree_that_proves(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter], log_signer: NoteLogSigner
) -> None:
    engine, writer = app
    for n in range(4):
        await writer.append(make_event(n, occurred_at=OLD))
    for n in range(4, 6):
        await writer.append(make_event(n, occurred_at=datetime.now(UTC)))
    entries = await read_entries(engine)
    now = datetime.now(UTC)

    result = await run_retention(engine, log_signer, RetentionPolicy(), now)

    assert (result.pruned, result.through_seq) == (4, 4)
    assert await _seqs(engine) == [5, 6]
    async with engine.connect() as conn:
        anchor = dict((await conn.execute(select(audit_anchors))).one()._mapping)
        floor = await database_floor(conn)
    assert_anchor(
        anchor, log_signer, entries, through=4, tree_size=6, pruned=4, newest=OLD, issued=now
    )
    assert anchor["newest_occurred_at"] < floor
    assert result.cutoff <= floor
    await assert_one_tree(engine, [log_signer.vkey], entries=entries)


async def test_the_floor_is_the_owners_and_the_database_clock_applies(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter], log_signer: NoteLogSigner
) -> None:
    engine, writer = app
    two_years_ago = datetime.now(UTC) - timedelta(days=2 * 366)
    for n in range(3):
        await writer.append(make_event(n, occurred_at=two_years_ago))
    entries = await read_entries(engine)
    one_year = RetentionPolicy(keep_years=1)

    # Given a gateway whose own policy says one year, the database still holds seven.
    kept = await run_retention(engine, log_signer, one_year, datetime.now(UTC))
    assert (kept.pruned, kept.reason) == (0, "nothing older than the policy")
    assert await _seqs(engine) == [1, 2, 3]
    if store.kind == "postgresql":
        with pytest.raises(DBAPIError, match="permission denied"):
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE audit_retention SET keep_years = 1"))
    # Nor can anyone add a second floor or remove it.
    owner = make_engine(store.owner_url)
    try:
        for statement in (
            "INSERT INTO audit_retention (id, keep_years) VALUES (2, 1)",
            "DELETE FROM audit_retention",
        ):
            with pytest.raises(DBAPIError, match=r"refused|ck_audit_retention_one_row"):
                async with owner.begin() as conn:
                    await conn.execute(text(statement))
        # When the owner (as ``init`` does) stores the one-year policy, the records go.
        await store_retention_policy(owner, one_year)
    finally:
        await owner.dispose()
    pruned = await run_retention(engine, log_signer, one_year, datetime.now(UTC))
    assert (pruned.pruned, pruned.through_seq) == (3, 3)
    assert await _seqs(engine) == []
    async with engine.connect() as conn:
        assert format_timestamp(two_years_ago) < await database_floor(conn)
    await assert_one_tree(engine, [log_signer.vkey], entries=entries)


async def test_log_keys_rotate_but_never_change_their_verifier_key(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter]
) -> None:
    engine, _ = app
    master_key = MasterKey(MasterKey.generate())
    first = await rotate_log_key(engine, master_key, TEST_ORIGIN)
    second = await rotate_log_key(engine, master_key, TEST_ORIGIN)
    keys = {k.key_id: k for k in await list_log_keys(engine)}
    assert keys[first.key_id].status == "retired" and keys[first.key_id].not_after
    assert keys[second.key_id].status == "current"
    for key in keys.values():
        assert ref.parse_vkey(key.vkey)[0] == TEST_ORIGIN

    intruder = NoteLogSigner.generate(TEST_ORIGIN)
    refused = "permission denied" if store.kind == "postgresql" else "never change"
    for change in ("vkey = :vkey", "key_id = 'log-intruder'"):
        with pytest.raises(DBAPIError, match=refused):
            async with engine.begin() as conn:
                await conn.execute(
                    text(f"UPDATE log_keys SET {change} WHERE key_id = :key_id"),
                    {"vkey": intruder.vkey, "key_id": first.key_id},
                )
    deleted = "permission denied" if store.kind == "postgresql" else "never deleted"
    with pytest.raises(DBAPIError, match=deleted):
        async with engine.begin() as conn:
            await conn.execute(text("DELETE FROM log_keys"))
    # The triggers hold for every role, the schema owner included.
    owner = make_engine(store.owner_url)
    try:
        with pytest.raises(DBAPIError, match="never change"):
            async with owner.begin() as conn:
                await conn.execute(
                    text("UPDATE log_keys SET vkey = :vkey WHERE key_id = :id"),
                    {"vkey": intruder.vkey, "id": second.key_id},
                )
        with pytest.raises(DBAPIError, match="never deleted"):
            async with owner.begin() as conn:
                await conn.execute(text("DELETE FROM log_keys"))
    finally:
        await owner.dispose()
    after = {k.key_id: k.vkey for k in await list_log_keys(engine)}
    assert after == {first.key_id: first.vkey, second.key_id: second.vkey}


async def test_a_retired_log_key_stays_retired(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter]
) -> None:
    """The runtime role retires keys (rotation), but cannot bring a retired one back: a
    stolen old key would then sign as the current one."""
    engine, _ = app
    master_key = MasterKey(MasterKey.generate())
    first = await rotate_log_key(engine, master_key, TEST_ORIGIN)
    await rotate_log_key(engine, master_key, TEST_ORIGIN)
    before = {k.key_id: (k.status, k.not_after) for k in await list_log_keys(engine)}
    assert before[first.key_id][0] == "retired" and before[first.key_id][1] is not None
    for change in ("status = 'current'", "not_after = NULL"):
        with pytest.raises(DBAPIError, match="stays retired"):
            async with engine.begin() as conn:
                if change.startswith("status"):
                    await conn.execute(text("UPDATE log_keys SET status = 'retired'"))
                await conn.execute(
                    text(f"UPDATE log_keys SET {change} WHERE key_id = :key_id"),
                    {"key_id": first.key_id},
                )
    assert {k.key_id: (k.status, k.not_after) for k in await list_log_keys(engine)} == before


async def test_receipt_keys_of_the_first_release_stay_as_they_were(
    store: AuditStore, app: tuple[AsyncEngine, AuditWriter]
) -> None:
    engine, _ = app
    legacy, intruder = BlsSigner("receipt-legacy"), BlsSigner("receipt-intruder")
    insert = text(
        "INSERT INTO receipt_keys (key_id, public_key, sealed_private_key, not_before, status) "
        "VALUES (:key_id, :public_key, :sealed, :not_before, 'retired')"
    )

    def row(signer: BlsSigner) -> dict[str, object]:
        return {
            "key_id": signer.key_id,
            "public_key": signer.public_key.hex(),
            "sealed": b"not a sealed key",
            "not_before": format_timestamp(OLD),
        }

    owner = make_engine(store.owner_url)
    try:
        async with owner.begin() as conn:
            await conn.execute(insert, row(legacy))
        if store.kind == "postgresql":
            # Receipt keys sign nothing any more: the runtime role adds none.
            with pytest.raises(DBAPIError, match="permission denied"):
                async with engine.begin() as conn:
                    await conn.execute(insert, row(intruder))
        runtime_refusal = "permission denied" if store.kind == "postgresql" else "never change"
        for engine_, refusal in ((engine, runtime_refusal), (owner, "never change")):
            with pytest.raises(DBAPIError, match=refusal):
                async with engine_.begin() as conn:
                    await conn.execute(
                        text("UPDATE receipt_keys SET public_key = :public_key"),
                        {"public_key": intruder.public_key.hex()},
                    )
        async with owner.connect() as conn:
            stored = (await conn.execute(text("SELECT key_id, public_key FROM receipt_keys"))).all()
    finally:
        await owner.dispose()
    assert [tuple(r) for r in stored] == [(legacy.key_id, legacy.public_key.hex())]


async def test_the_head_cannot_be_rewritten_where_it_stands(
    store: AuditStore, log_signer: NoteLogSigner
) -> None:
    """At size 0 (and at any size) neither another root can be signed at the head's size
    nor the head row rewritten in place; signing the head as it is stays possible."""
    engine = make_engine(store.app_url)
    now = format_timestamp(datetime.now(UTC))
    sign = (
        "INSERT INTO audit_tree_heads (size, root, issued_at, key_id, note) "
        "VALUES (0, :root, :now, 'k', 'n')"
    )
    try:
        for statement, values in [
            (sign, {"root": b"\x07" * 32, "now": now}),
            ("UPDATE audit_log_head SET compact = :junk", {"junk": b"\x07" * 32}),
            ("UPDATE audit_log_head SET root = :junk", {"junk": b"\x07" * 32}),
        ]:
            with pytest.raises(DBAPIError, match=r"refused|only moves"):
                async with engine.begin() as conn:
                    await conn.execute(text(statement), values)
        empty = log_signer.sign_note(Checkpoint(log_signer.origin, 0, EMPTY_ROOT).text())
        async with engine.begin() as conn:
            await conn.execute(
                text(sign.replace("'n'", ":note")), {"root": EMPTY_ROOT, "now": now, "note": empty}
            )
        async with engine.connect() as conn:
            head = (
                await conn.execute(text("SELECT size, root, compact FROM audit_log_head"))
            ).one()
        assert (head.size, bytes(head.root), bytes(head.compact)) == (0, EMPTY_ROOT, b"")
        # The log then grows from the untouched head and verifies.
        writer = AuditWriter(engine, log_signer)
        await writer.start()
        try:
            await writer.append(make_event(1))
        finally:
            await writer.stop()
        report = await verify_database(engine, [log_signer.vkey])
        assert report.valid and (report.checked, report.tree_size) == (1, 1), report.reason
    finally:
        await engine.dispose()
