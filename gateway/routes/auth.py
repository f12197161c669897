"""``POST /v1/auth/login``, ``/v1/auth/enroll``, ``/v1/auth/password`` and
``GET /.well-known/jwks.json``."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from auth.service import AuthError
from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.errors import ApiError
from gateway.identity import AUTH_SERVICE, audited, json_body, to_api_error
from gateway.openapi import RouteDoc, document_route

T = TypeVar("T")
LOGIN_BODY_LIMIT = 4096
LOGIN_SCHEMA = {
    "type": "object",
    "required": ["username", "password"],
    "properties": {
        "username": {"type": "string"},
        "password": {"type": "string"},
        "totp": {"type": "string", "pattern": "^[0-9]{6}$"},
    },
    "additionalProperties": False,
}


async def login(request: web.Request) -> web.Response:
    ctx = request[REQUEST_CONTEXT]
    body = await json_body(request, LOGIN_BODY_LIMIT)
    _only(body, {"username", "password", "totp"})
    service = request.app[AUTH_SERVICE]
    username = body.get("username")
    if isinstance(username, str):
        # A reference, not the name: a mistyped password in the username field stays secret.
        ctx.detail["username_ref"] = service.credential_ref("username", username)
    result = await _identity_call(
        ctx, service.login(username, body.get("password"), body.get("totp"), ctx.client_addr)
    )
    ctx.principal = result.principal
    ctx.credential_ref = service.credential_ref("user", result.principal.id)
    return web.json_response(
        {
            "access_token": result.access_token,
            "token_type": "Bearer",
            "expires_in": result.expires_in,
        }
    )


async def _identity_call(ctx: RequestContext, call: Awaitable[T]) -> T:
    """Await an identity operation; a refusal's reason goes to the audit record only."""
    try:
        return await call
    except AuthError as exc:
        ctx.detail["reason"] = exc.reason
        raise to_api_error(exc) from exc
    except Exception as exc:
        raise to_api_error(exc) from exc


def _only(body: dict[str, object], fields: set[str]) -> None:
    unknown = set(body) - fields
    if unknown:
        raise ApiError(400, "invalid_request", f"{sorted(unknown)[0]}: unknown field")


async def enroll(request: web.Request) -> web.Response:
    """A person redeems their enrolment token: they choose the password and alone receive
    the TOTP secret. Public: the single-use token is the credential."""
    ctx = request[REQUEST_CONTEXT]
    body = await json_body(request, LOGIN_BODY_LIMIT)
    _only(body, {"username", "enrollment_token", "password"})
    service = request.app[AUTH_SERVICE]
    result = await _identity_call(
        ctx,
        service.enroll(
            body.get("username"),
            body.get("enrollment_token"),
            body.get("password"),
            audited(request),
        ),
    )
    return web.json_response(result)


async def change_password(request: web.Request) -> web.Response:
    """The person's own password change, with their bearer token and current password."""
    ctx = request[REQUEST_CONTEXT]
    principal = ctx.principal
    if principal is None or principal.kind != "user":
        # Every role holds password:own; an API key simply has no password to change.
        raise ApiError(
            400, "invalid_request", "a password belongs to a person: log in as that person"
        )
    body = await json_body(request, LOGIN_BODY_LIMIT)
    _only(body, {"current_password", "new_password"})
    await _identity_call(
        ctx,
        request.app[AUTH_SERVICE].change_password(
            principal.id,
            body.get("current_password"),
            body.get("new_password"),
            audited(request),
        ),
    )
    return web.json_response({"changed": True})


async def jwks(request: web.Request) -> web.Response:
    try:
        keys = await request.app[AUTH_SERVICE].jwks()
    except Exception as exc:
        raise to_api_error(exc) from exc
    return web.json_response(keys, headers={"Cache-Control": "max-age=300"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/auth/login", login, name="auth_login")
    app.router.add_post("/v1/auth/enroll", enroll, name="auth_enroll")
    app.router.add_post("/v1/auth/password", change_password, name="auth_password")
    app.router.add_get("/.well-known/jwks.json", jwks, name="jwks")
    document_route(
        app,
        "auth_enroll",
        RouteDoc(
            summary="Enrol with a single-use token: choose the password, receive the TOTP URI",
            tags=("identity",),
            request_schema={
                "type": "object",
                "required": ["username", "enrollment_token", "password"],
                "properties": {
                    "username": {"type": "string"},
                    "enrollment_token": {"type": "string"},
                    "password": {"type": "string", "minLength": 12},
                },
                "additionalProperties": False,
            },
            response_schema={
                "type": "object",
                "required": ["totp_uri"],
                "properties": {"totp_uri": {"type": "string"}},
            },
            errors=(400, 401, 429, 503),
        ),
    )
    document_route(
        app,
        "auth_password",
        RouteDoc(
            summary="Change one's own password (bearer token of the person)",
            tags=("identity",),
            request_schema={
                "type": "object",
                "required": ["current_password", "new_password"],
                "properties": {
                    "current_password": {"type": "string"},
                    "new_password": {"type": "string", "minLength": 12},
                },
                "additionalProperties": False,
            },
            response_schema={"type": "object", "required": ["changed"]},
            errors=(400, 401, 403, 429, 503),
        ),
    )
    document_route(
        app,
        "auth_login",
        RouteDoc(
            summary="Log in with password and TOTP; returns a short-lived JWT",
            tags=("identity",),
            request_schema=LOGIN_SCHEMA,
            response_schema={
                "type": "object",
                "required": ["access_token", "token_type", "expires_in"],
                "properties": {
                    "access_token": {"type": "string"},
                    "token_type": {"const": "Bearer"},
                    "expires_in": {"type": "integer"},
                },
            },
            errors=(400, 401, 429, 503),
        ),
    )
    document_route(
        app,
        "jwks",
        RouteDoc(
            summary="Public keys of the JWT signers (current and still-valid retired)",
            tags=("identity",),
            response_schema={"type": "object", "required": ["keys"]},
            errors=(503,),
        ),
    )
