"""A circuit breaker in front of the audit store: once commits keep failing, callers are
refused at once instead of each doing its work and then waiting out the commit timeout.

Closed: everything passes; ``failure_threshold`` consecutive failed commits open it.
Open: ``allow()`` is False until ``recovery_timeout`` has passed. Half-open: one caller is
let through as the trial; the next commit outcome closes the breaker or opens it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "half_open", "open"]
# The value of the state gauge: what dashboards and the alert compare against.
STATE_VALUES: dict[State, int] = {"closed": 0, "half_open": 1, "open": 2}

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 5,
        recovery_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or recovery_timeout <= 0:
            raise ValueError("failure_threshold >= 1 and recovery_timeout > 0 are required")
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_at: float | None = None

    @property
    def state(self) -> State:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at < self.recovery_timeout:
            return "open"
        return "half_open"

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def allow(self) -> bool:
        """Whether a caller may go on to do work whose record must be committed."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        now = self._clock()
        # One trial at a time; a trial that never reported (its caller vanished before
        # the commit) is replaced after another recovery period.
        if self._trial_at is None or now - self._trial_at >= self.recovery_timeout:
            self._trial_at = now
            return True
        return False

    def record_success(self) -> None:
        if self._opened_at is not None:
            log.info("audit breaker closed: a commit succeeded")
        self._failures = 0
        self._opened_at = None
        self._trial_at = None

    def record_failure(self) -> None:
        self._failures += 1
        trial_failed = self._opened_at is not None and self.state == "half_open"
        if trial_failed or (self._opened_at is None and self._failures >= self.failure_threshold):
            log.warning(
                "audit breaker open after %d consecutive failed commits; retrying in %.0f s",
                self._failures,
                self.recovery_timeout,
            )
            self._opened_at = self._clock()
            self._trial_at = None
