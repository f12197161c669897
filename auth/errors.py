"""What the identity service refuses with: an HTTP status, a stable code, a message for
the caller and, for the audit record only, the reason."""

from __future__ import annotations


class AuthError(Exception):
    """A refused credential or request: HTTP status, stable code, message for the caller
    and, for the audit record only, the reason; ``retry_after`` (seconds) when waiting
    helps."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        reason: str = "",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.reason = reason or code
        self.retry_after = retry_after


class NotFound(Exception):
    """The user, API key or JWT key named does not exist (or no longer counts: revoked).
    Its own class so that only this means 404: a stray KeyError stays a bug (500)."""


def invalid_login(reason: str) -> AuthError:
    # One answer for unknown user, wrong password, wrong or replayed code, disabled
    # or not yet enrolled account: the reason goes to the audit log only.
    return AuthError(
        401,
        "invalid_credentials",
        "username, password or one-time code is wrong (every role but client needs the code)",
        reason,
    )


def invalid_key(reason: str) -> AuthError:
    return AuthError(401, "invalid_credentials", "the credential is not valid", reason)
