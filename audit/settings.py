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
# How a key of each declared field type is read from TOML (bools are checked apart).
_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "Path": Path}


@dataclass(frozen=True)
class AuditSettings:
    """``origin``: the log's name, the first line of every checkpoint and the name of its
    keys; ``checkpoint_interval_seconds``: how often a quiet log still gets a fresh signed
    tree head; ``retention_interval_seconds``: how often retention runs;
    ``commit_timeout_seconds``: after this a waiting request gets 503;
    ``record_probes``: whether liveness/readiness probes and metrics scrapes are written
    to the log (by default they are only counted in metrics: ~32k records per pod and day
    otherwise); ``breaker_failure_threshold``: consecutive failed commits after which
    requests are refused at once (503) instead of each waiting out the commit timeout;
    ``breaker_recovery_timeout_seconds``: how long the breaker stays open before one trial
    commit decides whether it closes."""

    origin: str = DEFAULT_ORIGIN
    checkpoint_interval_seconds: float = 300.0
    retention_interval_seconds: float = 86400.0
    commit_timeout_seconds: float = 5.0
    max_batch: int = 2048
    record_probes: bool = False
    breaker_failure_threshold: int = 5
    breaker_recovery_timeout_seconds: float = 10.0
    retention_policy: Path = DEFAULT_RETENTION_POLICY

    def __post_init__(self) -> None:
        for name in ("checkpoint_interval_seconds", "retention_interval_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"audit.{name} must be positive")
        if not 0 < self.commit_timeout_seconds <= 60:
            raise ValueError("audit.commit_timeout_seconds must be in (0, 60]")
        if self.breaker_failure_threshold < 1:
            raise ValueError("audit.breaker_failure_threshold must be at least 1")
        if self.breaker_recovery_timeout_seconds <= 0:
            raise ValueError("audit.breaker_recovery_timeout_seconds must be positive")
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
            # Each value as its field's declared type (annotations are strings here).
            if known[name] == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"audit.{name} must be true or false")
                values[name] = value
            else:
                values[name] = _KINDS[str(known[name])](value)
        return cls(**values)
