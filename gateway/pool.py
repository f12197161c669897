"""The process pool that runs KZG work off the event loop.

Each worker is a process that loads the engine once and then serves one call at a time
over its own pipe. The event loop hands a call to an idle worker or queues it; the queue
is bounded, and a call that finds it full is shed (``PoolSaturated`` → 503 + Retry-After).
A worker that dies fails only its own call (``WorkerCrashed`` → 503) and is replaced.
``call_many`` admits a group of calls all at once or not at all, then runs them in parallel.

Fair share: a call may name its owner (the principal) and the owner's cap on calls in
flight (admitted, running or waiting); beyond it the calls are refused (``ShareExceeded``
→ 429), so one key cannot take every worker and queue place. Waiting calls queue per
owner, and a freed worker goes to the owners in turn (round robin), so a flood of one
owner's calls delays another's by at most one call per owner waiting.

Workers parse attacker-supplied input, so they hold no secret of the server: they are
never forked from it. An engine server (a fresh interpreter started with an environment
stripped to what an engine needs, so without ``KZG_GATEWAY_MASTER_KEY`` or the database
URL) loads the engine once and forks the workers; each worker's end of its socket is
passed back to the server. One engine server per set of engines serves every pool of the
process. With ``start_method = "spawn"`` each worker is a fresh interpreter instead.

With ``cross_check`` set, each worker also loads that second engine and runs every call on
both: a result leaves the worker only when the two agree byte for byte (or both refuse the
input); otherwise the call fails with ``EngineDisagreement``, which carries both outcomes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from aiohttp import web

from gateway.config import Config, ConfigError
from kzg import ENGINE_NAMES
from kzg.cache import CACHE_DIR_ENV

log = logging.getLogger(__name__)

_READY = b"ready"
_STOP = b"stop"


class PoolSaturated(RuntimeError):
    """Every worker is busy and the waiting queue is full."""


class WorkerCrashed(RuntimeError):
    """The worker running the call died before answering."""


class PoolClosed(RuntimeError):
    """The pool is stopping or stopped."""


class ShareExceeded(RuntimeError):
    """The owner's calls in flight would exceed its cap."""

    def __init__(self, share: EngineShare, in_flight: int, calls: int) -> None:
        super().__init__(
            f"{calls} engine call(s) would exceed this principal's share of the engine: at "
            f"most {share.max_in_flight} at once, {in_flight} already in flight"
        )
        self.share = share


@dataclass(frozen=True)
class EngineShare:
    """Whose calls these are (a principal's rate-limit key) and how many of its calls
    may be in flight at once."""

    owner: str
    max_in_flight: int


# Where the security middleware leaves the caller's share for the KZG routes.
ENGINE_SHARE: web.RequestKey[EngineShare] = web.RequestKey("kzg_engine_share", EngineShare)


# An outcome as a worker reports it: (True, result) or (False, the exception raised).
Outcome = tuple[bool, Any]


class EngineDisagreement(RuntimeError):
    """The engines gave different answers to one call: ``outcomes`` maps each engine's
    name to its outcome, so that the caller can record what each would have answered."""

    def __init__(self, function: str, outcomes: dict[str, Outcome]) -> None:
        super().__init__(function, outcomes)
        self.function = function
        self.outcomes = outcomes

    def __str__(self) -> str:
        return f"the engines {' and '.join(self.outcomes)} disagree on {self.function}"


@dataclass(frozen=True)
class CallResult:
    """One call of ``call_many``: its result, or the exception it raised, and the time
    from its admission to its answer (queueing included)."""

    value: Any
    error: Exception | None
    seconds: float


@dataclass(frozen=True)
class PoolSettings:
    """``workers``: processes (default one per core); ``max_queue``: calls that may wait
    for a worker before new ones are shed; ``start_method``: "fork" (default; the same as
    "forkserver": workers are forked from a clean engine server that loaded the engine
    once) or "spawn" (each worker a fresh interpreter that loads its own);
    ``cross_check``: a second engine every call also runs on ("" for none)."""

    engine: str = "blspy"
    workers: int = 0
    max_queue: int = 0
    start_method: str = "fork"
    retry_after_seconds: int = 1
    cross_check: str = ""

    def __post_init__(self) -> None:
        if self.start_method not in _START_METHODS:
            raise ConfigError(
                f"[pool] start_method must be one of {sorted(_START_METHODS)}, "
                f"got {self.start_method!r}"
            )
        if self.cross_check and (
            self.cross_check == self.engine or self.cross_check not in ENGINE_NAMES
        ):
            others = [n for n in ENGINE_NAMES if n != self.engine]
            raise ConfigError(
                f"[engine] cross_check must name an engine other than [engine] name "
                f"({self.engine!r}): one of {others}, got {self.cross_check!r}"
            )

    @property
    def engine_names(self) -> tuple[str, ...]:
        """The engine that answers first, then the one that checks it (if any)."""
        return (self.engine, self.cross_check) if self.cross_check else (self.engine,)

    @property
    def worker_count(self) -> int:
        return self.workers or len(os.sched_getaffinity(0)) or 1

    @property
    def queue_limit(self) -> int:
        return self.max_queue or 8 * self.worker_count


def pool_settings(config: Config) -> PoolSettings:
    """``[engine] name`` and ``cross_check``, and the ``[pool]`` section (see PoolSettings)."""
    engine, pool = config.engine, config.pool
    return PoolSettings(
        engine=engine.name,
        cross_check=engine.cross_check,
        workers=pool.workers,
        max_queue=pool.max_queue,
        start_method=pool.start_method,
        retry_after_seconds=pool.retry_after_seconds,
    )


_START_METHODS = frozenset({"fork", "forkserver", "spawn"})
# All a worker (or the engine server) sees of the server's environment: never a secret
# such as KZG_GATEWAY_MASTER_KEY or a database URL with its password.
_WORKER_ENV = frozenset(
    {"PATH", "HOME", "LANG", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH"}
    | {CACHE_DIR_ENV}
)

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


def _run_on(engine: Any, function: str | Callable[..., Any], args: Sequence[Any]) -> Outcome:
    try:
        target = getattr(engine, function) if isinstance(function, str) else None
        return True, target(*args) if target else function(engine, *args)
    except Exception as exc:
        return False, exc


def _canonical(value: Any) -> Any:
    """A result as compared across engines: lists and tuples alike, any bytes-like as
    bytes, and other values tagged with their type (a bool never equals an int)."""
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return type(value).__name__, value


def _agree(first: Outcome, second: Outcome) -> bool:
    """Both answered the same bytes, or both refused the same way (e.g. KZGError)."""
    if first[0] != second[0]:
        return False
    if first[0]:
        return _canonical(first[1]) == _canonical(second[1])
    return type(first[1]) is type(second[1])


def _cross_checked(
    engines: Sequence[tuple[str, Any]], function: str | Callable[..., Any], args: Sequence[Any]
) -> Outcome:
    """The first engine's outcome, once every other engine agrees with it."""
    (name, engine), *checkers = engines
    first = _run_on(engine, function, args)
    for other_name, other in checkers:
        second = _run_on(other, function, args)
        if not _agree(first, second):
            label = function if isinstance(function, str) else function.__name__
            return False, EngineDisagreement(label, {name: first, other_name: second})
    return first


def _worker_main(conn: Connection, engine_names: tuple[str, ...], forked: bool) -> None:
    """Load the engines (inherited when forked), then answer calls until told to stop."""
    if forked:
        _drop_inherited_descriptors(conn)
    engines = [(name, warm_engine(name)) for name in engine_names]
    conn.send_bytes(_READY)
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if request == _STOP:
            return
        function, args = pickle.loads(request)  # noqa: S301 - only the parent writes this pipe
        result = _cross_checked(engines, function, args)
        conn.send_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))


def worker_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment an engine process starts with: the server's, minus all but what
    Python and the engines need."""
    source = dict(os.environ if environ is None else environ)
    return {k: v for k, v in source.items() if k in _WORKER_ENV or k.startswith("LC_")}


def _clean_interpreter(
    entry: str, fd: int, engine_names: tuple[str, ...]
) -> subprocess.Popen[bytes]:
    """Start ``gateway.pool.<entry>(fd, engine_names)`` in a fresh interpreter that
    inherits only ``fd`` and the stripped environment (the import path is passed along,
    not inherited: it is no secret, and tests extend it)."""
    code = (
        "import json, sys; sys.path[:] = json.loads(sys.argv[1]); import gateway.pool as p; "
        f"p.{entry}(int(sys.argv[2]), tuple(sys.argv[3].split(',')))"
    )
    return subprocess.Popen(  # noqa: S603 - our interpreter, our code, no shell
        [sys.executable, "-c", code, json.dumps(sys.path), str(fd), ",".join(engine_names)],
        env=worker_environment(),
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        # Out of the terminal's process group: a Ctrl-C reaches the server, which stops
        # its workers; the engine server ends when the server hangs up.
        start_new_session=True,
    )


def _spawned_worker_main(fd: int, engine_names: tuple[str, ...]) -> None:
    """A worker started as its own interpreter (``start_method = "spawn"``)."""
    _worker_main(Connection(fd), engine_names, forked=False)


def _engine_server_main(fd: int, engine_names: tuple[str, ...]) -> None:
    """Load the engines, then fork a worker for every byte received on ``fd`` and send
    back its pid with its end of a new socket. Exits when the server hangs up."""
    control = socket.socket(fileno=fd)
    for name in engine_names:
        warm_engine(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers are reaped as they exit
    control.sendall(_READY)
    while control.recv(1):
        ours, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                control.close()
                ours.close()
                _worker_main(Connection(theirs.detach()), engine_names, forked=True)
            finally:
                os._exit(0)
        theirs.close()
        socket.send_fds(control, [pid.to_bytes(4, "big")], [ours.fileno()])
        ours.close()


class _EngineServer:
    """The client end of one engine server; started on first use, restarted if it died."""

    def __init__(self, engine_names: tuple[str, ...]) -> None:
        self.engine_names = engine_names
        self._lock = threading.Lock()
        self._control: socket.socket | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        self._process = _clean_interpreter(
            "_engine_server_main", theirs.fileno(), self.engine_names
        )
        theirs.close()
        if ours.recv(len(_READY)) != _READY:
            ours.close()
            self._process.wait()
            raise OSError("the KZG engine server did not start")
        self._control = ours
        return ours

    def fork_worker(self) -> tuple[Connection, int]:
        """A new worker: the server's end of its socket, and its pid (blocking)."""
        with self._lock:
            for attempt in (1, 2):
                control = self._control or self._start()
                try:
                    control.sendall(b"f")
                    message, fds, _, _ = socket.recv_fds(control, 4, 1)
                    if len(message) == 4 and len(fds) == 1:
                        return Connection(fds[0]), int.from_bytes(message, "big")
                    for fd in fds:
                        os.close(fd)
                except OSError:
                    if attempt == 2:
                        raise
                self.close()  # it died: start a new one once
            raise OSError("the KZG engine server did not fork a worker")

    def close(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=5)
            if self._process.poll() is None:
                self._process.kill()
                self._process.wait()
            self._process = None


_ENGINE_SERVERS: dict[tuple[str, ...], _EngineServer] = {}
_ENGINE_SERVERS_LOCK = threading.Lock()


def _engine_server(engine_names: tuple[str, ...]) -> _EngineServer:
    with _ENGINE_SERVERS_LOCK:
        if engine_names not in _ENGINE_SERVERS:
            _ENGINE_SERVERS[engine_names] = _EngineServer(engine_names)
        return _ENGINE_SERVERS[engine_names]


def stop_engine_servers() -> None:
    """Stop every engine server of this process; the next pool starts a new one (with
    the environment of that moment, stripped)."""
    with _ENGINE_SERVERS_LOCK:
        servers = list(_ENGINE_SERVERS.values())
        _ENGINE_SERVERS.clear()
    for server in servers:
        with server._lock:
            server.close()


class _Worker:
    """A worker process as the server sees it: its socket and its pid (a spawned worker
    also has its Popen, which reaps it)."""

    def __init__(
        self, conn: Connection, pid: int, process: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.conn = conn
        self.pid = pid
        self.process = process
        self.future: asyncio.Future[Any] | None = None

    @classmethod
    def start(cls, settings: PoolSettings) -> _Worker:
        """Fork one from the engine server, or spawn one (blocking)."""
        if settings.start_method != "spawn":
            conn, pid = _engine_server(settings.engine_names).fork_worker()
            return cls(conn, pid)
        ours, theirs = socket.socketpair()
        process = _clean_interpreter("_spawned_worker_main", theirs.fileno(), settings.engine_names)
        theirs.close()
        return cls(Connection(ours.detach()), process.pid, process)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    @property
    def exitcode(self) -> int | None:
        return self.process.poll() if self.process is not None else None


class EnginePool:
    """``await pool.call("verify_kzg_proof", c, z, y, p)`` runs an engine method in a
    worker; ``call(fn, *args)`` runs a module-level ``fn(engine, *args)``;
    ``call_many([(function, args), ...])`` runs several in parallel."""

    def __init__(self, settings: PoolSettings) -> None:
        self.settings = settings
        self._idle: collections.deque[_Worker] = collections.deque()
        self._workers: set[_Worker] = set()
        # Waiting calls per owner (None: calls without one), served in turn.
        self._queues: dict[str | None, collections.deque[asyncio.Future[_Worker]]] = {}
        self._turns: collections.deque[str | None] = collections.deque()
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = True

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [worker.pid for worker in self._workers]

    @property
    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    @property
    def busy(self) -> int:
        return len(self._workers) - len(self._idle)

    @property
    def free_slots(self) -> int:
        """Calls that would find a worker or a queue place right now."""
        return len(self._idle) + self.settings.queue_limit - self.queue_depth

    def in_flight(self, owner: str) -> int:
        """The calls of ``owner`` admitted and not yet answered."""
        return self._in_flight[owner]

    @property
    def ready(self) -> bool:
        return not self._closed and len(self._workers) == self.settings.worker_count

    async def start(self) -> None:
        """Start the workers and wait until each has loaded its engine."""
        self._loop = asyncio.get_running_loop()
        self._closed = False
        for _ in range(self.settings.worker_count):
            await self._spawn()

    async def _spawn(self) -> None:
        loop = asyncio.get_running_loop()
        worker = await loop.run_in_executor(None, self._start_worker)
        if worker is None:
            names = " and ".join(repr(n) for n in self.settings.engine_names)
            raise RuntimeError(f"KZG worker failed to start (engine {names})")
        if self._closed:
            worker.kill()
            worker.conn.close()
            return
        self._workers.add(worker)
        loop.add_reader(worker.conn.fileno(), self._on_readable, worker)
        self._release(worker)

    def _start_worker(self) -> _Worker | None:
        """A worker that has loaded its engines, or None (blocking)."""
        try:
            worker = _Worker.start(self.settings)
        except OSError:
            log.exception("cannot start a KZG worker")
            return None
        try:
            hello = worker.conn.recv_bytes()
        except (EOFError, OSError):
            hello = b""
        if hello != _READY:
            worker.kill()
            worker.conn.close()
            return None
        return worker

    async def call(
        self, function: str | Callable[..., Any], *args: Any, share: EngineShare | None = None
    ) -> Any:
        """Run ``function`` in a worker and return its result (or raise its exception)."""
        [done] = await self.call_many([(function, args)], share)
        if done.error is not None:
            raise done.error
        return done.value

    async def call_many(
        self,
        calls: Sequence[tuple[str | Callable[..., Any], Sequence[Any]]],
        share: EngineShare | None = None,
    ) -> list[CallResult]:
        """Run every call in parallel and return their results in order. The calls are
        admitted together or not at all: PoolSaturated unless each finds a worker or a
        queue place now, ShareExceeded when they would take ``share``'s owner past its
        cap, so that a group is never half run."""
        if self._closed:
            raise PoolClosed("the KZG pool is not running")
        owner = share.owner if share is not None else None
        if share is not None:
            in_flight = self._in_flight[share.owner]
            if in_flight + len(calls) > share.max_in_flight:
                raise ShareExceeded(share, in_flight, len(calls))
        if len(calls) > self.free_slots:
            raise PoolSaturated("every KZG worker is busy and the queue is full")
        # Claimed before the first await: no other request can take these places.
        slots = [self._claim(owner) for _ in calls]
        if owner is not None:
            self._in_flight[owner] += len(calls)
        started: set[int] = set()
        admitted = time.perf_counter()

        async def run(
            index: int, function: str | Callable[..., Any], args: Sequence[Any]
        ) -> CallResult:
            started.add(index)
            try:
                value = await self._run(slots[index], function, args)
            except Exception as exc:
                return CallResult(None, exc, time.perf_counter() - admitted)
            return CallResult(value, None, time.perf_counter() - admitted)

        try:
            return await asyncio.gather(
                *(run(i, function, args) for i, (function, args) in enumerate(calls))
            )
        finally:
            # A task cancelled before its first step never awaited its slot.
            for index, slot in enumerate(slots):
                if index not in started:
                    self._abandon(slot)
            if owner is not None:
                self._in_flight[owner] -= len(calls)
                if self._in_flight[owner] <= 0:
                    del self._in_flight[owner]

    def _claim(self, owner: str | None) -> asyncio.Future[_Worker]:
        """A worker, now if one is idle, else when one frees (a place in the owner's
        queue, which takes its turn among the owners' queues)."""
        assert self._loop is not None
        slot: asyncio.Future[_Worker] = self._loop.create_future()
        if self._idle:
            slot.set_result(self._idle.popleft())
            return slot
        queue = self._queues.get(owner)
        if queue is None:
            queue = self._queues[owner] = collections.deque()
            self._turns.append(owner)
        queue.append(slot)
        return slot

    def _abandon(self, slot: asyncio.Future[_Worker]) -> None:
        """Give back a slot whose call will not run."""
        if slot.done() and not slot.cancelled() and slot.exception() is None:
            self._release(slot.result())
        else:
            slot.cancel()
            for queue in self._queues.values():
                with contextlib.suppress(ValueError):
                    queue.remove(slot)

    async def _run(
        self,
        slot: asyncio.Future[_Worker],
        function: str | Callable[..., Any],
        args: Sequence[Any],
    ) -> Any:
        try:
            worker = await slot
        except asyncio.CancelledError:
            self._abandon(slot)
            raise
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        worker.future = future
        try:
            worker.conn.send_bytes(
                pickle.dumps((function, tuple(args)), protocol=pickle.HIGHEST_PROTOCOL)
            )
        except OSError:
            self._lost(worker)
        ok, value = await future
        if ok:
            return value
        raise value

    def _release(self, worker: _Worker) -> None:
        """Hand ``worker`` to the next owner in turn with a call waiting (that owner then
        goes to the back of the turns), else make it idle."""
        while self._turns:
            owner = self._turns.popleft()
            queue = self._queues[owner]
            waiter = None
            while queue and waiter is None:
                candidate = queue.popleft()
                waiter = candidate if not candidate.done() else None
            if queue:
                self._turns.append(owner)
            else:
                del self._queues[owner]
            if waiter is not None:
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
        if worker.future is not None and not worker.future.done():
            worker.future.set_result((False, WorkerCrashed("the KZG worker died during the call")))
        worker.future = None
        if not self._closed:
            log.warning(
                "KZG worker %s died (exit %s); starting a new one", worker.pid, worker.exitcode
            )
            self._loop.create_task(self._spawn())

    async def stop(self) -> None:
        """Stop taking calls, fail the waiting ones and end the workers."""
        self._closed = True
        waiting = [waiter for queue in self._queues.values() for waiter in queue]
        self._queues.clear()
        self._turns.clear()
        for waiter in waiting:
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
        """Wait up to 2 s for the told workers to exit, then kill what is left."""
        deadline = time.monotonic() + 2
        while any(w.alive() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.01)
        for worker in workers:
            if worker.alive():
                worker.kill()
            elif worker.process is not None:
                worker.process.wait()
