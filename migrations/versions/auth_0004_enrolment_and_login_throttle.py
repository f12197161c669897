"""auth: enrolment tokens, login throttling per (account, source), revocable JWT keys

Revision ID: auth_0004
Revises: gateway_0004
Create Date: 2026-11-27

- ``users`` gains ``enrollment_token_hash`` and ``enrollment_expires_at``: an admin
  creates a person (or resets one) with a single-use enrolment token (256 random bits), stored
  only as its SHA-256; the person then chooses the password and receives the TOTP secret. Until
  then ``password_hash`` and ``sealed_totp_secret`` are NULL, so both become nullable.
- ``login_throttle`` counts failed logins per (account reference, source address or IPv6
  /64): the failing source waits growing delays, other sources are not held back. The
  account is a keyed reference, never the typed name (it may be a mistyped password).
- The former hard lock (``locked_until``) is lifted: strangers can no longer lock anyone out.
- ``jwt_keys.status`` may now be ``revoked``: an admin revokes a key, and every token it
  signed is refused at once (its check constraint widens).

On PostgreSQL the runtime role may SELECT, INSERT, UPDATE and DELETE ``login_throttle``
rows (a success forgets its source's failures); nothing else changes.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "auth_0004"
# On the line that gateway_0004 starts, so that auth_0003 stays a head in
# alembic_version and the previous release still serves after this upgrade. No
# dependency on auth_0003 (it would leave alembic_version): this revision touches only
# auth_0001's tables, which gateway_0004 already depends on.
down_revision = "gateway_0004"
branch_labels = None
depends_on = None
# Previous code runs on it: added nullable columns, a table and a wider status; it merely
# cannot log in people not yet enrolled (who could not anyway) and sees a revoked JWT key
# as retired-like (unknown status, its tokens refused once past the retain window).
backward_compatible = True

_TS = 27


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("enrollment_token_hash", sa.String(256)))
        batch.add_column(sa.Column("enrollment_expires_at", sa.String(_TS)))
        batch.alter_column("password_hash", existing_type=sa.String(256), nullable=True)
        batch.alter_column("sealed_totp_secret", existing_type=sa.LargeBinary, nullable=True)
    op.execute("UPDATE users SET locked_until = NULL")
    with op.batch_alter_table("jwt_keys") as batch:
        batch.drop_constraint("ck_jwt_keys_status", type_="check")
        batch.create_check_constraint(
            "ck_jwt_keys_status", "status IN ('current', 'retired', 'revoked')"
        )
    op.create_table(
        "login_throttle",
        sa.Column("account", sa.String(64), primary_key=True),
        sa.Column("source", sa.String(64), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure_at", sa.Float, nullable=False, index=True),
    )
    app_role = context.config.attributes.get("app_role")
    if op.get_bind().dialect.name == "postgresql" and app_role:
        op.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON login_throttle TO "{app_role}"')


def downgrade() -> None:
    op.drop_table("login_throttle")
    op.execute("UPDATE jwt_keys SET status = 'retired' WHERE status = 'revoked'")
    with op.batch_alter_table("jwt_keys") as batch:
        batch.drop_constraint("ck_jwt_keys_status", type_="check")
        batch.create_check_constraint("ck_jwt_keys_status", "status IN ('current', 'retired')")
    with op.batch_alter_table("users") as batch:
        batch.drop_column("enrollment_expires_at")
        batch.drop_column("enrollment_token_hash")
