"""auth: rate-limit spending shared between instances

Revision ID: auth_0002
Revises: auth_0001
Create Date: 2026-11-23

Each gateway instance publishes its running total of tokens spent per rate-limit key
and charges its own buckets with the others' (auth.ratelimit.UsageExchange). Rows are
short-lived working state, not records: idle ones are deleted after a few minutes, so
on PostgreSQL the runtime role may also DELETE here (and only here).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "auth_0002"
down_revision = "auth_0001"
branch_labels = None
depends_on = None
# Adds a table only.
backward_compatible = True


def upgrade() -> None:
    op.create_table(
        "rate_usage",
        sa.Column("instance_id", sa.String(32), primary_key=True),
        sa.Column("key", sa.String(256), primary_key=True),
        sa.Column("spent", sa.Float, nullable=False),
        sa.Column("rate", sa.Float, nullable=False),
        sa.Column("burst", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_rate_usage_updated_at", "rate_usage", ["updated_at"])
    app_role = context.config.attributes.get("app_role")
    if op.get_bind().dialect.name == "postgresql" and app_role:
        op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON rate_usage TO "{app_role}"')


def downgrade() -> None:
    op.drop_index("ix_rate_usage_updated_at", "rate_usage")
    op.drop_table("rate_usage")
