"""Alembic environment and versions; each domain (gateway, audit, auth) is its own branch."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
