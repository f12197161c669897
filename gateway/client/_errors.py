"""The SDK's exceptions: one class per family of error answer, as hvac does for Vault.

Every exception carries what a support ticket needs: the HTTP status (None when no answer
came), the gateway's stable error code, its message and the request id it answered with,
so that the refusal can be found in the audit log.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ConsistencyError",
    "Forbidden",
    "GatewayError",
    "InvalidInput",
    "InvalidResponse",
    "NotFound",
    "RateLimited",
    "ReceiptError",
    "RequestError",
    "ServerError",
    "Timeout",
    "TooLarge",
    "TransportError",
    "Unauthenticated",
    "Unavailable",
    "error_for_answer",
    "parse_retry_after",
]


class GatewayError(Exception):
    """Base of every SDK error: ``status``, ``code``, ``message``, ``request_id`` and, for
    answers that name one, ``retry_after`` (seconds)."""

    default_code = "error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or self.default_code
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}: {self.message}{where}"


class RequestError(GatewayError):
    """A 4xx answer without a class of its own (405, 408, 409, 415, ...)."""


class InvalidInput(RequestError):
    """400: the input was refused; the message names the field (``blobs[3]``)."""


class Unauthenticated(RequestError):
    """401: no credential, or one the gateway does not accept."""


class Forbidden(RequestError):
    """403: the principal may not do this (or its role needs MFA)."""


class NotFound(RequestError):
    """404."""


class TooLarge(RequestError):
    """413: the body is larger than the route accepts."""


class RateLimited(RequestError):
    """429: the principal's budget is spent; ``retry_after`` says for how long."""


class ServerError(GatewayError):
    """A 5xx answer."""


class Unavailable(ServerError):
    """503: a dependency is down or the workers are saturated; nothing was done."""


class TransportError(GatewayError):
    """No HTTP answer: connection refused or dropped, TLS failure."""

    default_code = "transport_error"


class Timeout(TransportError):
    """No answer within the client's ``timeout``."""

    default_code = "timeout"


class InvalidResponse(GatewayError):
    """A 2xx answer that is not what the API contract says it is."""

    default_code = "invalid_response"


class ReceiptError(GatewayError):
    """A receipt that does not verify against the pinned log keys, or whose entry does
    not bind this request (its id, inputs, result or operation)."""

    default_code = "invalid_receipt"


class ConsistencyError(ReceiptError):
    """A checkpoint that is not an extension of (or extended by) one seen before: the log
    showed this client two different histories."""

    default_code = "log_inconsistent"


_BY_STATUS: dict[int, type[GatewayError]] = {
    400: InvalidInput,
    401: Unauthenticated,
    403: Forbidden,
    404: NotFound,
    413: TooLarge,
    429: RateLimited,
    503: Unavailable,
}


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_class(status: int) -> type[GatewayError]:
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if 400 <= status < 500:
        return RequestError
    if status >= 500:
        return ServerError
    return InvalidResponse


def error_for_answer(
    status: int, body: bytes, headers: Mapping[str, str], request_id: str | None
) -> GatewayError:
    """The exception for a non-2xx answer, read from the gateway's error envelope
    ``{"error": {"code", "message", "request_id"}}`` (a body that is not one still maps by
    status: a proxy in between may have answered)."""
    code, message = f"http_{status}", f"HTTP {status}"
    try:
        envelope: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        envelope = None
    if isinstance(envelope, dict) and isinstance(envelope.get("error"), dict):
        error = envelope["error"]
        code = str(error.get("code") or code)
        message = str(error.get("message") or message)
        request_id = request_id or error.get("request_id")
    return _error_class(status)(
        message,
        status=status,
        code=code,
        request_id=request_id,
        retry_after=parse_retry_after(headers.get("Retry-After")),
    )
