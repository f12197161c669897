"""The identity tables (created by migration ``auth_0001``), for SQLAlchemy Core."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

metadata = sa.MetaData()
# A partial index's condition, as the migrations write it for both dialects.
CURRENT_ONLY: dict[str, Any] = {
    "sqlite_where": sa.text("status = 'current'"),
    "postgresql_where": sa.text("status = 'current'"),
}

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    # NULL until the person enrols (migration auth_0004).
    sa.Column("password_hash", sa.String(256)),
    sa.Column("sealed_totp_secret", sa.LargeBinary),
    sa.Column("roles", sa.String(256), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("failed_logins", sa.Integer, nullable=False, server_default="0"),
    sa.Column("locked_until", sa.String(27)),
    sa.Column("last_totp_step", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("created_at", sa.String(27), nullable=False),
    sa.Column("last_login_at", sa.String(27)),
    sa.Column("password_changed_at", sa.String(27), nullable=False),
    sa.Column("enrollment_token_hash", sa.String(256)),
    sa.Column("enrollment_expires_at", sa.String(27)),
)

# Failed logins per (account reference, source address or IPv6 /64), for growing delays
# that hold back the failing source only (migration auth_0004).
login_throttle = sa.Table(
    "login_throttle",
    metadata,
    sa.Column("account", sa.String(64), primary_key=True),
    sa.Column("source", sa.String(64), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last_failure_at", sa.Float, nullable=False, index=True),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("secret_hash", sa.String(256), nullable=False),
    sa.Column("created_at", sa.String(27), nullable=False),
    sa.Column("created_by", sa.String(64), nullable=False),
    sa.Column("expires_at", sa.String(27), nullable=False),
    sa.Column("allowed_cidrs", sa.Text, nullable=False, server_default="[]"),
    sa.Column("revoked_at", sa.String(27)),
    sa.Column("last_used_at", sa.String(27)),
    sa.Column("rotated_from", sa.String(40)),
)

jwt_keys = sa.Table(
    "jwt_keys",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("alg", sa.String(16), nullable=False),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("sealed_private_key", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.String(27), nullable=False),
    sa.Column("retired_at", sa.String(27)),
    sa.Column("status", sa.String(16), nullable=False),
    # At most one current key, whichever instance rotates.
    sa.Index("ux_jwt_keys_one_current", "status", unique=True, **CURRENT_ONLY),
)

auth_revision = sa.Table(
    "auth_revision",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

# Each instance's running total of tokens spent per rate-limit key (auth.ratelimit).
rate_usage = sa.Table(
    "rate_usage",
    metadata,
    sa.Column("instance_id", sa.String(32), primary_key=True),
    sa.Column("key", sa.String(256), primary_key=True),
    sa.Column("spent", sa.Float, nullable=False),
    sa.Column("rate", sa.Float, nullable=False),
    sa.Column("burst", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False, index=True),
)

# The master key every stored secret is sealed under, as ``MasterKey.check_value()``
# (migration auth_0003): one row, id 1. NULL while nothing is sealed; no row at all for a
# database that held secrets before the table existed, until ``init`` or ``serve`` opens
# them all with their key and records it.
master_key_check = sa.Table(
    "master_key_check",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("check_value", sa.String(64)),
    sa.Column("recorded_at", sa.String(27)),
)
