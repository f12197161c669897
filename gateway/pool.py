"""The process pool that runs KZG work off the event loop.

Each worker is a process that loads the engine once and then serves one call at a time
over its own pipe. The event loop hands a call to an idle worker or queues it; the queue
is bounded, and a call that finds it full is shed (``PoolSaturated`` → 503 + Retry-After).
A worker that dies fails only its own call (``WorkerCrashed`` → 503) and is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import multiprocessing
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)

_READY = b"ready"
_STOP = b"stop"


class PoolSaturated(RuntimeError):
    """Every worker is busy and the waiting queue is full."""


class WorkerCrashed(RuntimeError):
    """The worker running the call died before answering."""


class PoolClosed(RuntimeError):
    """The pool is stopping or stopped."""


@dataclass(frozen=True)
class PoolSettings:
    """``workers``: processes (default one per core); ``max_queue``: calls that may wait
    for a worker before new ones are shed; ``start_method``: "fork" (default: the engine
    is loaded once in the server and inherited) or "forkserver"/"spawn" (each worker
    loads its own)."""

    engine: str = "blspy"
    workers: int = 0
    max_queue: int = 0
    start_method: str = "fork"
    retry_after_seconds: int = 1

    @property
    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0)) or 1

    @property
    def queue_limit(self) -> int:
        return self.max_queue or 8 * self.worker_count


_WARM_ENGINES: dict[str, Any] = {}


def warm_engine(name: str) -> Any:
    """Load ``name`` once per process: forked workers inherit it already built (the
    precomputed tables take seconds to load), so starting or replacing one is instant."""
    if name not in _WARM_ENGINES:
        from kzg import load_engine

        _WARM_ENGINES[name] = load_engine(name)
    return _WARM_ENGINES[name]


def _drop_inherited_descriptors(keep: Connection) -> None:
    """A forked worker starts with copies of every descriptor of the server: listening
    sockets, database connections, other workers' pipes. Close them all, so that a port
    can be reused and the server sees EOF on the pipe of a worker that died. The objects
    that owned them are frozen first: never collected, they never close a reused number."""
    gc.freeze()
    fd = keep.fileno()
    os.closerange(3, fd)
    os.closerange(fd + 1, os.sysconf("SC_OPEN_MAX"))


def _worker_main(conn: Connection, engine_name: str, forked: bool) -> None:
    """Load the engine (inherited when forked), then answer calls until told to stop."""
    if forked:
        _drop_inherited_descriptors(conn)
    engine = warm_engine(engine_name)
    conn.send_bytes(_READY)
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if request == _STOP:
            return
        function, args = pickle.loads(request)  # noqa: S301 - only the parent writes this pipe
        try:
            target = getattr(engine, function) if isinstance(function, str) else None
            result = (True, target(*args) if target else function(engine, *args))
        except Exception as exc:
            result = (False, exc)
        conn.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


class _Worker:
    def __init__(self, context: Any, engine_name: str) -> None:
        self.conn, child = context.Pipe(duplex=True)
        forked = context.get_start_method() == "fork"
        self.process = context.Process(
            target=_worker_main,
            args=(child, engine_name, forked),
            daemon=True,
            name="kzg-worker",
        )
        self.process.start()
        child.close()
        self.future: asyncio.Future[Any] | None = None


class EnginePool:
    """``await pool.call("verify_kzg_proof", c, z, y, p)`` runs an engine method in a
    worker; ``call(fn, *args)`` runs a module-level ``fn(engine, *args)``."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context(settings.start_method)
        self._idle: collections.deque[_Worker] = collections.deque()
        self._workers: set[_Worker] = set()
        self._waiting: collections.deque[asyncio.Future[_Worker]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        return len(self._workers) - len(self._idle)

    @property
    def ready(self) -> bool:
        return not self._closed and len(self._workers) == self.settings.worker_count

    async def start(self) -> None:
        """Start the workers and wait until each has loaded its engine."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        if self.settings.start_method == "fork":
            await self._loop.run_in_executor(None, warm_engine, self.settings.engine)
        for _ in range(self.settings.worker_count):
            await self._spawn()

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        # Started on the loop thread, one at a time, so no fork copies a half-made pipe.
        worker = _Worker(self._context, self.settings.engine)
        hello = await loop.run_in_executor(None, self._await_ready, worker)
        if hello != _READY:
            worker.process.kill()
            raise RuntimeError(f"KZG worker failed to start (engine {self.settings.engine!r})")
        if self._closed:
            worker.process.kill()
            return
        self._workers.add(worker)
        loop.add_reader(worker.conn.fileno(), self._on_readable, worker)
        self._release(worker)

    @staticmethod
    def _await_ready(worker: _Worker) -> bytes:
        try:
            return worker.conn.recv_bytes()
        except (EOFError, OSError):
            return b""

    async def call(self, function: str | Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` in a worker and return its result (or raise its exception)."""
        if self._closed:
            raise PoolClosed("the KZG pool is not running")
        worker = await self._acquire()
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        worker.future = future
        try:
            worker.conn.send_bytes(pickle.dumps((function, args), protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            self._lost(worker)
        ok, value = await future
        if ok:
            return value
        raise value

    async def _acquire(self) -> _Worker:
        if self._idle:
            return self._idle.popleft()
        if len(self._waiting) >= self.settings.queue_limit:
            raise PoolSaturated("every KZG worker is busy and the queue is full")
        assert self._loop is not None
        waiter: asyncio.Future[_Worker] = self._loop.create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)
            raise

    def _release(self, worker: _Worker) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def _on_readable(self, worker: _Worker) -> None:
        try:
            payload = worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._lost(worker)
            return
        future, worker.future = worker.future, None
        if future is not None and not future.done():
            future.set_result(pickle.loads(payload))  # noqa: S301 - our own worker's answer
        self._release(worker)

    def _lost(self, worker: _Worker) -> None:
        """Fail the dead worker's call and start a replacement."""
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.conn.fileno())
        worker.conn.close()
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        worker.process.join(timeout=0)
        if worker.future is not None and not worker.future.done():
            worker.future.set_result((False, WorkerCrashed("the KZG worker died during the call")))
        worker.future = None
        if not self._closed:
            log.warning(
                "KZG worker %s died (exit %s); starting a new one",
                worker.process.pid,
                worker.process.exitcode,
            )
            self._loop.create_task(self._spawn())

    async def stop(self) -> None:
        """Stop taking calls, fail the waiting ones and end the workers."""
        self._closed = True
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(PoolClosed("the KZG pool stopped"))
        for worker in list(self._workers):
            assert self._loop is not None
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(worker.conn.fileno())
            with contextlib.suppress(OSError):
                worker.conn.send_bytes(_STOP)
            worker.conn.close()
            if worker.future is not None and not worker.future.done():
                worker.future.set_exception(PoolClosed("the KZG pool stopped"))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._join_all, list(self._workers))
        self._workers.clear()
        self._idle.clear()

    @staticmethod
    def _join_all(workers: list[_Worker]) -> None:
        for worker in workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
