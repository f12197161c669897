"""The ``[audit]`` section of the gateway configuration, and ``parse_table``: the one parser
of typed TOML tables, which the gateway's configuration sections and the security policy
(auth/security_settings.py) use too."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from audit.retention import RetentionPolicy

DEFAULT_RETENTION_POLICY = Path("policies/retention.toml")
# Every instance of a deployment must share one origin; production sets its own.
DEFAULT_ORIGIN = "kzg-gateway.localhost/audit"


class SettingsError(ValueError):
    """A typed table holds an unknown key, lacks a required one, or holds a value of the
    wrong kind; ``key`` is "" when the table as a whole is at fault."""

    def __init__(self, section: str, key: str, message: str) -> None:
        super().__init__(message)
        self.section = section
        self.key = key


# What TOML value each declared field type takes, and how it is named in an error: an
# integer is a number where a float is meant, a bool is no number, a string names a path.
_KINDS: dict[str, tuple[tuple[type, ...], type, str]] = {
    "bool": ((bool,), bool, "true or false"),
    "int": ((int,), int, "an integer"),
    "float": ((int, float), float, "a number"),
    "str": ((str,), str, "a string"),
    "Path": ((str, Path), Path, "a path"),
}
_T = TypeVar("_T")


def table_value(section: str, key: str, kind: str, value: Any) -> Any:
    """``value`` as a field of type ``kind``, or SettingsError naming ``[section] key``."""
    accepted, build, name = _KINDS[kind]
    if not isinstance(value, accepted) or (isinstance(value, bool) and kind != "bool"):
        raise SettingsError(section, key, f"[{section}] {key} must be {name}, got {value!r}")
    return build(value)


def parse_table(cls: type[_T], section: str, table: Any) -> _T:
    """``table`` as the dataclass ``cls``: an unknown key, a missing key without a default
    and a value of the wrong kind are refused naming ``[section] key``, and so is what the
    dataclass's own checks refuse."""
    if not isinstance(table, Mapping):
        raise SettingsError(section, "", f"[{section}] must be a table")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for key in table:
        if key not in known:
            raise SettingsError(section, key, f"unknown [{section}] key {key!r}")
    values: dict[str, Any] = {}
    for key, item in known.items():
        if key in table:
            # Annotations are strings here (``from __future__ import annotations``).
            values[key] = table_value(section, key, str(item.type), table[key])
        elif item.default is MISSING and item.default_factory is MISSING:
            raise SettingsError(section, key, f"missing [{section}] key {key!r}")
    try:
        return cls(**values)
    except ValueError as exc:
        raise SettingsError(section, "", f"[{section}] {exc}") from None


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
                raise ValueError(f"{name} must be positive")
        if not 0 < self.commit_timeout_seconds <= 60:
            raise ValueError("commit_timeout_seconds must be in (0, 60]")
        if self.breaker_failure_threshold < 1:
            raise ValueError("breaker_failure_threshold must be at least 1")
        if self.breaker_recovery_timeout_seconds <= 0:
            raise ValueError("breaker_recovery_timeout_seconds must be positive")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not self.origin or any(c.isspace() or c == "+" for c in self.origin):
            raise ValueError("origin must be non-empty, without spaces or '+'")

    def retention(self) -> RetentionPolicy:
        """The retention policy the ``retention_policy`` file holds."""
        return RetentionPolicy.load(self.retention_policy)

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> AuditSettings:
        """Parse the ``[audit]`` section (SettingsError names what is wrong)."""
        return parse_table(cls, "audit", section)
