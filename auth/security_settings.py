"""The typed sections of ``policies/security.toml`` (with the configuration's ``[auth]``
tables merged over it): each table a frozen dataclass, parsed once when the policy is
loaded, so that a typo in a key is refused naming it instead of passing as a default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from audit import settings


class PolicyError(ValueError):
    """A policy file is missing or inconsistent."""


@dataclass(frozen=True)
class Passwords:
    """argon2id costs, the shortest password people may choose, and the bounded hashing
    pool (defaults for policy files older than ``hashing_threads``/``hashing_queue``)."""

    time_cost: int
    memory_kib: int
    parallelism: int
    min_length: int
    hashing_threads: int = 2
    hashing_queue: int = 8


@dataclass(frozen=True)
class LoginThrottle:
    free_failures: int
    base_delay_seconds: float
    max_delay_seconds: float
    forget_after_seconds: float
    account_alert_failures: int


@dataclass(frozen=True)
class Enrollment:
    token_hours: float


@dataclass(frozen=True)
class Tokens:
    issuer: str
    audience: str
    ttl_seconds: int
    jwt_key_max_age_days: float
    jwt_key_retain_days: float


@dataclass(frozen=True)
class ApiKeys:
    default_expiry_days: int
    max_expiry_days: int
    cache_seconds: float
    revocation_check_seconds: float


@dataclass(frozen=True)
class LogKeys:
    max_age_days: float


@dataclass(frozen=True)
class AccessReview:
    stale_after_days: float
    expiring_within_days: float


@dataclass(frozen=True)
class Rate:
    """A token bucket: ``rate`` requests a second, at most ``burst`` at once."""

    rate: float
    burst: float


@dataclass(frozen=True)
class EngineShare:
    max_in_flight: int

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be an integer >= 1")


@dataclass(frozen=True)
class RatelimitSharing:
    """Defaults for policy files older than the section."""

    sync_seconds: float = 0.5
    horizon_seconds: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.sync_seconds < self.horizon_seconds:
            raise ValueError("needs 0 < sync_seconds < horizon_seconds")


_T = TypeVar("_T")


def parse_table(cls: type[_T], name: str, table: Any, origin: str) -> _T:
    """``table`` as ``cls`` (``audit.settings.parse_table``), refusals naming ``origin``
    too: the file and any override."""
    try:
        return settings.parse_table(cls, name, table)
    except settings.SettingsError as exc:
        raise PolicyError(f"{exc} (in {origin})") from None
