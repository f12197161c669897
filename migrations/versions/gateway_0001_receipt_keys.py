"""gateway: receipt signing keys (public key, sealed private key, validity, status)

Revision ID: gateway_0001
Revises:
Create Date: 2026-11-23

The private key is stored only sealed with AES-256-GCM under the master key. Keys are
retired, never deleted, so receipts stay verifiable forever. On PostgreSQL the runtime
role may read, add and retire keys (SELECT, INSERT, UPDATE), not delete them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "gateway_0001"
down_revision = None
branch_labels = ("gateway",)
depends_on = None
# Adds a table only.
backward_compatible = True


def upgrade() -> None:
    op.create_table(
        "receipt_keys",
        sa.Column("key_id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.String(96), nullable=False, unique=True),
        sa.Column("sealed_private_key", sa.LargeBinary, nullable=False),
        sa.Column("not_before", sa.String(27), nullable=False),
        sa.Column("not_after", sa.String(27)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.CheckConstraint("status IN ('current', 'retired')", name="ck_receipt_keys_status"),
    )
    op.create_index("ix_receipt_keys_status", "receipt_keys", ["status"])
    # At most one current key, whichever instance rotates (partial index: both dialects).
    op.execute(
        "CREATE UNIQUE INDEX ux_receipt_keys_one_current ON receipt_keys (status) "
        "WHERE status = 'current'"
    )
    app_role = context.config.attributes.get("app_role")
    if op.get_bind().dialect.name == "postgresql" and app_role:
        op.execute(f'GRANT SELECT, INSERT, UPDATE ON receipt_keys TO "{app_role}"')


def downgrade() -> None:
    op.drop_table("receipt_keys")
