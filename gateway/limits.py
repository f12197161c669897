"""What one client may take of the server: connections (in all and per address), time
to finish the TLS handshake and to send a request's headers and body, header sizes.
Every bound is a ``[server]`` key of the configuration."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, fields
from typing import Any

from aiohttp import web

from gateway.config import Config, ConfigError
from gateway.errors import ApiError
from gateway.settings import ServerSettings


@dataclass(frozen=True)
class ServerLimits:
    """``[server]`` keys of the same names (defaults: those of ServerSettings)."""

    max_connections: int = ServerSettings.max_connections
    max_connections_per_address: int = ServerSettings.max_connections_per_address
    backlog: int = ServerSettings.backlog
    tls_handshake_timeout_seconds: float = ServerSettings.tls_handshake_timeout_seconds
    # aiohttp closes a connection whose next request's headers have not all arrived
    # this long after it opened or went idle: the bound on slow (slowloris) headers.
    keepalive_timeout_seconds: float = ServerSettings.keepalive_timeout_seconds
    body_timeout_seconds: float = ServerSettings.body_timeout_seconds
    max_header_bytes: int = ServerSettings.max_header_bytes
    max_headers: int = ServerSettings.max_headers
    shutdown_timeout_seconds: float = ServerSettings.shutdown_timeout_seconds

    @classmethod
    def from_config(cls, config: Config) -> ServerLimits:
        server = config.server
        values: dict[str, Any] = {}
        for item in fields(cls):
            value = getattr(server, item.name)
            if value <= 0:
                raise ConfigError(f"[server] {item.name} must be positive, got {value}")
            values[item.name] = value
        return cls(**values)


# How deep a request's JSON may nest. Every route's document is at most four levels deep
# (a batch: object, list, operation, list); the bound keeps a body of brackets from
# exhausting the parser's stack (a RecursionError, once a 500).
MAX_JSON_DEPTH = 32


class JsonTooDeep(ValueError):
    """A JSON document nested deeper than the bound."""

    def __init__(self, max_depth: int) -> None:
        super().__init__(f"nests deeper than {max_depth} levels")


def _depth_exceeds(document: Any, limit: int) -> bool:
    """Whether ``document`` nests more than ``limit`` containers deep (iterative, so that
    the check itself cannot recurse too far)."""
    stack: list[tuple[Any, int]] = [(document, 1)] if isinstance(document, dict | list) else []
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``raw`` decoded as JSON: ValueError when it is not JSON, JsonTooDeep when it nests
    deeper than ``max_depth`` (callers turn either into their 400 naming the body)."""
    try:
        document = json.loads(raw)
    except RecursionError:
        raise JsonTooDeep(max_depth) from None
    # Fewer brackets than the bound cannot nest past it: most bodies skip the walk.
    brackets = raw.count(b"[") + raw.count(b"{")
    if brackets > max_depth and _depth_exceeds(document, max_depth):
        raise JsonTooDeep(max_depth)
    return document


SERVER_LIMITS: web.AppKey[ServerLimits] = web.AppKey("server_limits", ServerLimits)


async def read_body(request: web.Request, limit: int) -> bytes:
    """Read the body within ``body_timeout_seconds``, refusing with 413 as soon as it
    exceeds ``limit`` bytes and with 408 when it arrives too slowly."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, "too_large", f"the body exceeds {limit} bytes for this route")
    timeout = request.app[SERVER_LIMITS].body_timeout_seconds
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(256 * 1024):
                size += len(chunk)
                if size > limit:
                    raise ApiError(
                        413, "too_large", f"the body exceeds {limit} bytes for this route"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408, "body_timeout", f"the body did not arrive within {timeout:g} seconds"
        ) from None
    return b"".join(chunks)
