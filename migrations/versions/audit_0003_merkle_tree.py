"""audit: the log becomes an RFC 9162 Merkle tree with signed checkpoints

Revision ID: audit_0003
Revises: audit_0002
Create Date: 2026-11-27

- ``audit_tree`` holds the tree's stored hashes: every leaf hash (level 0) and every
  complete subtree root at levels 8, 16, 24, ... (tiles of 256 hashes, as in
  C2SP tlog-tiles). Any perfect subtree is then at most 255 hashes of one stored level
  away, so proofs read O(log n) rows and never rehash entries. Rows are never updated or
  deleted: retention removes entry bodies only.
- ``audit_tree_heads`` holds one signed checkpoint (a C2SP signed note) per tree size;
  ``audit_log_head`` the single head row that every writer locks: its size, root and
  compact range (the right-edge subtree hashes, so appends need no other reads). The head
  moves only forward, and only onto a stored tree head.
- The tree is built here over the existing records (entry = the canonical JSON the chain
  hashed). The chain's columns leave ``audit_events``; the chain head at this moment is
  kept in ``audit_legacy_chain`` so the BLS checkpoints of the first release stay
  verifiable, and ``audit_checkpoints`` (those BLS checkpoints) takes no new rows.
- ``audit_anchors`` now refers to tree state: a signed statement that records up to
  ``through_seq`` were pruned, with the compact range of the pruned prefix. Its insert
  trigger still enforces the retention floor by the database's own clock.
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import context, op

revision = "audit_0003"
down_revision = "audit_0002"
branch_labels = None
depends_on = None
# The chain columns leave audit_events, which the previous code writes.
backward_compatible = False

TILE_HEIGHT = 8
PRUNE_LOCK = 0x6B7A6761
OLD_PRUNE_ARGS = "bigint, text, bigint, bigint, text, text, text, text, text"
PRUNE_ARGS = "bigint, bigint, bigint, text, text, text, text"
JSON_FIELDS = ("input_digests", "detail")
EVENT_FIELDS = (
    "request_id", "occurred_at", "actor", "role", "action", "outcome", "http_status",
    "client_addr", "tls_version", "method", "path", "input_digests", "result_digest",
    "latency_ms", "detail",
)  # fmt: skip
NEW_TABLES = ("audit_tree", "audit_tree_heads")


def _canonical(value: object) -> bytes:
    # Frozen copy of audit.chain.canonical_bytes: a migration must not change with the code.
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _build_tree(bind: sa.Connection) -> tuple[int, bytes, bytes]:
    """Store the tree over every record; return (size, root, compact range)."""
    tree = sa.table("audit_tree", sa.column("level"), sa.column("idx"), sa.column("hash"))
    compact: list[tuple[int, bytes]] = []  # (level, hash) of the right edge, left to right
    size = 0
    rows: list[dict[str, object]] = []
    columns = ", ".join(("seq", *EVENT_FIELDS))
    # Keyset pages, not a server-side cursor: the columns are dropped in this transaction.
    query = sa.text(
        f"SELECT {columns} FROM audit_events WHERE seq > :after ORDER BY seq LIMIT 5000"  # noqa: S608
    )
    while page := bind.execute(query, {"after": size}).mappings().all():
        for row in page:
            size = _add_leaf(row, size, compact, rows)
        if len(rows) >= 5000:
            op.bulk_insert(tree, rows)
            rows = []
    if rows:
        op.bulk_insert(tree, rows)
    hashes = [h for _, h in compact]
    root = hashes[-1] if hashes else hashlib.sha256(b"").digest()
    for left in reversed(hashes[:-1]):
        root = hashlib.sha256(b"\x01" + left + root).digest()
    return size, root, b"".join(hashes)


def _add_leaf(
    row: sa.RowMapping, size: int, compact: list[tuple[int, bytes]], rows: list[dict[str, object]]
) -> int:
    """Append the record's leaf to ``compact``, queue the hashes to store; return the size."""
    if row["seq"] != size + 1:
        raise RuntimeError(
            f"audit_events is not gapless at seq {size + 1} (found {row['seq']}): "
            "the tree cannot be built; verify the chain first"
        )
    record = {
        name: json.loads(row[name]) if name in JSON_FIELDS else row[name]
        for name in EVENT_FIELDS
    }
    record["seq"] = row["seq"]
    node = hashlib.sha256(b"\x00" + _canonical(record)).digest()
    level, index = 0, size
    rows.append({"level": 0, "idx": index, "hash": node})
    while compact and compact[-1][0] == level:
        node = hashlib.sha256(b"\x01" + compact.pop()[1] + node).digest()
        level, index = level + 1, index >> 1
        if level % TILE_HEIGHT == 0:
            rows.append({"level": level, "idx": index, "hash": node})
    compact.append((level, node))
    return size + 1


def _refuse_unconvertible(bind: sa.Connection) -> None:
    """Refuse a chain no tree can be built over, before any DDL: pysqlite runs DDL outside
    the transaction, so a refusal after the triggers were dropped would leave the chain
    unguarded on SQLite."""
    anchors = bind.exec_driver_sql("SELECT COUNT(*) FROM audit_anchors").scalar_one()
    if anchors:
        # Pruned entries' leaf hashes cannot be recomputed, so no RFC 9162 tree can start at
        # leaf 0. Retention keeps 7 years by default: no deployment of the chain got here.
        raise RuntimeError("audit_0003 cannot build the tree over a chain already pruned")
    count, first, last = bind.exec_driver_sql(
        "SELECT COUNT(*), COALESCE(MIN(seq), 1), COALESCE(MAX(seq), 0) FROM audit_events"
    ).one()
    if first != 1 or count != last:
        missing = bind.exec_driver_sql(
            "SELECT MIN(c.seq) FROM (SELECT 1 AS seq UNION SELECT seq + 1 FROM audit_events) c "
            "WHERE NOT EXISTS (SELECT 1 FROM audit_events e WHERE e.seq = c.seq)"
        ).scalar_one()
        raise RuntimeError(
            f"audit_events is not gapless at seq {missing}: "
            "the tree cannot be built; verify the chain first"
        )


def _create_tables() -> None:
    bind = op.get_bind()
    op.create_table(
        "audit_tree",
        sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "audit_tree_heads",
        sa.Column("size", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("root", sa.LargeBinary, nullable=False),
        sa.Column("issued_at", sa.String(27), nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
    )
    head = op.create_table(
        "audit_log_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("root", sa.LargeBinary, nullable=False),
        sa.Column("compact", sa.LargeBinary, nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_log_head_one_row"),
    )
    legacy = op.create_table(
        "audit_legacy_chain",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("through_seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_legacy_chain_one_row"),
    )
    chain = bind.exec_driver_sql("SELECT seq, hash FROM audit_chain_head WHERE id = 1").one()
    op.bulk_insert(legacy, [{"id": 1, "through_seq": chain[0], "hash": chain[1]}])
    size, root, compact = _build_tree(bind)
    op.bulk_insert(head, [{"id": 1, "size": size, "root": root, "compact": compact}])


def _replace_anchors() -> None:
    op.drop_table("audit_anchors")
    op.create_table(
        "audit_anchors",
        sa.Column("through_seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("tree_size", sa.BigInteger, nullable=False),
        sa.Column("pruned", sa.BigInteger, nullable=False),
        sa.Column("newest_occurred_at", sa.String(27), nullable=False),
        sa.Column("issued_at", sa.String(27), nullable=False),
        sa.Column("compact", sa.Text, nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
    )


def _sqlite_upgrade() -> None:
    for name in (
        "audit_chain_head_forward",
        "audit_chain_head_no_delete",
        "audit_anchors_retention_only",
        "audit_anchors_no_update",
        "audit_anchors_no_delete",
        "audit_events_no_delete",
    ):
        op.execute(f"DROP TRIGGER IF EXISTS {name}")
    _create_tables()
    op.drop_table("audit_chain_head")
    op.execute("ALTER TABLE audit_events DROP COLUMN prev_hash")
    op.execute("ALTER TABLE audit_events DROP COLUMN hash")
    _replace_anchors()
    for table in (*NEW_TABLES, "audit_anchors", "audit_legacy_chain"):
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {verb} refused'); END"
            )
    for table in ("audit_legacy_chain", "audit_checkpoints"):
        op.execute(
            f"CREATE TRIGGER {table}_no_insert BEFORE INSERT ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is closed: the log is a tree now'); END"
        )
    op.execute(
        "CREATE TRIGGER audit_log_head_no_delete BEFORE DELETE ON audit_log_head "
        "BEGIN SELECT RAISE(ABORT, 'audit_log_head is append-only: DELETE refused'); END"
    )
    op.execute(
        "CREATE TRIGGER audit_log_head_forward BEFORE UPDATE ON audit_log_head "
        "WHEN NEW.id <> OLD.id OR NEW.size < OLD.size OR NOT EXISTS "
        "(SELECT 1 FROM audit_tree_heads WHERE size = NEW.size AND root = NEW.root) "
        "BEGIN SELECT RAISE(ABORT, 'audit_log_head only moves forward onto a signed tree "
        "head'); END"
    )
    op.execute(
        "CREATE TRIGGER audit_tree_heads_forward BEFORE INSERT ON audit_tree_heads "
        "WHEN NEW.size < (SELECT size FROM audit_log_head WHERE id = 1) "
        "BEGIN SELECT RAISE(ABORT, 'audit_tree_heads: a tree head never goes back'); END"
    )
    op.execute(
        "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
        "WHEN NOT EXISTS (SELECT 1 FROM audit_anchors WHERE OLD.seq <= through_seq) "
        "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused "
        "outside retention'); END"
    )
    previous = "COALESCE((SELECT MAX(through_seq) FROM audit_anchors), 0)"
    floor = (
        "strftime('%Y-%m-%dT%H:%M:%f', 'now', '-' || "
        "(SELECT keep_years FROM audit_retention WHERE id = 1) || ' years') || '000Z'"
    )
    op.execute(
        f"""
        CREATE TRIGGER audit_anchors_retention_only BEFORE INSERT ON audit_anchors
        BEGIN
          SELECT CASE
            WHEN (SELECT keep_years FROM audit_retention WHERE id = 1) IS NULL
              THEN RAISE(ABORT, 'retention refused: no retention floor is set')
            WHEN NEW.through_seq <= {previous}
              THEN RAISE(ABORT, 'retention refused: the anchor does not move past the last one')
            WHEN NOT EXISTS (SELECT 1 FROM audit_tree_heads
                             WHERE size = NEW.tree_size AND size >= NEW.through_seq)
              THEN RAISE(ABORT, 'retention refused: no signed tree head covers the range')
            WHEN NEW.pruned <> NEW.through_seq - {previous}
                 OR NEW.pruned <> (SELECT COUNT(*) FROM audit_events
                                   WHERE seq > {previous} AND seq <= NEW.through_seq)
              THEN RAISE(ABORT, 'retention refused: pruned does not count the range')
            WHEN EXISTS (SELECT 1 FROM audit_events
                         WHERE seq <= NEW.through_seq AND occurred_at >= {floor})
              THEN RAISE(ABORT, 'retention refused: records younger than the retention floor')
            WHEN NEW.newest_occurred_at IS NOT (SELECT MAX(occurred_at) FROM audit_events
                                                WHERE seq <= NEW.through_seq)
              THEN RAISE(ABORT, 'retention refused: newest_occurred_at is not the range''s')
          END;
        END
        """
    )


def _postgresql_upgrade(app_role: str | None) -> None:
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    search_path = f'SET search_path = "{schema}", pg_temp'
    op.execute(f"DROP FUNCTION audit_prune({OLD_PRUNE_ARGS})")
    op.execute("DROP TRIGGER audit_chain_head_forward ON audit_chain_head")
    op.execute("DROP FUNCTION audit_chain_head_guard()")
    op.execute("DROP TRIGGER audit_anchors_retention_only ON audit_anchors")
    op.execute("DROP FUNCTION audit_anchors_guard_insert()")
    _create_tables()
    op.drop_table("audit_chain_head")
    op.drop_column("audit_events", "prev_hash")
    op.drop_column("audit_events", "hash")
    _replace_anchors()
    for table in (*NEW_TABLES, "audit_anchors", "audit_legacy_chain", "audit_log_head"):
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()"
        )
        verbs = ("DELETE",) if table == "audit_log_head" else ("UPDATE", "DELETE")
        for verb in verbs:
            op.execute(
                f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()"
            )
    for table in ("audit_legacy_chain", "audit_checkpoints"):
        op.execute(
            f"CREATE TRIGGER {table}_no_insert BEFORE INSERT ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()"
        )
    op.execute(
        f"""
        CREATE FUNCTION audit_log_head_guard() RETURNS trigger
        LANGUAGE plpgsql {search_path} AS $$
        BEGIN
          IF NEW.id <> OLD.id OR NEW.size < OLD.size OR NOT EXISTS
              (SELECT 1 FROM audit_tree_heads WHERE size = NEW.size AND root = NEW.root) THEN
            RAISE EXCEPTION 'audit_log_head only moves forward onto a signed tree head'
              USING ERRCODE = 'insufficient_privilege';
          END IF;
          RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_log_head_forward BEFORE UPDATE ON audit_log_head "
        "FOR EACH ROW EXECUTE FUNCTION audit_log_head_guard()"
    )
    op.execute(
        f"""
        CREATE FUNCTION audit_tree_heads_guard() RETURNS trigger
        LANGUAGE plpgsql {search_path} AS $$
        BEGIN
          IF NEW.size < (SELECT size FROM audit_log_head WHERE id = 1) THEN
            RAISE EXCEPTION 'audit_tree_heads: a tree head never goes back'
              USING ERRCODE = 'insufficient_privilege';
          END IF;
          RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_tree_heads_forward BEFORE INSERT ON audit_tree_heads "
        "FOR EACH ROW EXECUTE FUNCTION audit_tree_heads_guard()"
    )
    op.execute(
        f"""
        CREATE FUNCTION audit_anchors_guard_insert() RETURNS trigger
        LANGUAGE plpgsql {search_path} AS $$
        DECLARE
          floor text := audit_retention_floor();
          previous bigint;
        BEGIN
          SELECT COALESCE(max(through_seq), 0) INTO previous FROM audit_anchors;
          IF floor IS NULL THEN
            RAISE EXCEPTION 'retention refused: no retention floor is set';
          ELSIF NEW.through_seq <= previous THEN
            RAISE EXCEPTION 'retention refused: the anchor does not move past seq %', previous;
          ELSIF NOT EXISTS (SELECT 1 FROM audit_tree_heads
                            WHERE size = NEW.tree_size AND size >= NEW.through_seq) THEN
            RAISE EXCEPTION 'retention refused: no signed tree head covers seq %',
              NEW.through_seq;
          ELSIF NEW.pruned <> NEW.through_seq - previous
                OR NEW.pruned <> (SELECT count(*) FROM audit_events
                                  WHERE seq > previous AND seq <= NEW.through_seq) THEN
            RAISE EXCEPTION 'retention refused: pruned does not count the range';
          ELSIF EXISTS (SELECT 1 FROM audit_events WHERE seq <= NEW.through_seq
                        AND occurred_at COLLATE "C" >= floor COLLATE "C") THEN
            RAISE EXCEPTION 'retention refused: records younger than the retention floor %',
              floor;
          ELSIF NEW.newest_occurred_at IS DISTINCT FROM (
                  SELECT max(occurred_at COLLATE "C") FROM audit_events
                  WHERE seq <= NEW.through_seq) THEN
            RAISE EXCEPTION 'retention refused: newest_occurred_at is not the range''s';
          END IF;
          RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER audit_anchors_retention_only BEFORE INSERT ON audit_anchors "
        "FOR EACH ROW EXECUTE FUNCTION audit_anchors_guard_insert()"
    )
    op.execute(
        f"""
        CREATE FUNCTION audit_prune(
          through_seq bigint, tree_size bigint, pruned bigint, newest_occurred_at text,
          issued_at text, compact text, key_id text, note text
        ) RETURNS bigint
        LANGUAGE plpgsql SECURITY DEFINER {search_path} AS $$
        DECLARE
          removed bigint;
        BEGIN
          PERFORM pg_advisory_xact_lock({PRUNE_LOCK});
          -- audit_anchors_guard_insert refuses any anchor retention would not write.
          INSERT INTO audit_anchors (through_seq, tree_size, pruned, newest_occurred_at,
                                     issued_at, compact, key_id, note)
          VALUES (audit_prune.through_seq, audit_prune.tree_size, audit_prune.pruned,
                  audit_prune.newest_occurred_at, audit_prune.issued_at, audit_prune.compact,
                  audit_prune.key_id, audit_prune.note);
          DELETE FROM audit_events WHERE seq <= audit_prune.through_seq;
          GET DIAGNOSTICS removed = ROW_COUNT;
          RETURN removed;
        END $$
        """
    )
    args = "bigint, bigint, bigint, text, text, text, text, text"
    op.execute(f"REVOKE ALL ON FUNCTION audit_prune({args}) FROM PUBLIC")
    op.execute("REVOKE INSERT ON audit_anchors FROM PUBLIC")
    op.execute("REVOKE INSERT ON audit_checkpoints FROM PUBLIC")
    if app_role:
        role = f'"{app_role}"'
        op.execute(f"REVOKE INSERT ON audit_checkpoints FROM {role}")
        op.execute(f"GRANT SELECT, INSERT ON audit_tree, audit_tree_heads TO {role}")
        op.execute(f"GRANT SELECT ON audit_anchors, audit_legacy_chain TO {role}")
        op.execute(f"GRANT SELECT, UPDATE ON audit_log_head TO {role}")
        op.execute(f"GRANT EXECUTE ON FUNCTION audit_prune({args}) TO {role}")


def upgrade() -> None:
    _refuse_unconvertible(op.get_bind())
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_upgrade()
    else:
        _postgresql_upgrade(context.config.attributes.get("app_role"))


def downgrade() -> None:
    # The chain's hashes are gone from audit_events; a tree cannot be turned back into it.
    raise RuntimeError("audit_0003 is not reversible: restore the pre-upgrade backup instead")
