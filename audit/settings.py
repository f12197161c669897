"""The ``[audit]`` section of the gateway configuration."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from audit.retention import RetentionPolicy

DEFAULT_RETENTION_POLICY = Path("policies/retention.toml")
# Every instance of a deployment must share one origin; production sets its own.
DEFAULT_ORIGIN = "kzg-gateway.localhost/audit"


@dataclass(frozen=True)
class AuditSettings:
    """``origin``: the log's name, the first line of every checkpoint and the name of its
    keys; ``checkpoint_interval_seconds``: how often a quiet log still gets a fresh signed
    tree head; ``retention_interval_seconds``: how often retention runs;
    ``commit_timeout_seconds``: after this a waiting request gets 503."""

    origin: str = DEFAULT_ORIGIN
    checkpoint_interval_seconds: float = 300.0
    retention_interval_seconds: float = 86400.0
    commit_timeout_seconds: float = 5.0
    max_batch: int = 2048
    retention_policy: Path = DEFAULT_RETENTION_POLICY

    def __post_init__(self) -> None:
        for name in ("checkpoint_interval_seconds", "retention_interval_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"audit.{name} must be positive")
        if not 0 < self.commit_timeout_seconds <= 60:
            raise ValueError("audit.commit_timeout_seconds must be in (0, 60]")
        if self.max_batch < 1:
            raise ValueError("audit.max_batch must be at least 1")
        if not self.origin or any(c.isspace() or c == "+" for c in self.origin):
            raise ValueError("audit.origin must be non-empty, without spaces or '+'")

    def retention(self) -> RetentionPolicy:
        """The retention policy the ``retention_policy`` file holds."""
        return RetentionPolicy.load(self.retention_policy)

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> AuditSettings:
        """Parse a config section; unknown keys are refused so typos do not pass silently."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = set(section) - set(known)
        if unknown:
            raise ValueError(f"unknown [audit] settings: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name, value in section.items():
            if name == "retention_policy":
                values[name] = Path(value)
            elif name == "origin":
                values[name] = str(value)
            elif name == "max_batch":
                values[name] = int(value)
            else:
                values[name] = float(value)
        return cls(**values)
