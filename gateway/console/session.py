"""The console's session: the login JWT in a cookie, read only on ``/console/`` paths, and
the CSRF token of its forms, bound to the token's ``jti``.

The JSON API never reads the cookie (it stays cookie-free and so CSRF-free); the cookie's
``Path=/console`` keeps browsers from sending it there anyway.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import jwt
from aiohttp import web

PREFIX = "/console"
COOKIE = "__Secure-kzg-console"
CSRF_FIELD = "csrf_token"
CSRF_PURPOSE = "console-csrf"


def is_console(request: web.Request) -> bool:
    return request.path == PREFIX or request.path.startswith(PREFIX + "/")


def session_token(request: web.Request) -> str | None:
    """The session JWT of a console request, None elsewhere or without a cookie."""
    if not is_console(request):
        return None
    return request.cookies.get(COOKIE) or None


def set_session(response: web.StreamResponse, token: str) -> None:
    # No Max-Age: the browser keeps the cookie past the token's expiry, so the server can
    # tell an expired session (login page with a message) from none at all.
    response.set_cookie(COOKIE, token, path=PREFIX, secure=True, httponly=True, samesite="Strict")


def clear_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path=PREFIX, secure=True, httponly=True, samesite="Strict")


def _jti(token: str) -> str | None:
    # The authentication middleware verified this token before any handler runs; only
    # its jti is read here.
    try:
        claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None  # a stale or foreign cookie on a public page: no session, no token
    jti = claims.get("jti")
    return jti if isinstance(jti, str) and jti else None


def csrf_token(key: bytes, token: str | None) -> str | None:
    """HMAC-SHA256 of the session's jti under a key derived from the master key: one
    token per session, nothing stored, useless without the session cookie."""
    if token is None:
        return None
    jti = _jti(token)
    if jti is None:
        return None
    return hmac.new(key, jti.encode(), hashlib.sha256).hexdigest()


def csrf_matches(key: bytes, token: str | None, sent: object) -> bool:
    expected = csrf_token(key, token)
    return (
        expected is not None
        and isinstance(sent, str)
        and hmac.compare_digest(expected.encode(), sent.encode())
    )
