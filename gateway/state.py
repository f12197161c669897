"""What the running server knows about itself: draining, in-flight requests, the audit
breaker, and the last readiness checks (refreshed in the background, so that /readyz
answers from memory in milliseconds whatever the database does)."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from audit.breaker import CircuitBreaker
from gateway.settings import ServerSettings

# Routes that are counted in metrics rather than written to the audit log (unless
# ``[audit] record_probes = true``).
PROBE_ROUTES = frozenset({"healthz", "readyz", "metrics"})


@dataclass(frozen=True)
class ProbeSettings:
    """``[server] readiness_interval_seconds``: how often the readiness checks run in the
    background; ``[server] min_free_disk_mib``: free space the SQLite data directory needs
    for the instance to be ready."""

    readiness_interval_seconds: float = ServerSettings.readiness_interval_seconds
    min_free_disk_mib: int = ServerSettings.min_free_disk_mib

    def __post_init__(self) -> None:
        if not 0 < self.readiness_interval_seconds <= 60:
            raise ValueError("server.readiness_interval_seconds must be in (0, 60]")
        if self.min_free_disk_mib < 0:
            raise ValueError("server.min_free_disk_mib must not be negative")

    @classmethod
    def from_settings(cls, server: ServerSettings) -> ProbeSettings:
        return cls(server.readiness_interval_seconds, server.min_free_disk_mib)


def free_bytes(path: Path) -> int:
    """Free space for an unprivileged writer on the file system holding ``path``."""
    return shutil.disk_usage(path).free


@dataclass
class ServerState:
    """``draining`` turns /readyz to 503 so load balancers stop sending; ``idle`` is set
    whenever no request is in flight, so shutdown can wait for the last one."""

    draining: bool = False
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    record_probes: bool = False
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    # The checks that need the database, as last measured, and when (monotonic time).
    checks: dict[str, bool] = field(default_factory=dict)
    checked_at: float | None = None

    def __post_init__(self) -> None:
        self.idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()

    def store_checks(self, checks: dict[str, bool]) -> None:
        self.checks = checks
        self.checked_at = time.monotonic()

    def checks_age(self) -> float | None:
        return None if self.checked_at is None else time.monotonic() - self.checked_at
