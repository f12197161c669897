"""audit: retention floor in the database; anchors only through guarded retention

Revision ID: audit_0002
Revises: audit_0001
Create Date: 2026-11-23

A security review showed that the runtime role could insert an anchor covering the whole
chain and then prune every record through ``audit_prune``. Now:

- ``audit_retention`` holds the retention floor (``keep_years``, default 7). Only the
  migration owner writes it (``kzg-gateway init`` sets it from the retention policy);
  the runtime role may only read it.
- A BEFORE INSERT trigger on ``audit_anchors`` (both databases) refuses an anchor unless
  every record it would prune is older than the floor by the database's own clock, its
  hash is the stored chain hash at ``through_seq``, ``through_seq`` is past the last
  anchor and not beyond the head, ``pruned`` counts the records it covers, a checkpoint
  covers it, and ``newest_occurred_at`` (now signed into the anchor, so offline
  verifiers can check its age) is the newest pruned record's time.
- On PostgreSQL the runtime role loses INSERT on ``audit_anchors``; the only way to
  prune is ``audit_prune(...)`` (SECURITY DEFINER), which writes the signed anchor the
  gateway hands it (through that trigger) and then deletes the range.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "audit_0002"
down_revision = "audit_0001"
branch_labels = None
depends_on = None
# The runtime role loses INSERT on audit_anchors and audit_prune changes signature.
backward_compatible = False

DEFAULT_KEEP_YEARS = 7
# Same id as audit.retention._PRUNE_LOCK: retention runs and direct calls serialise.
PRUNE_LOCK = 0x6B7A6761
PRUNE_ARGS = "bigint, text, bigint, bigint, text, text, text, text, text"
# occurred_at is canonical text (fixed width, microseconds, "Z"): it sorts as bytes.
PG_FORMAT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'


def _create_table() -> None:
    table = op.create_table(
        "audit_retention",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("keep_years", sa.Integer, nullable=False),
        sa.CheckConstraint("id = 1", name="ck_audit_retention_one_row"),
        sa.CheckConstraint("keep_years >= 1", name="ck_audit_retention_keep_years"),
    )
    op.bulk_insert(table, [{"id": 1, "keep_years": DEFAULT_KEEP_YEARS}])
    op.add_column("audit_anchors", sa.Column("newest_occurred_at", sa.String(27)))


def _sqlite_guards() -> None:
    for verb in ("INSERT", "DELETE"):
        op.execute(
            f"CREATE TRIGGER audit_retention_no_{verb.lower()} BEFORE {verb} ON audit_retention "
            f"BEGIN SELECT RAISE(ABORT, 'audit_retention has one row: {verb} refused'); END"
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
            WHEN NEW.through_seq > (SELECT seq FROM audit_chain_head WHERE id = 1)
              THEN RAISE(ABORT, 'retention refused: through_seq is beyond the chain head')
            WHEN NOT EXISTS (SELECT 1 FROM audit_events
                             WHERE seq = NEW.through_seq AND hash = NEW.hash)
              THEN RAISE(ABORT, 'retention refused: the anchor hash is not the chain hash')
            WHEN NEW.pruned <> NEW.through_seq - {previous}
                 OR NEW.pruned <> (SELECT COUNT(*) FROM audit_events
                                   WHERE seq > {previous} AND seq <= NEW.through_seq)
              THEN RAISE(ABORT, 'retention refused: pruned does not count the range')
            WHEN NOT EXISTS (SELECT 1 FROM audit_checkpoints
                             WHERE seq = NEW.checkpoint_seq AND seq >= NEW.through_seq)
              THEN RAISE(ABORT, 'retention refused: no checkpoint covers the range')
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


def _drop_sqlite_guards() -> None:
    for name in (
        "audit_anchors_retention_only",
        "audit_retention_no_insert",
        "audit_retention_no_delete",
    ):
        op.execute(f"DROP TRIGGER {name}")


def _old_prune(schema: str) -> str:
    return f"""
        CREATE FUNCTION audit_prune(through bigint) RETURNS bigint
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = "{schema}", pg_temp AS $$
        DECLARE
          removed bigint;
        BEGIN
          DELETE FROM audit_events WHERE seq <= through;
          GET DIAGNOSTICS removed = ROW_COUNT;
          RETURN removed;
        END $$
        """


def _grantees(privilege: str, table: str) -> list[str]:
    """Roles other than the owner holding ``privilege`` on ``table`` (however granted)."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT DISTINCT grantee FROM information_schema.role_table_grants "
            "WHERE table_schema = current_schema() AND table_name = :table "
            "AND privilege_type = :privilege AND grantee NOT IN (current_user, 'PUBLIC')"
        ),
        {"table": table, "privilege": privilege},
    )
    return [str(row[0]) for row in rows]


def _postgresql_guards(app_role: str | None) -> None:
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    search_path = f'SET search_path = "{schema}", pg_temp'
    for when in ("DELETE", "TRUNCATE"):
        each = "ROW" if when == "DELETE" else "STATEMENT"
        op.execute(
            f"CREATE TRIGGER audit_retention_no_{when.lower()} BEFORE {when} ON audit_retention "
            f"FOR EACH {each} EXECUTE FUNCTION audit_refuse_change()"
        )
    op.execute(
        f"""
        CREATE FUNCTION audit_retention_floor() RETURNS text
        LANGUAGE sql STABLE {search_path} AS $$
          SELECT to_char((now() AT TIME ZONE 'UTC') - make_interval(years => keep_years),
                         '{PG_FORMAT}')
          FROM audit_retention WHERE id = 1
        $$
        """
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
          ELSIF NEW.through_seq > (SELECT seq FROM audit_chain_head WHERE id = 1) THEN
            RAISE EXCEPTION 'retention refused: seq % is beyond the chain head', NEW.through_seq;
          ELSIF NOT EXISTS (SELECT 1 FROM audit_events
                            WHERE seq = NEW.through_seq AND hash = NEW.hash) THEN
            RAISE EXCEPTION 'retention refused: the anchor hash is not the chain hash at seq %',
              NEW.through_seq;
          ELSIF NEW.pruned <> NEW.through_seq - previous
                OR NEW.pruned <> (SELECT count(*) FROM audit_events
                                  WHERE seq > previous AND seq <= NEW.through_seq) THEN
            RAISE EXCEPTION 'retention refused: pruned does not count the range';
          ELSIF NOT EXISTS (SELECT 1 FROM audit_checkpoints
                            WHERE seq = NEW.checkpoint_seq AND seq >= NEW.through_seq) THEN
            RAISE EXCEPTION 'retention refused: no checkpoint covers seq %', NEW.through_seq;
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
    # Who could prune before may prune now, through the guarded path only.
    pruners = {
        str(row[0])
        for row in op.get_bind().exec_driver_sql(
            "SELECT DISTINCT grantee FROM information_schema.role_routine_grants "
            "WHERE routine_schema = current_schema() AND routine_name = 'audit_prune' "
            "AND grantee <> current_user AND grantee <> 'PUBLIC'"
        )
    }
    op.execute("DROP FUNCTION audit_prune(bigint)")
    op.execute(
        f"""
        CREATE FUNCTION audit_prune(
          through_seq bigint, hash text, checkpoint_seq bigint, pruned bigint,
          newest_occurred_at text, issued_at text, key_id text, message text, signature text
        ) RETURNS bigint
        LANGUAGE plpgsql SECURITY DEFINER {search_path} AS $$
        DECLARE
          removed bigint;
        BEGIN
          PERFORM pg_advisory_xact_lock({PRUNE_LOCK});
          -- audit_anchors_guard_insert refuses any anchor retention would not write.
          INSERT INTO audit_anchors (through_seq, hash, checkpoint_seq, pruned,
                                     newest_occurred_at, issued_at, key_id, message, signature)
          VALUES (audit_prune.through_seq, audit_prune.hash, audit_prune.checkpoint_seq,
                  audit_prune.pruned, audit_prune.newest_occurred_at, audit_prune.issued_at,
                  audit_prune.key_id, audit_prune.message, audit_prune.signature);
          DELETE FROM audit_events WHERE seq <= audit_prune.through_seq;
          GET DIAGNOSTICS removed = ROW_COUNT;
          RETURN removed;
        END $$
        """
    )
    op.execute(f"REVOKE ALL ON FUNCTION audit_prune({PRUNE_ARGS}) FROM PUBLIC")
    op.execute("REVOKE INSERT ON audit_anchors FROM PUBLIC")
    for role in _grantees("INSERT", "audit_anchors"):
        op.execute(f'REVOKE INSERT ON audit_anchors FROM "{role}"')
    if app_role:
        pruners.add(app_role)
        op.execute(f'GRANT SELECT ON audit_retention TO "{app_role}"')
    for role in sorted(pruners):
        op.execute(f'GRANT EXECUTE ON FUNCTION audit_prune({PRUNE_ARGS}) TO "{role}"')


def _drop_postgresql_guards(app_role: str | None) -> None:
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    op.execute(f"DROP FUNCTION audit_prune({PRUNE_ARGS})")
    op.execute(_old_prune(schema))
    op.execute("REVOKE ALL ON FUNCTION audit_prune(bigint) FROM PUBLIC")
    op.execute("DROP TRIGGER audit_anchors_retention_only ON audit_anchors")
    op.execute("DROP FUNCTION audit_anchors_guard_insert()")
    op.execute("DROP FUNCTION audit_retention_floor()")
    if app_role:
        op.execute(f'GRANT INSERT ON audit_anchors TO "{app_role}"')
        op.execute(f'GRANT EXECUTE ON FUNCTION audit_prune(bigint) TO "{app_role}"')


def upgrade() -> None:
    _create_table()
    if op.get_bind().dialect.name == "sqlite":
        _sqlite_guards()
    else:
        _postgresql_guards(context.config.attributes.get("app_role"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _drop_sqlite_guards()
    else:
        _drop_postgresql_guards(context.config.attributes.get("app_role"))
    op.drop_column("audit_anchors", "newest_occurred_at")
    op.drop_table("audit_retention")
