"""The error envelope every refusal uses: {"error": {"code", "message", "request_id"}}."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ApiError(Exception):
    """A refusal with an HTTP status, a stable machine code and a message naming the field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def envelope(request_id: str, code: str, message: str) -> dict[str, Any]:
    """The body of every refusal."""
    return {"error": {"code": code, "message": message, "request_id": request_id}}


# What a request is answered when its audit record cannot be committed.
AUDIT_DOWN = (503, "audit_unavailable", "the audit log is unavailable; nothing was done")
