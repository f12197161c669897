"""gateway: the applied migrations and whether each is backward compatible

Revision ID: gateway_0004
Revises:
Create Date: 2026-11-27

``schema_revisions`` lists every applied migration (its down revisions and its module's
``backward_compatible`` flag); ``kzg-gateway init`` fills it after each upgrade. A
``serve`` of an older release reads it to accept a schema ahead of its own code when
every migration it does not know is backward compatible (expand/contract upgrades,
image rollbacks).

This revision starts its own line (no down revision) and depends on the first revisions
of the other branches only: Alembic then keeps every branch's head in
``alembic_version``, so the previous release, which requires its own heads there, still
serves after this upgrade. On PostgreSQL the runtime role may read the table.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "gateway_0004"
down_revision = None
branch_labels = ("schema",)
depends_on = ("audit_0001", "auth_0001", "gateway_0001")
# Adds a table only: the previous release does not read it.
backward_compatible = True


def upgrade() -> None:
    op.create_table(
        "schema_revisions",
        sa.Column("revision", sa.String(64), primary_key=True),
        # Comma-separated; empty for the first revision of a branch.
        sa.Column("down_revisions", sa.Text, nullable=False),
        sa.Column("backward_compatible", sa.Boolean, nullable=False),
    )
    app_role = context.config.attributes.get("app_role")
    if op.get_bind().dialect.name == "postgresql" and app_role:
        op.execute(f'GRANT SELECT ON schema_revisions TO "{app_role}"')


def downgrade() -> None:
    op.drop_table("schema_revisions")
