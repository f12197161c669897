"""Admin routes: users, API keys, signing keys, access review. Each change commits in the
same transaction as the request's audit record (``gateway.identity.audited``), whose
detail names its targets and roles, never a secret."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from auth.policy import PolicyError
from auth.service import AuthService
from gateway.appkeys import DB_ENGINE, LOG_SIGNER, MASTER_KEY
from gateway.context import REQUEST_CONTEXT
from gateway.errors import ApiError
from gateway.identity import AUTH_SERVICE, audited, json_body, to_api_error
from gateway.openapi import DEFAULT_ERRORS, RouteDoc, document_route
from gateway.receipts import rotate_log_key

BODY_LIMIT = 8192
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _service(request: web.Request) -> AuthService:
    return request.app[AUTH_SERVICE]


def _guarded(fn: Callable[[web.Request], Awaitable[Any]]) -> Handler:
    """Run ``fn`` and turn identity errors into envelopes; a dict result is the JSON body."""

    @functools.wraps(fn)
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            result = await fn(request)
        except (web.HTTPException, ApiError):
            raise
        except Exception as exc:
            raise to_api_error(exc) from exc
        return web.json_response(result)

    return handler


def _actor(request: web.Request) -> str:
    principal = request[REQUEST_CONTEXT].principal
    return principal.id if principal else "unknown"


def _roles(body: dict[str, Any]) -> list[str]:
    roles = body.get("roles")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise PolicyError("roles: expected a list of role names")
    return roles


async def create_user(request: web.Request) -> dict[str, Any]:
    body = await json_body(request, BODY_LIMIT)
    roles = _roles(body)
    created = await _service(request).invite_user(body.get("username"), roles, audited(request))
    return {k: created[k] for k in ("username", "roles", "enrollment_token", "expires_at")}


async def set_user_roles(request: web.Request) -> dict[str, Any]:
    body = await json_body(request, BODY_LIMIT)
    roles = _roles(body)
    username = request.match_info["username"]
    await _service(request).set_roles(username, roles, audited(request))
    return {"username": username, "roles": roles}


async def reset_user(request: web.Request) -> dict[str, Any]:
    username = request.match_info["username"]
    return await _service(request).reset_user(username, audited(request))


async def _set_disabled(request: web.Request, disabled: bool) -> dict[str, Any]:
    username = request.match_info["username"]
    service = _service(request)
    await (service.disable_user if disabled else service.enable_user)(username, audited(request))
    return {"username": username, "disabled": disabled}


async def disable_user(request: web.Request) -> dict[str, Any]:
    return await _set_disabled(request, True)


async def enable_user(request: web.Request) -> dict[str, Any]:
    return await _set_disabled(request, False)


async def create_api_key(request: web.Request) -> dict[str, Any]:
    body = await json_body(request, BODY_LIMIT)
    return await _service(request).create_api_key(
        body.get("name"),
        body.get("role"),
        _actor(request),
        body.get("expires_in_days"),
        body.get("allowed_cidrs"),
        audited(request),
    )


async def list_api_keys(request: web.Request) -> dict[str, Any]:
    return {"api_keys": await _service(request).list_api_keys()}


async def revoke_api_key(request: web.Request) -> dict[str, Any]:
    key_id = request.match_info["key_id"]
    await _service(request).revoke_api_key(key_id, audited(request))
    return {"id": key_id, "revoked": True}


async def rotate_api_key(request: web.Request) -> dict[str, Any]:
    key_id = request.match_info["key_id"]
    return await _service(request).rotate_api_key(key_id, _actor(request), audited(request))


async def rotate_signing_key(request: web.Request) -> dict[str, Any]:
    signer = request.app[LOG_SIGNER]
    info = await rotate_log_key(
        request.app[DB_ENGINE],
        request.app[MASTER_KEY],
        signer.origin,
        commit=audited(request),
    )
    await signer.refresh()
    return info.to_dict()


async def rotate_jwt_key(request: web.Request) -> dict[str, Any]:
    return {"kid": await _service(request).rotate_jwt_key(audited(request))}


async def revoke_jwt_key(request: web.Request) -> dict[str, Any]:
    return await _service(request).revoke_jwt_key(request.match_info["kid"], audited(request))


async def access_review(request: web.Request) -> dict[str, Any]:
    return await _service(request).access_review()


_USER = {"name": "username", "in": "path", "required": True, "schema": {"type": "string"}}
_KEY = {"name": "key_id", "in": "path", "required": True, "schema": {"type": "string"}}
_ROUTES: tuple[tuple[str, str, str, Callable[[web.Request], Awaitable[Any]], RouteDoc], ...] = (
    (
        "POST",
        "/v1/admin/users",
        "admin_create_user",
        create_user,
        RouteDoc(
            "Create a person who enrols themselves: a single-use enrolment token, once",
            ("admin",),
            request_schema={"type": "object", "required": ["username", "roles"]},
        ),
    ),
    (
        "POST",
        "/v1/admin/users/{username}/roles",
        "admin_set_user_roles",
        set_user_roles,
        RouteDoc(
            "Replace a person's roles",
            ("admin",),
            parameters=(_USER,),
            request_schema={"type": "object", "required": ["roles"]},
            errors=(*DEFAULT_ERRORS, 409),
        ),
    ),
    (
        "POST",
        "/v1/admin/users/{username}/reset",
        "admin_reset_user",
        reset_user,
        RouteDoc(
            "Revoke a person's password and TOTP at once; a new enrolment token, once",
            ("admin",),
            parameters=(_USER,),
        ),
    ),
    (
        "POST",
        "/v1/admin/users/{username}/disable",
        "admin_disable_user",
        disable_user,
        RouteDoc(
            "Disable a person", ("admin",), parameters=(_USER,), errors=(*DEFAULT_ERRORS, 409)
        ),
    ),
    (
        "POST",
        "/v1/admin/users/{username}/enable",
        "admin_enable_user",
        enable_user,
        RouteDoc("Enable a disabled person again", ("admin",), parameters=(_USER,)),
    ),
    (
        "POST",
        "/v1/admin/api-keys",
        "admin_create_api_key",
        create_api_key,
        RouteDoc(
            "Create an API key; the key is shown once",
            ("admin",),
            request_schema={"type": "object", "required": ["name", "role"]},
        ),
    ),
    (
        "GET",
        "/v1/admin/api-keys",
        "admin_list_api_keys",
        list_api_keys,
        RouteDoc("List API keys (never their secrets)", ("admin",)),
    ),
    (
        "POST",
        "/v1/admin/api-keys/{key_id}/revoke",
        "admin_revoke_api_key",
        revoke_api_key,
        RouteDoc("Revoke an API key", ("admin",), parameters=(_KEY,)),
    ),
    (
        "POST",
        "/v1/admin/api-keys/{key_id}/rotate",
        "admin_rotate_api_key",
        rotate_api_key,
        RouteDoc(
            "Revoke an API key and issue its replacement (shown once)",
            ("admin",),
            parameters=(_KEY,),
        ),
    ),
    (
        "POST",
        "/v1/admin/signing-keys/rotate",
        "admin_rotate_signing_key",
        rotate_signing_key,
        RouteDoc(
            "New log key (signs every checkpoint); the old one is retired, still listed", ("admin",)
        ),
    ),
    (
        "POST",
        "/v1/admin/jwt-keys/rotate",
        "admin_rotate_jwt_key",
        rotate_jwt_key,
        RouteDoc(
            "New JWT signing key; the old one stays in the JWKS until its tokens expire", ("admin",)
        ),
    ),
    (
        "POST",
        "/v1/admin/jwt-keys/{kid}/revoke",
        "admin_revoke_jwt_key",
        revoke_jwt_key,
        RouteDoc(
            "Revoke a JWT key: every token it signed is refused at once, it leaves the JWKS",
            ("admin",),
            parameters=(
                {"name": "kid", "in": "path", "required": True, "schema": {"type": "string"}},
            ),
        ),
    ),
    (
        "GET",
        "/v1/admin/access-review",
        "access_review",
        access_review,
        RouteDoc("Every principal, its roles, last use, age and what needs attention", ("admin",)),
    ),
)


def add_routes(app: web.Application) -> None:
    for method, path, name, fn, doc in _ROUTES:
        app.router.add_route(method, path, _guarded(fn), name=name)
        document_route(app, name, doc)
