"""audit: hash-chained events, chain head, checkpoints, anchors; append-only in the database

Revision ID: audit_0001
Revises:
Create Date: 2026-11-22

UPDATE and DELETE on the audit tables are refused by triggers for every role. Rows leave
audit_events only below a retention anchor (audit_prune on PostgreSQL, a SECURITY DEFINER
function, because the runtime role holds INSERT and SELECT only). The chain-head row is
the one updatable row: its trigger lets seq only grow and only onto an existing record.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "audit_0001"
down_revision = None
branch_labels = ("audit",)
depends_on = None
# Adds tables only: nothing the previous code used changes.
backward_compatible = True

GENESIS_HASH = "00" * 32
FROZEN_TABLES = ("audit_events", "audit_checkpoints", "audit_anchors")


def _create_tables() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("occurred_at", sa.String(27), nullable=False),
        sa.Column("actor", sa.Text),
        sa.Column("role", sa.Text),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("http_status", sa.Integer),
        sa.Column("client_addr", sa.Text),
        sa.Column("tls_version", sa.Text),
        sa.Column("method", sa.Text),
        sa.Column("path", sa.Text),
        sa.Column("input_digests", sa.Text, nullable=False),
        sa.Column("result_digest", sa.Text),
        sa.Column("latency_ms", sa.Float),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_events_occurred_at", "audit_events", ["occurred_at"])
    op.create_index("ix_audit_events_actor", "audit_events", ["actor"])
    op.create_index("ix_audit_events_action", "audit_events", ["action"])
    head = op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])
    op.create_table(
        "audit_checkpoints",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("issued_at", sa.String(27), nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
    )
    op.create_table(
        "audit_anchors",
        sa.Column("through_seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("checkpoint_seq", sa.BigInteger, nullable=False),
        sa.Column("pruned", sa.BigInteger, nullable=False),
        sa.Column("issued_at", sa.String(27), nullable=False),
        sa.Column("key_id", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("signature", sa.Text, nullable=False),
    )


def _sqlite_guards() -> None:
    for table in FROZEN_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: UPDATE refused'); END"
        )
    for table in ("audit_checkpoints", "audit_anchors", "audit_chain_head"):
        op.execute(
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: DELETE refused'); END"
        )
    op.execute(
        "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
        "WHEN NOT EXISTS (SELECT 1 FROM audit_anchors WHERE OLD.seq <= through_seq) "
        "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only: DELETE refused "
        "outside retention'); END"
    )
    op.execute(
        "CREATE TRIGGER audit_chain_head_forward BEFORE UPDATE ON audit_chain_head "
        "WHEN NEW.id <> OLD.id OR NEW.seq < OLD.seq OR (NEW.seq > 0 AND NOT EXISTS "
        "(SELECT 1 FROM audit_events WHERE seq = NEW.seq AND hash = NEW.hash)) "
        "BEGIN SELECT RAISE(ABORT, 'audit_chain_head only moves forward onto a record'); END"
    )


def _postgresql_guards(app_role: str | None) -> None:
    op.execute(
        """
        CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          RAISE EXCEPTION '% on % refused: the audit log is append-only', TG_OP, TG_TABLE_NAME
            USING ERRCODE = 'insufficient_privilege';
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION audit_events_guard_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NOT EXISTS (SELECT 1 FROM audit_anchors WHERE OLD.seq <= through_seq) THEN
            RAISE EXCEPTION 'DELETE on audit_events refused outside retention (seq %)', OLD.seq
              USING ERRCODE = 'insufficient_privilege';
          END IF;
          RETURN OLD;
        END $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION audit_chain_head_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.id <> OLD.id OR NEW.seq < OLD.seq OR (NEW.seq > 0 AND NOT EXISTS
              (SELECT 1 FROM audit_events WHERE seq = NEW.seq AND hash = NEW.hash)) THEN
            RAISE EXCEPTION 'audit_chain_head only moves forward onto a record'
              USING ERRCODE = 'insufficient_privilege';
          END IF;
          RETURN NEW;
        END $$
        """
    )
    for table in FROZEN_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()"
        )
    for table in (*FROZEN_TABLES, "audit_chain_head"):
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()"
        )
    for table in ("audit_checkpoints", "audit_anchors", "audit_chain_head"):
        op.execute(
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION audit_refuse_change()"
        )
    op.execute(
        "CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events "
        "FOR EACH ROW EXECUTE FUNCTION audit_events_guard_delete()"
    )
    op.execute(
        "CREATE TRIGGER audit_chain_head_forward BEFORE UPDATE ON audit_chain_head "
        "FOR EACH ROW EXECUTE FUNCTION audit_chain_head_guard()"
    )
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    op.execute(
        f"""
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
    )
    op.execute("REVOKE ALL ON FUNCTION audit_prune(bigint) FROM PUBLIC")
    if app_role:
        role = f'"{app_role}"'
        op.execute(f"GRANT SELECT, INSERT ON {', '.join(FROZEN_TABLES)} TO {role}")
        op.execute(f"GRANT SELECT, UPDATE ON audit_chain_head TO {role}")
        op.execute(f"GRANT EXECUTE ON FUNCTION audit_prune(bigint) TO {role}")


def upgrade() -> None:
    _create_tables()
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _sqlite_guards()
    elif dialect == "postgresql":
        _postgresql_guards(context.config.attributes.get("app_role"))
    else:
        raise RuntimeError(f"the audit log supports SQLite and PostgreSQL, not {dialect}")


def downgrade() -> None:
    bind = op.get_bind()
    for table in ("audit_anchors", "audit_checkpoints", "audit_chain_head", "audit_events"):
        op.drop_table(table)
    if bind.dialect.name == "postgresql":
        op.execute("DROP FUNCTION audit_prune(bigint)")
        op.execute("DROP FUNCTION audit_chain_head_guard()")
        op.execute("DROP FUNCTION audit_events_guard_delete()")
        op.execute("DROP FUNCTION audit_refuse_change()")
