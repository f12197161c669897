"""The listener: connections pass a ConnectionGuard (limits from ``[server]``, see
``gateway.limits``), TLS handshakes are bounded in time, and a request the HTTP parser
refuses (malformed line, headers too long or too many) is answered with the gateway's
error envelope and audited like any other refusal."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

# One grouping of client addresses for connection and rate limits.
from auth.ratelimit import client_group
from gateway.appkeys import METRICS, STATE
from gateway.context import RequestContext
from gateway.errors import AUDIT_DOWN, envelope
from gateway.limits import SERVER_LIMITS, ServerLimits
from gateway.routes.audit import record

log = logging.getLogger(__name__)
# Names the product only: no Python or aiohttp version for a scanner to match.
SERVER_HEADER = "kzg-gateway"


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_HEADER


class _Admission(asyncio.Protocol):
    """Stands in front of aiohttp's protocol for one connection: counts it once the TLS
    handshake is done and closes it at once when a limit is reached."""

    __slots__ = ("_address", "_guard", "_inner")

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = None
        self._address: str = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._address = client_group(peer[0]) if peer else ""
        reason = self._guard.admit(self._address)
        if reason is not None:
            transport.abort()  # no TLS close handshake a refused client could stall
            return
        try:
            self._inner = self._guard.factory()
        except BaseException:
            self._guard.release(self._address)
            raise
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._guard.release(self._address)
            self._inner.connection_lost(exc)
            self._inner = None


class ConnectionGuard:
    """Counts open connections and refuses those beyond the limits."""

    def __init__(
        self,
        factory: Callable[[], asyncio.Protocol],
        limits: ServerLimits,
        opened: Gauge,
        refused: PromCounter,
    ) -> None:
        self.factory = factory
        self._limits = limits
        self._open = 0
        self._per_address: Counter[str] = Counter()
        self._opened = opened
        self._refused = refused

    def __call__(self) -> asyncio.Protocol:
        return _Admission(self)

    def admit(self, address: str) -> str | None:
        """Count the connection and return None, or return why it is refused."""
        if self._open >= self._limits.max_connections:
            reason = "max_connections"
        elif self._per_address[address] >= self._limits.max_connections_per_address:
            reason = "max_connections_per_address"
        else:
            self._open += 1
            self._per_address[address] += 1
            self._opened.set(self._open)
            return None
        self._refused.labels(reason).inc()
        return reason

    def release(self, address: str) -> None:
        self._open -= 1
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]
        self._opened.set(self._open)


class _AuditedRefusal(web.Response):
    """The answer to a request the parser refused; its audit record is committed before
    anything is sent (503 instead when the audit store is down)."""

    def __init__(self, app: web.Application, ctx: RequestContext, status: int, message: str):
        super().__init__(status=status, content_type="application/json")
        self.headers["Server"] = SERVER_HEADER
        self._app = app
        self._ctx = ctx
        self._envelope("malformed_request", message)
        self.force_close()

    def _envelope(self, code: str, message: str) -> None:
        self.text = json.dumps(envelope(self._ctx.request_id, code, message))
        self.headers["X-Request-ID"] = self._ctx.request_id

    async def prepare(self, request: web.BaseRequest) -> Any:
        # With the audit breaker open the store is known down: refuse without waiting.
        if (
            not self._app[STATE].breaker.allow()
            or await record(self._app, self._ctx, self.status) is None
        ):
            status, code, message = AUDIT_DOWN
            self.set_status(status)
            self._envelope(code, message)
        self._app[METRICS].requests.labels("unmatched", str(self.status)).inc()
        return await super().prepare(request)


class _GatewayRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, with its plain-text answer to requests the parser
    refuses replaced by the audited envelope."""

    __slots__ = ("_app",)

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._app = app

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or status != 400:
            # Not the parser's: aiohttp's own answer, and its log with the traceback.
            response = super().handle_error(request, status, exc, message)
            response.headers["Server"] = SERVER_HEADER
            return response
        if request.writer.output_size > 0:  # the answer has started: only closing is left
            raise ConnectionError("response already started")
        ctx = RequestContext(
            request_id=uuid.uuid4().hex,
            method=request.method,
            path=request.path,
            client_addr=request.remote,
        )
        # The kind of error only: the parser's message may quote what the client sent.
        ctx.detail["reason"] = f"malformed HTTP request ({type(exc).__name__})"
        log.info("malformed request from %s: %s", request.remote, type(exc).__name__)
        # Never aiohttp's message: it quotes the offending bytes, which may be a credential.
        return _AuditedRefusal(self._app, ctx, status, "malformed HTTP request")


class GuardedSite(web.TCPSite):
    """A TCP site whose connections pass a ConnectionGuard and whose TLS handshakes are
    bounded in time."""

    __slots__ = ("_guard", "_limits")

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        ssl_context: Any,
        handler_options: dict[str, Any],
    ) -> None:
        limits = runner.app[SERVER_LIMITS]
        super().__init__(runner, host, port, ssl_context=ssl_context, backlog=limits.backlog)
        self._limits = limits
        metrics = runner.app[METRICS]
        server = runner.server
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return _GatewayRequestHandler(runner.app, manager=server, loop=loop, **handler_options)

        self._guard = ConnectionGuard(
            protocol, limits, metrics.connections, metrics.connections_refused
        )

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard,
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._limits.tls_handshake_timeout_seconds,
            ssl_shutdown_timeout=self._limits.tls_handshake_timeout_seconds,
            backlog=self._backlog,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]


async def start_server(
    app: web.Application, host: str, port: int, ssl_context: Any
) -> tuple[web.AppRunner, GuardedSite]:
    """Start serving ``app`` under its ServerLimits; stop with ``runner.cleanup()``."""
    limits = app[SERVER_LIMITS]
    handler_options: dict[str, Any] = {
        "access_log": None,
        "keepalive_timeout": limits.keepalive_timeout_seconds,
        "max_line_size": limits.max_header_bytes,
        "max_field_size": limits.max_header_bytes,
        "max_headers": limits.max_headers,
        # After refusing a body, read and drop its rest this long so the client sees the
        # answer rather than a reset; a client still sending after that is cut off.
        "lingering_time": 2.0,
    }
    # The handler options go to GuardedSite, whose protocol factory builds the handlers.
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=limits.shutdown_timeout_seconds
    )
    if _server_header not in app.on_response_prepare:
        app.on_response_prepare.append(_server_header)
    await runner.setup()
    site = GuardedSite(runner, host, port, ssl_context, handler_options)
    await site.start()
    return runner, site
