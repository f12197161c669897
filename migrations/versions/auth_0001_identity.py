"""auth: users, API keys, JWT signing keys and the revocation counter

Revision ID: auth_0001
Revises:
Create Date: 2026-11-23

Passwords and API key secrets are stored only as argon2id hashes; TOTP secrets and JWT
private keys only sealed with AES-256-GCM under the master key. Nothing is ever deleted:
users are disabled, keys revoked or retired, so the access review and the audit log keep
their meaning. On PostgreSQL the runtime role gets SELECT, INSERT and UPDATE, no DELETE.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

revision = "auth_0001"
down_revision = None
branch_labels = ("auth",)
depends_on = None
# Adds tables only.
backward_compatible = True

_TS = 27  # canonical UTC timestamps, as in the audit log
_TABLES = ("users", "api_keys", "jwt_keys", "auth_revision")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(256), nullable=False),
        sa.Column("sealed_totp_secret", sa.LargeBinary, nullable=False),
        sa.Column("roles", sa.String(256), nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
        sa.Column("locked_until", sa.String(_TS)),
        sa.Column("last_totp_step", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("created_at", sa.String(_TS), nullable=False),
        sa.Column("last_login_at", sa.String(_TS)),
        sa.Column("password_changed_at", sa.String(_TS), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("secret_hash", sa.String(256), nullable=False),
        sa.Column("created_at", sa.String(_TS), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.String(_TS), nullable=False),
        sa.Column("allowed_cidrs", sa.Text, nullable=False, server_default="[]"),
        sa.Column("revoked_at", sa.String(_TS)),
        sa.Column("last_used_at", sa.String(_TS)),
        sa.Column("rotated_from", sa.String(40)),
    )
    op.create_table(
        "jwt_keys",
        sa.Column("kid", sa.String(64), primary_key=True),
        sa.Column("alg", sa.String(16), nullable=False),
        sa.Column("public_key", sa.Text, nullable=False),
        sa.Column("sealed_private_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.String(_TS), nullable=False),
        sa.Column("retired_at", sa.String(_TS)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.CheckConstraint("status IN ('current', 'retired')", name="ck_jwt_keys_status"),
    )
    op.execute(
        "CREATE UNIQUE INDEX ux_jwt_keys_one_current ON jwt_keys (status) WHERE status = 'current'"
    )
    # Bumped by every revoke, rotate, disable or role change: each process drops its
    # cached credentials when it sees a new value, so revocation reaches every instance.
    op.create_table(
        "auth_revision",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("revision", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO auth_revision (id, revision) VALUES (1, 0)")
    app_role = context.config.attributes.get("app_role")
    if op.get_bind().dialect.name == "postgresql" and app_role:
        for table in _TABLES:
            op.execute(f'GRANT SELECT, INSERT, UPDATE ON {table} TO "{app_role}"')


def downgrade() -> None:
    for table in reversed(_TABLES):
        op.drop_table(table)
