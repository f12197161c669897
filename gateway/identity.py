"""What the identity routes, middlewares and jobs share: the service's app key, the
policies a configuration selects, and the mapping of identity errors to envelopes."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from auth.crypto import MasterKeyError
from auth.policy import PolicyError, RbacPolicy, SecurityPolicy, load_policies
from auth.service import AuthError, AuthService
from gateway.config import Config
from gateway.errors import ApiError
from gateway.limits import JsonTooDeep, parse_json, read_body

AUTH_SERVICE: web.AppKey[AuthService] = web.AppKey("auth_service", AuthService)
# Seconds a client waits before retrying a request this instance cannot serve with its
# master key: time for the orchestrator to restart it (or another instance answers).
MASTER_KEY_RETRY_AFTER = "30"

log = logging.getLogger(__name__)


def policies_for(config: Config) -> tuple[RbacPolicy, SecurityPolicy]:
    """The policies a gateway with ``config`` enforces: ``policy_dir`` (or the shipped
    ``policies/``), with the tables of ``[auth]`` overriding security values."""
    auth = config.section("auth")
    override = {k: v for k, v in auth.items() if isinstance(v, dict)}
    return load_policies(config.data.get("policy_dir"), override)


def to_api_error(exc: Exception) -> ApiError:
    """Map identity errors to the error envelope."""
    if isinstance(exc, AuthError):
        headers = {"WWW-Authenticate": 'Bearer realm="kzg-gateway"'} if exc.status == 401 else {}
        return ApiError(exc.status, exc.code, exc.message, headers)
    if isinstance(exc, PolicyError):
        return ApiError(400, "invalid_request", str(exc))
    if isinstance(exc, LookupError):
        # args[0], not str(): a KeyError's str() adds quotes around the message.
        return ApiError(404, "not_found", str(exc.args[0]) if exc.args else "not found")
    if isinstance(exc, MasterKeyError):
        # The master key was rotated under this process (its secrets no longer open, it
        # may seal nothing): only a restart with the current key cures it.
        log.warning("master key does not match the database: %s", exc)
        return ApiError(
            503,
            "master_key_mismatch",
            "this instance holds an outdated master key and must be restarted with the "
            "current one; nothing was done",
            {"Retry-After": MASTER_KEY_RETRY_AFTER},
        )
    if isinstance(exc, SQLAlchemyError | OSError):
        return ApiError(
            503, "identity_unavailable", "the identity store is unavailable", {"Retry-After": "1"}
        )
    raise exc


async def json_body(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's JSON object; 415, 413 and 400 envelopes for anything else."""
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
    raw = await read_body(request, limit)
    try:
        body = parse_json(raw)
    except JsonTooDeep as exc:
        raise ApiError(400, "invalid_json", f"body: {exc}") from exc
    except ValueError as exc:
        raise ApiError(400, "invalid_json", "body: not valid JSON") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "body: expected a JSON object")
    return body
