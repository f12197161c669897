"""The error envelope every refusal uses: {"error": {"code", "message", "request_id"}}."""

from __future__ import annotations

from collections.abc import Mapping


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
