"""Alembic environment and versions: a line per domain (gateway, audit, auth) up to the
previous release's heads, and the lines this release started after them."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent

# The heads of the release before ``schema_revisions``, which serves only while these
# very revisions are in alembic_version. Later migrations start new lines instead of
# replacing them (``gateway_0004`` → ``auth_0004``, and ``audit_0004`` for the audit
# tables) and may not declare a dependency on them (Alembic would drop a dependency from
# alembic_version); ``gateway.db.migrate`` applies these first, so the new lines may rely
# on their tables.
PREVIOUS_RELEASE_HEADS = ("audit_0003", "auth_0003", "gateway_0003")

# The audit tables alone, at their newest (a store for the audit log and nothing else).
AUDIT_TARGETS = ("audit@head", "audit_v2@head")
