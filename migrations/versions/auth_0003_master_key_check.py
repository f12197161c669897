"""auth: the master key the stored secrets are sealed under, recorded as a check value

Revision ID: auth_0003
Revises: auth_0002
Create Date: 2026-11-24

``master_key_check`` holds one row (id 1): ``check_value`` is HMAC-SHA256 of a fixed
message under the master key (``MasterKey.check_value()``), never the key. Every
transaction that seals a secret first locks this row and proceeds only if it names the
sealer's key; master-key rotation re-seals everything and updates the row in one
transaction. So a process still holding an old key can no longer seal beside secrets of
the new one.

- A database without sealed secrets gets the row with ``check_value`` NULL: the first
  sealing records its key (there is nothing it could disagree with).
- A database that already holds secrets gets no row: only ``kzg-gateway init`` or
  ``serve``, after opening every stored secret with their key, record it; until then
  nothing is sealed.

On PostgreSQL the runtime role may SELECT, INSERT and UPDATE the row: ``serve`` records
it, and ``admin master-key rotate`` runs as the runtime role.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "auth_0003"
down_revision = "auth_0002"
branch_labels = None
# The sealed receipt keys must exist to tell a fresh database from one holding secrets.
depends_on = "gateway_0001"
# Adds a table the previous code does not read.
backward_compatible = True

_SEALED_TABLES = ("users", "jwt_keys", "receipt_keys")


def upgrade() -> None:
    op.create_table(
        "master_key_check",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("check_value", sa.String(64)),
        sa.Column("recorded_at", sa.String(27)),
        sa.CheckConstraint("id = 1", name="ck_master_key_check_one_row"),
    )
    bind = op.get_bind()
    holds_secrets = any(
        bind.execute(sa.text(f"SELECT 1 FROM {table} LIMIT 1")).first() is not None
        for table in _SEALED_TABLES
    )
    if not holds_secrets:
        op.execute("INSERT INTO master_key_check (id, check_value) VALUES (1, NULL)")
    app_role = context.config.attributes.get("app_role")
    if bind.dialect.name == "postgresql" and app_role:
        op.execute(f'GRANT SELECT, INSERT, UPDATE ON master_key_check TO "{app_role}"')


def downgrade() -> None:
    op.drop_table("master_key_check")
