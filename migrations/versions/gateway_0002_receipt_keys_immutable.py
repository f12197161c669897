"""gateway: a receipt key's identity and public key never change once written

Revision ID: gateway_0002
Revises: gateway_0001
Create Date: 2026-11-23

A security review showed that the runtime role could replace a public key (UPDATE on
the whole table). Verifiers that read keys from the database would then accept
signatures by a key the gateway never held. Now a trigger refuses any change of
``key_id`` or ``public_key`` (both databases, every role), and on PostgreSQL the runtime
role may update only what the gateway updates: ``status`` and ``not_after`` (rotation
retires the old key) and ``sealed_private_key`` (master-key rotation re-seals it). It
keeps INSERT, since rotation adds the new key.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "gateway_0002"
down_revision = "gateway_0001"
branch_labels = None
depends_on = None
# Refuses only changes the previous code never makes.
backward_compatible = True

RUNTIME_UPDATABLE = "status, not_after, sealed_private_key"
MESSAGE = "receipt_keys: key_id and public_key never change once written"


def _table_updaters() -> list[str]:
    """Roles other than the owner holding table-wide UPDATE on receipt_keys."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT DISTINCT grantee FROM information_schema.role_table_grants "
            "WHERE table_schema = current_schema() AND table_name = 'receipt_keys' "
            "AND privilege_type = 'UPDATE' AND grantee NOT IN (current_user, 'PUBLIC')"
        )
    )
    return [str(row[0]) for row in rows]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE TRIGGER receipt_keys_identity_fixed BEFORE UPDATE ON receipt_keys "
            "WHEN NEW.key_id IS NOT OLD.key_id OR NEW.public_key IS NOT OLD.public_key "
            f"BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END"
        )
        return
    op.execute(
        f"""
        CREATE FUNCTION receipt_keys_guard_identity() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF NEW.key_id IS DISTINCT FROM OLD.key_id
             OR NEW.public_key IS DISTINCT FROM OLD.public_key THEN
            RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'insufficient_privilege';
          END IF;
          RETURN NEW;
        END $$
        """
    )
    op.execute(
        "CREATE TRIGGER receipt_keys_identity_fixed BEFORE UPDATE ON receipt_keys "
        "FOR EACH ROW EXECUTE FUNCTION receipt_keys_guard_identity()"
    )
    op.execute("REVOKE UPDATE ON receipt_keys FROM PUBLIC")
    roles = set(_table_updaters())
    app_role = context.config.attributes.get("app_role")
    if app_role:
        roles.add(app_role)
    for role in sorted(roles):
        op.execute(f'REVOKE UPDATE ON receipt_keys FROM "{role}"')
        op.execute(f'GRANT UPDATE ({RUNTIME_UPDATABLE}) ON receipt_keys TO "{role}"')


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER receipt_keys_identity_fixed")
    else:
        op.execute("DROP TRIGGER receipt_keys_identity_fixed ON receipt_keys")
        op.execute("DROP FUNCTION receipt_keys_guard_identity()")
        app_role = context.config.attributes.get("app_role")
        if app_role:
            op.execute(f'GRANT UPDATE ON receipt_keys TO "{app_role}"')
