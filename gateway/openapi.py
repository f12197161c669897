"""OpenAPI 3.1 of the whole API, built from the routes the app actually registered.

Each route module declares the documentation of its routes next to their registration
with ``document_route``, into a table keyed by route name that the app itself holds (two
apps in one process keep their own); ``openapi_document`` walks the router, so a
registered route can never be missing from the document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.appkeys import PUBLIC_ROUTES

VERSION = "0.1.0"
HEX = {"type": "string", "pattern": "^0x([0-9a-fA-F]{2})*$", "description": "0x-prefixed hex"}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "request_id": {"type": "string"},
            },
        }
    },
}
RECEIPT_SCHEMA = {
    "type": "object",
    "required": ["entry", "proof"],
    "properties": {
        "entry": {
            "type": "string",
            "description": "the logged audit entry: canonical JSON of the record (its fields "
            "plus seq); its result_digest is SHA-256 of the canonical JSON of this body "
            "without receipt",
        },
        "proof": {
            "type": "string",
            "description": "C2SP tlog-proof@v1: the entry's RFC 9162 inclusion proof and the "
            "signed checkpoint (C2SP signed note) of its tree",
        },
    },
}
DEFAULT_ERRORS = (400, 401, 403, 429, 503)
_STATUS_TEXT = {
    400: "invalid input",
    401: "missing or invalid credentials",
    403: "not permitted",
    404: "not found",
    405: "method not allowed",
    408: "the body arrived too slowly",
    409: "conflicts with the current state (e.g. would leave no admin)",
    413: "body too large",
    415: "unsupported content type",
    429: "rate limited",
    503: "a dependency is down or the service is overloaded",
}


@dataclass(frozen=True)
class RouteDoc:
    summary: str
    tags: tuple[str, ...] = ()
    request_schema: dict[str, Any] | None = None
    octet_stream: bool = False
    response_schema: dict[str, Any] | None = None
    response_type: str = "application/json"
    parameters: tuple[dict[str, Any], ...] = ()
    errors: tuple[int, ...] = DEFAULT_ERRORS
    extra: dict[str, Any] = field(default_factory=dict)


ROUTE_DOCS: web.AppKey[dict[str, RouteDoc]] = web.AppKey("route_docs", dict)


def document_route(app: web.Application, name: str, doc: RouteDoc) -> None:
    """Declare (or replace) the documentation of ``app``'s route named ``name``."""
    app.setdefault(ROUTE_DOCS, {})[name] = doc


def _operation(name: str, doc: RouteDoc | None, public: bool) -> dict[str, Any]:
    doc = doc or RouteDoc(summary=name.replace("_", " "))
    operation: dict[str, Any] = {
        "operationId": name,
        "summary": doc.summary,
        "tags": list(doc.tags),
    }
    if doc.parameters:
        operation["parameters"] = list(doc.parameters)
    if doc.request_schema is not None:
        content = {"application/json": {"schema": doc.request_schema}}
        if doc.octet_stream:
            content["application/octet-stream"] = {
                "schema": {"type": "string", "contentMediaType": "application/octet-stream"}
            }
        operation["requestBody"] = {"required": True, "content": content}
    success: dict[str, Any] = {"description": "success"}
    if doc.response_schema is not None:
        success["content"] = {doc.response_type: {"schema": doc.response_schema}}
    responses: dict[str, Any] = {"200": success}
    # IP rules (403) and rate limits (429) apply to every route, public ones included.
    errors = set(doc.errors) | {403, 404, 405, 429}
    if doc.request_schema is not None:
        errors |= {408, 413, 415}
    for status in sorted(errors):
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    operation["responses"] = responses
    operation["security"] = [] if public else [{"apiKey": []}, {"bearer": []}]
    operation.update(doc.extra)
    return operation


def openapi_document(app: web.Application) -> dict[str, Any]:
    """Return the OpenAPI 3.1 document of every named route of ``app``; those of the
    app's public routes (rbac.toml's ``[public]``) need no credential."""
    public = app.get(PUBLIC_ROUTES, frozenset())
    docs = app.get(ROUTE_DOCS, {})
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        method = route.method.lower()
        if route.resource is None or route.resource.name is None or method == "head":
            continue
        name = route.resource.name
        path = route.resource.canonical
        paths.setdefault(path, {})[method] = _operation(name, docs.get(name), name in public)
    return {
        "openapi": "3.1.0",
        "info": {"title": "kzg-gateway", "version": VERSION},
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            },
            "schemas": {"Error": ERROR_SCHEMA, "Receipt": RECEIPT_SCHEMA},
            "responses": {
                f"E{status}": {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }
                for status, text in _STATUS_TEXT.items()
            },
        },
    }
