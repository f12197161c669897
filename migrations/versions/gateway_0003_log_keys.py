"""gateway: log keys (Ed25519 C2SP note keys) sign the tree's checkpoints

Revision ID: gateway_0003
Revises: gateway_0002
Create Date: 2026-11-27

The audit log's checkpoints are C2SP signed notes by an Ed25519 log key whose name is
the log's origin. Private keys are stored only sealed under the master key; keys are
retired, never deleted, so every checkpoint and receipt stays verifiable. A key's
identity and public key never change (trigger, both databases); on PostgreSQL the
runtime role may add keys and update only status, not_after and the sealed private key.
Receipt keys (BLS) stay, read-only, for the receipts issued before the tree.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "gateway_0003"
down_revision = "gateway_0002"
branch_labels = None
depends_on = None
# The runtime role loses INSERT on receipt_keys, which the previous code rotates.
backward_compatible = False

MESSAGE = "log_keys: key_id and vkey never change once written"
RETIRED = "log_keys: a retired key stays retired"


def upgrade() -> None:
    op.create_table(
        "log_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("vkey", sa.Text, nullable=False, unique=True),
        sa.Column("sealed_private_key", sa.LargeBinary, nullable=False),
        sa.Column("not_before", sa.String(27), nullable=False),
        sa.Column("not_after", sa.String(27)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.CheckConstraint("status IN ('current', 'retired')", name="ck_log_keys_status"),
    )
    op.execute(
        "CREATE UNIQUE INDEX ux_log_keys_one_current ON log_keys (status) "
        "WHERE status = 'current'"
    )
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE TRIGGER log_keys_immutable BEFORE UPDATE OF key_id, vkey ON log_keys "
            "WHEN NEW.key_id IS NOT OLD.key_id OR NEW.vkey IS NOT OLD.vkey "
            f"BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END"
        )
        op.execute(
            "CREATE TRIGGER log_keys_stay_retired BEFORE UPDATE OF status, not_after ON log_keys "
            "WHEN OLD.status = 'retired' AND (NEW.status IS NOT 'retired' "
            "OR NEW.not_after IS NOT OLD.not_after) "
            f"BEGIN SELECT RAISE(ABORT, '{RETIRED}'); END"
        )
        op.execute(
            "CREATE TRIGGER log_keys_no_delete BEFORE DELETE ON log_keys "
            "BEGIN SELECT RAISE(ABORT, 'log_keys: keys are retired, never deleted'); END"
        )
        return
    op.execute(
        f"""
        CREATE FUNCTION log_keys_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF TG_OP = 'DELETE' THEN
            RAISE EXCEPTION 'log_keys: keys are retired, never deleted'
              USING ERRCODE = 'insufficient_privilege';
          END IF;
          IF NEW.key_id IS DISTINCT FROM OLD.key_id OR NEW.vkey IS DISTINCT FROM OLD.vkey THEN
            RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'insufficient_privilege';
          END IF;
          -- Reviving a retired key would let a stolen old key sign as the current one.
          IF OLD.status = 'retired' AND (NEW.status <> 'retired'
              OR NEW.not_after IS DISTINCT FROM OLD.not_after) THEN
            RAISE EXCEPTION '{RETIRED}' USING ERRCODE = 'insufficient_privilege';
          END IF;
          RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER log_keys_guard BEFORE UPDATE OR DELETE ON log_keys "
        "FOR EACH ROW EXECUTE FUNCTION log_keys_guard()"
    )
    app_role = context.config.attributes.get("app_role")
    if app_role:
        role = f'"{app_role}"'
        op.execute(f"GRANT SELECT, INSERT ON log_keys TO {role}")
        op.execute(f"GRANT UPDATE (status, not_after, sealed_private_key) ON log_keys TO {role}")
        # Receipt keys sign nothing any more: the runtime role keeps reading them and
        # re-sealing them at master-key rotation, but adds none.
        op.execute(f"REVOKE INSERT ON receipt_keys FROM {role}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER log_keys_guard ON log_keys")
        op.execute("DROP FUNCTION log_keys_guard()")
        app_role = context.config.attributes.get("app_role")
        if app_role:
            op.execute(f'GRANT INSERT ON receipt_keys TO "{app_role}"')
    op.drop_table("log_keys")
