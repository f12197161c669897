"""``POST /v1/auth/login`` and ``GET /.well-known/jwks.json``."""

from __future__ import annotations

from aiohttp import web

from auth.service import AuthError
from gateway.context import REQUEST_CONTEXT
from gateway.errors import ApiError
from gateway.identity import AUTH_SERVICE, json_body, to_api_error
from gateway.openapi import RouteDoc, document_route

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
    unknown = set(body) - {"username", "password", "totp"}
    if unknown:
        raise ApiError(400, "invalid_request", f"{sorted(unknown)[0]}: unknown field")
    service = request.app[AUTH_SERVICE]
    username = body.get("username")
    if isinstance(username, str):
        # A reference, not the name: a mistyped password in the username field stays secret.
        ctx.detail["username_ref"] = service.credential_ref("username", username)
    try:
        result = await service.login(username, body.get("password"), body.get("totp"))
    except AuthError as exc:
        ctx.detail["reason"] = exc.reason
        raise to_api_error(exc) from exc
    except Exception as exc:
        raise to_api_error(exc) from exc
    ctx.principal = result.principal
    ctx.credential_ref = service.credential_ref("user", result.principal.id)
    return web.json_response(
        {
            "access_token": result.access_token,
            "token_type": "Bearer",
            "expires_in": result.expires_in,
        }
    )


async def jwks(request: web.Request) -> web.Response:
    try:
        keys = await request.app[AUTH_SERVICE].jwks()
    except Exception as exc:
        raise to_api_error(exc) from exc
    return web.json_response(keys, headers={"Cache-Control": "max-age=300"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/auth/login", login, name="auth_login")
    app.router.add_get("/.well-known/jwks.json", jwks, name="jwks")
    document_route(
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
            public=True,
        ),
    )
    document_route(
        "jwks",
        RouteDoc(
            summary="Public keys of the JWT signers (current and still-valid retired)",
            tags=("identity",),
            response_schema={"type": "object", "required": ["keys"]},
            errors=(503,),
            public=True,
        ),
    )
