"""argon2id on its own few threads, refused at once when they are all taken.

One verification costs ~175 ms and 64 MiB with the shipped parameters. On the default
thread pool a flood of credentials would queue without bound ahead of receipt signing
and everything else that pool runs; here at most ``threads`` run and ``queue`` wait, and
the next caller gets ``HashingBusy`` (503 + Retry-After) instead of a place in line.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from argon2 import PasswordHasher

from auth import credentials
from auth.policy import SecurityPolicy
from auth.security_settings import Passwords

T = TypeVar("T")
DEFAULT_THREADS = Passwords.hashing_threads
DEFAULT_QUEUE = Passwords.hashing_queue


class HashingBusy(Exception):
    """Every argon2 slot is taken: refused at once, not queued. Callers map it like a
    dependency that is away (503 with Retry-After), and name it where they do."""


class HashingPool:
    """argon2id hashes and verifications on a bounded executor; ``on_verify(kind)`` is
    called for each verification that ran (kind: "api_key" or "password")."""

    def __init__(
        self,
        hasher: PasswordHasher,
        threads: int = DEFAULT_THREADS,
        queue: int = DEFAULT_QUEUE,
        on_verify: Callable[[str], None] | None = None,
    ) -> None:
        if threads < 1 or queue < 0:
            raise ValueError("hashing pool: threads >= 1 and queue >= 0")
        self._hasher = hasher
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self._capacity = threads + queue
        self._pending = 0
        # Released from the worker thread when the work ends, not when its awaiter does:
        # a cancelled request must not free a slot its argon2 run still occupies.
        self._lock = threading.Lock()
        self._on_verify = on_verify

    @classmethod
    def from_policy(
        cls, policy: SecurityPolicy, on_verify: Callable[[str], None] | None = None
    ) -> HashingPool:
        """``[passwords] hashing_threads`` and ``hashing_queue``."""
        return cls(
            credentials.password_hasher(policy),
            policy.passwords.hashing_threads,
            policy.passwords.hashing_queue,
            on_verify,
        )

    @property
    def pending(self) -> int:
        """Calls running or waiting for a thread."""
        return self._pending

    def _release(self, _done: Future[Any]) -> None:
        with self._lock:
            self._pending -= 1

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a hashing thread; HashingBusy at once when none is free."""
        with self._lock:
            if self._pending >= self._capacity:
                raise HashingBusy("argon2 verification is saturated")
            self._pending += 1
        try:
            submitted = self._executor.submit(fn, *args)
        except BaseException:
            self._release(Future())
            raise
        submitted.add_done_callback(self._release)
        return await asyncio.wrap_future(submitted)

    async def hash(self, secret: str) -> str:
        return await self.run(self._hasher.hash, secret)

    async def verify(self, stored: str, secret: str, kind: str) -> bool:
        """argon2id verification of ``secret`` against ``stored``; False for a mismatch."""
        return await self.run(self._counted_verify, stored, secret, kind)

    def _counted_verify(self, stored: str, secret: str, kind: str) -> bool:
        try:
            return credentials.verify_hash(self._hasher, stored, secret)
        finally:
            if self._on_verify is not None:
                self._on_verify(kind)

    def close(self) -> None:
        """Stop taking work; runs already started finish on their threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
