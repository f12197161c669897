"""audit: the tree head at a size never changes, at size 0 too

Revision ID: audit_0004
Revises:
Create Date: 2026-11-27

A review found that the head could be rewritten where it does not move: at size 0 a tree
head with any root could be inserted (the guard refused only sizes below the head's),
and the log head onto it; at any size the log head's root or compact range could be
rewritten in place. Now, on both databases:

- a tree head inserted at the log head's size must sign the log head's root (signing
  the current head, e.g. the empty tree at start, stays possible);
- an update of ``audit_log_head`` that keeps its size may change nothing.

The runtime's own SQLite connections are further restricted by the gateway
(``gateway.sqlite_guard``): they cannot write ``audit_retention`` nor change the schema.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "audit_0004"
# Starts the audit tables' own line (``audit_v2``) instead of replacing audit_0003, so
# that audit_0003 stays a head in alembic_version and the previous release still serves
# after this upgrade. No declared dependency on audit_0003 (Alembic would drop it from
# there): gateway.db.migrate applies it first, and upgrade() checks that it did.
down_revision = None
branch_labels = ("audit_v2",)
depends_on = None
# The previous release never rewrites a head in place nor signs another root at its size.
backward_compatible = True

_SQLITE_TREE_HEADS = (
    "CREATE TRIGGER audit_tree_heads_at_head_size BEFORE INSERT ON audit_tree_heads "
    "WHEN NEW.size = (SELECT size FROM audit_log_head WHERE id = 1) "
    "AND NEW.root IS NOT (SELECT root FROM audit_log_head WHERE id = 1) "
    "BEGIN SELECT RAISE(ABORT, 'audit_tree_heads: another root at the log head''s size "
    "refused'); END"
)
_SQLITE_LOG_HEAD = (
    "CREATE TRIGGER audit_log_head_in_place BEFORE UPDATE ON audit_log_head "
    "WHEN NEW.size = OLD.size AND (NEW.root IS NOT OLD.root OR NEW.compact IS NOT OLD.compact) "
    "BEGIN SELECT RAISE(ABORT, 'audit_log_head: rewriting the head at its size refused'); END"
)


def _pg_functions(search_path: str, strict: bool) -> list[str]:
    """The guards of audit_0003, with (``strict``) or without this revision's checks."""
    same_size = (
        """
          ELSIF NEW.size = OLD.size AND (NEW.root IS DISTINCT FROM OLD.root
                OR NEW.compact IS DISTINCT FROM OLD.compact) THEN
            RAISE EXCEPTION 'audit_log_head: rewriting the head at its size refused'
              USING ERRCODE = 'insufficient_privilege';"""
        if strict
        else ""
    )
    head_root = (
        """
          ELSIF NEW.size = (SELECT size FROM audit_log_head WHERE id = 1)
                AND NEW.root IS DISTINCT FROM (SELECT root FROM audit_log_head WHERE id = 1) THEN
            RAISE EXCEPTION 'audit_tree_heads: another root at the log head''s size refused'
              USING ERRCODE = 'insufficient_privilege';"""
        if strict
        else ""
    )
    return [
        f"""
        CREATE OR REPLACE FUNCTION audit_log_head_guard() RETURNS trigger
        LANGUAGE plpgsql {search_path} AS $$
        BEGIN
          IF NEW.id <> OLD.id OR NEW.size < OLD.size OR NOT EXISTS
              (SELECT 1 FROM audit_tree_heads WHERE size = NEW.size AND root = NEW.root) THEN
            RAISE EXCEPTION 'audit_log_head only moves forward onto a signed tree head'
              USING ERRCODE = 'insufficient_privilege';{same_size}
          END IF;
          RETURN NEW;
        END $$
        """,
        f"""
        CREATE OR REPLACE FUNCTION audit_tree_heads_guard() RETURNS trigger
        LANGUAGE plpgsql {search_path} AS $$
        BEGIN
          IF NEW.size < (SELECT size FROM audit_log_head WHERE id = 1) THEN
            RAISE EXCEPTION 'audit_tree_heads: a tree head never goes back'
              USING ERRCODE = 'insufficient_privilege';{head_root}
          END IF;
          RETURN NEW;
        END $$
        """,
    ]


def _postgresql(strict: bool) -> None:
    schema = op.get_bind().exec_driver_sql("SELECT current_schema()").scalar_one()
    for statement in _pg_functions(f'SET search_path = "{schema}", pg_temp', strict):
        op.execute(statement)


def upgrade() -> None:
    if not sa.inspect(op.get_bind()).has_table("audit_log_head"):
        raise RuntimeError("audit_0004 needs audit_0003 first: upgrade with gateway.db.migrate")
    if op.get_bind().dialect.name == "sqlite":
        op.execute(_SQLITE_TREE_HEADS)
        op.execute(_SQLITE_LOG_HEAD)
    else:
        _postgresql(strict=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER audit_log_head_in_place")
        op.execute("DROP TRIGGER audit_tree_heads_at_head_size")
    else:
        _postgresql(strict=False)
