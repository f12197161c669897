"""Per-request facts gathered along the middleware chain and handed to the audit log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from auth.principal import Principal


@dataclass
class RequestContext:
    """Filled in by each middleware; the audit middleware records it exactly once."""

    request_id: str
    method: str
    path: str
    client_addr: str | None
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    tls_version: str | None = None
    route_name: str | None = None
    principal: Principal | None = None
    credential_ref: str | None = None
    action: str | None = None
    input_digests: dict[str, str] = field(default_factory=dict)
    result_digest: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    audit_seq: int | None = None


# Typed per-request storage: ``request[REQUEST_CONTEXT]`` is the request's context.
REQUEST_CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("request_context", RequestContext)
