"""Errors the audit log raises to its callers."""

from __future__ import annotations


class AuditUnavailable(RuntimeError):
    """The audit store could not durably commit a record: the caller must refuse (503)."""
