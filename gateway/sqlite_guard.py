"""What the running gateway's own SQLite connections may not do.

SQLite has no roles: the file's owner (``kzg-gateway init``, migrations) and the running
gateway use the same database. On PostgreSQL the runtime role is granted only what it
needs; on SQLite an authorizer on each of the runtime's connections stands in for those
grants. It refuses, at statement preparation:

- any write to ``audit_retention``: the retention floor is the owner's (a lowered floor
  would let retention prune young records);
- every schema change (CREATE, DROP, ALTER: the triggers that keep the log append-only
  must stay), ATTACH and DETACH;
- every PRAGMA that sets a value, but the introspection ones SQLAlchemy uses: e.g.
  ``writable_schema`` would let the schema (and its triggers) be edited as data, and
  ``ignore_check_constraints`` the floor's CHECK be skipped.

The connection's own pragmas (WAL, synchronous, foreign keys) are set before the
authorizer is installed.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

OWNER_ONLY_TABLES = frozenset({"audit_retention"})
_WRITES = frozenset({sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE})
_SCHEMA = frozenset(
    getattr(sqlite3, name)
    for name in dir(sqlite3)
    if name.startswith(("SQLITE_CREATE_", "SQLITE_DROP_"))
) | {sqlite3.SQLITE_ALTER_TABLE, sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH}
# Pragmas that take an argument yet only read (SQLAlchemy's reflection and isolation).
_READING_PRAGMAS = frozenset(
    {
        "table_info",
        "table_xinfo",
        "index_list",
        "index_info",
        "index_xinfo",
        "foreign_key_list",
        "read_uncommitted",
    }
)


def authorize(action: int, arg1: str | None, arg2: str | None, *_: Any) -> int:
    """The sqlite3 authorizer of a runtime connection."""
    if action in _WRITES and arg1 in OWNER_ONLY_TABLES:
        return sqlite3.SQLITE_DENY
    if action in _SCHEMA:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None:
        return (
            sqlite3.SQLITE_OK if (arg1 or "").lower() in _READING_PRAGMAS else sqlite3.SQLITE_DENY
        )
    return sqlite3.SQLITE_OK


def guard_runtime(engine: AsyncEngine) -> AsyncEngine:
    """Install ``authorize`` on every new connection of ``engine`` (SQLite only; on
    PostgreSQL the runtime role's grants do this); return the engine."""
    if engine.dialect.name != "sqlite":
        return engine

    @event.listens_for(engine.sync_engine, "connect")
    def _guard(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.run_async(lambda conn: conn.set_authorizer(authorize))

    return engine
