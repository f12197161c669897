"""The console's routes, its error pages and its security headers.

Handlers are thin, as the JSON API's: they call the same services (login, audit queries,
verification, access review) and render a page. Authentication, authorization, rate
limiting and the audit record come from the app's middleware chain, as for any route;
``console_pages`` (between the audit middleware and authentication) turns refusals of
pages into HTML and stamps every console answer with the CSP and related headers.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import io
import re
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import jinja2
from aiohttp import web
from sqlalchemy import select

from audit.log import inclusion_proof, latest_tree_head
from audit.models import audit_events, audit_tree_heads, entry_from_row
from audit.query import EventQuery, query_events
from auth.service import AuthError
from gateway.appkeys import DB_ENGINE, MASTER_KEY
from gateway.console.session import (
    CSRF_FIELD,
    CSRF_PURPOSE,
    PREFIX,
    clear_session,
    csrf_matches,
    csrf_token,
    is_console,
    session_token,
    set_session,
)
from gateway.context import REQUEST_CONTEXT
from gateway.errors import ApiError
from gateway.identity import AUTH_SERVICE, to_api_error
from gateway.limits import read_body
from gateway.openapi import RouteDoc, document_route
from gateway.receipts import list_log_keys
from gateway.routes import audit as audit_routes
from gateway.security import RBAC

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATIC_DIR = Path(str(files("gateway.console") / "static"))
PAGE_SIZE = 50
CHECKPOINTS_PAGE = 50
FORM_LIMIT = 4096
# No inline script or style anywhere: everything the pages run or wear is a file of
# this package, and nothing may be framed, posted elsewhere or loaded from elsewhere.
CSP = (
    "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; "
    "object-src 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: with no-referrer Chromium posts forms with "Origin: null".
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
# Pages a principal may see, in menu order: route name, path, label.
NAV = (
    ("console_events", "/console/events", "Events"),
    ("console_verify", "/console/verify", "Verification"),
    ("console_checkpoints", "/console/checkpoints", "Checkpoints"),
    ("console_access_review", "/console/access-review", "Access review"),
    ("console_keys", "/console/keys", "Log keys"),
    ("console_export", "/console/export", "Export"),
)
# Login page notices, by query value: fixed texts, nothing of the request reflected.
NOTICES = {
    "logged_out": "You are logged out.",
    "expired": "Your session has expired. Please log in again.",
}
ACCESS_REVIEW_COLUMNS = (
    "principal",
    "kind",
    "name",
    "roles",
    "created_at",
    "age_days",
    "last_used_at",
    "expires_at",
    "flags",
)

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("gateway.console", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_CSRF_KEY: web.AppKey[bytes] = web.AppKey("console_csrf_key", bytes)
_NEXT = re.compile(r"/console/[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*")


def _csrf_key(app: web.Application) -> bytes:
    return app[_CSRF_KEY]


def _allowed(request: web.Request, route: str) -> bool:
    principal = request[REQUEST_CONTEXT].principal
    rbac = request.app.get(RBAC)
    return principal is not None and rbac is not None and rbac.allows(principal.roles, route)


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """A page in the console's layout, with the menu this principal may use."""
    principal = request[REQUEST_CONTEXT].principal
    page = _templates.get_template(template).render(
        principal=principal,
        nav=[(href, label) for name, href, label in NAV if _allowed(request, name)],
        path=request.path,
        csrf=csrf_token(_csrf_key(request.app), session_token(request)),
        csrf_field=CSRF_FIELD,
        **context,
    )
    return web.Response(text=page, status=status, content_type="text/html", charset="utf-8")


def _login_page(
    request: web.Request,
    status: int,
    error: str | None = None,
    notice: str | None = None,
    next_path: str | None = None,
) -> web.Response:
    return render(
        request,
        "login.html",
        status=status,
        error=error,
        notice=notice,
        next=_safe_next(next_path or request.query.get("next") or request.path_qs),
    )


def _safe_next(target: str) -> str:
    """Where to go after login: a console page of this origin, never anywhere else (nor a
    header-breaking character)."""
    if _NEXT.fullmatch(target) and not target.startswith(PREFIX + "/login"):
        return target
    return PREFIX + "/"


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer under /console/ carries the security headers, also those made outside
    the console's middleware (the audit middleware's 503 while the store is down)."""
    if is_console(request):
        response.headers.update(SECURITY_HEADERS)


@web.middleware
async def console_pages(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refusals of pages as HTML (a missing or
    expired session shows the login page, with status 401 as the audit records it). The
    console's JSON routes keep the error envelope."""
    if not is_console(request):
        return await handler(request)
    try:
        response = await handler(request)
    except (ApiError, web.HTTPException) as exc:
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise
        if request.path.startswith(PREFIX + "/api/"):
            raise
        response = _error_page(request, exc)
    static = request[REQUEST_CONTEXT].route_name == "console_static"
    response.headers.setdefault("Cache-Control", "private, max-age=300" if static else "no-store")
    return response


def _error_page(request: web.Request, exc: ApiError | web.HTTPException) -> web.Response:
    ctx = request[REQUEST_CONTEXT]
    if isinstance(exc, ApiError):
        status, code, message, headers = exc.status, exc.code, exc.message, exc.headers
    else:
        status, code, message, headers = exc.status, f"http_{exc.status}", exc.reason, {}
    # The auditor sees why, as the JSON API records it.
    ctx.detail.setdefault("error", {"code": code, "message": message[:200]})
    if status == 401:
        had_session = session_token(request) is not None
        response = _login_page(request, 401, notice=NOTICES["expired"] if had_session else None)
        if had_session:
            clear_session(response)
    else:
        response = render(request, "error.html", status=status, code=code, message=message)
    for name in ("Retry-After", "Allow"):
        if name in headers:
            response.headers[name] = headers[name]
    return response


def _check_origin(request: web.Request) -> None:
    """Forms post from this origin only: a second lock beside SameSite=Strict and the
    CSRF token (and the only one a login form can have)."""
    origin = request.headers.get("Origin")
    if origin != f"{request.scheme}://{request.host}":
        request[REQUEST_CONTEXT].detail["reason"] = "cross-origin or unattributed form post"
        raise ApiError(403, "csrf_failed", "Origin: this form must be posted from the console")


async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise ApiError(
            415, "unsupported_media_type", "Content-Type must be application/x-www-form-urlencoded"
        )
    raw = await read_body(request, FORM_LIMIT)
    try:
        return dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_request", "body: not UTF-8") from None


async def _checked_form(request: web.Request) -> dict[str, str]:
    """The posted form of a session, refused (403, audited) without its CSRF token. Only
    the cookie is a credential a browser adds by itself: a request that carried its own
    (an API key or bearer header) cannot be forged across sites."""
    if not request[REQUEST_CONTEXT].detail.get("console_session"):
        return await _form(request)
    _check_origin(request)
    form = await _form(request)
    if not csrf_matches(_csrf_key(request.app), session_token(request), form.get(CSRF_FIELD)):
        request[REQUEST_CONTEXT].detail["reason"] = "missing or wrong CSRF token"
        raise ApiError(403, "csrf_failed", f"{CSRF_FIELD}: missing or wrong; reload the page")
    return form


# -- login and logout -----------------------------------------------------------------


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


async def login_form(request: web.Request) -> web.Response:
    notice = NOTICES.get(request.query.get("notice", ""))
    return _login_page(request, 200, notice=notice)


async def login(request: web.Request) -> web.Response:
    """The rules of POST /v1/auth/login (the same service call, lockout and audit detail);
    the token goes into the session cookie instead of the body."""
    ctx = request[REQUEST_CONTEXT]
    _check_origin(request)
    form = await _form(request)
    service = request.app[AUTH_SERVICE]
    username = form.get("username", "")
    ctx.detail["username_ref"] = service.credential_ref("username", username)
    try:
        result = await service.login(
            username, form.get("password", ""), form.get("totp") or None, ctx.client_addr
        )
    except AuthError as exc:
        ctx.detail["reason"] = exc.reason
        ctx.detail["error"] = {"code": exc.code, "message": exc.message}
        page = _login_page(request, exc.status, error=exc.message, next_path=form.get("next"))
        page.headers.update(to_api_error(exc).headers)
        return page
    except Exception as exc:
        raise to_api_error(exc) from exc
    ctx.principal = result.principal
    ctx.credential_ref = service.credential_ref("user", result.principal.id)
    response = _see_other(_safe_next(form.get("next", "")))
    set_session(response, result.access_token)
    return response


async def logout(request: web.Request) -> web.Response:
    await _checked_form(request)
    response = _see_other(f"{PREFIX}/login?notice=logged_out")
    clear_session(response)
    return response


# -- pages ------------------------------------------------------------------------------


async def home(request: web.Request) -> web.Response:
    return render(request, "home.html")


def _event_query(request: web.Request) -> tuple[EventQuery, dict[str, str]]:
    """The events page's filters: the JSON route's, with empty form fields left out and
    the HTTP status besides."""
    values = {k: v for k, v in request.query.items() if v.strip()}
    status = _number(request, "status", 100, 599)
    values.pop("status", None)
    values.setdefault("limit", str(PAGE_SIZE))
    query = audit_routes.parse_event_query(values)
    if status is not None:
        values["status"] = str(status)
    return dataclasses.replace(query, http_status=status), values


async def events(request: web.Request) -> web.Response:
    query, values = _event_query(request)
    page = await query_events(request.app[DB_ENGINE], query)
    filters = {k: v for k, v in values.items() if k not in ("after_seq", "limit")}
    next_url = None
    if page.next_after_seq is not None:
        next_url = f"{PREFIX}/events?" + urlencode({**filters, "after_seq": page.next_after_seq})
    return render(
        request,
        "events.html",
        events=page.events,
        filters=filters,
        outcomes=sorted(audit_routes.OUTCOMES),
        next_url=next_url,
        first_url=f"{PREFIX}/events?" + urlencode(filters) if query.after_seq else None,
    )


def _number(request: web.Request, name: str, low: int, high: int = 2**63 - 1) -> int | None:
    """An integer query parameter within [low, high], None when absent or empty."""
    text = request.query.get(name, "").strip()
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,19}", text) or not low <= int(text) <= high:
        raise ApiError(400, "invalid_query", f"query parameter {name!r} must be {low} to {high}")
    return int(text)


def _seq(request: web.Request) -> int:
    seq = _number(request, "seq", 1)
    if seq is None:
        raise ApiError(400, "invalid_query", "query parameter 'seq' is required")
    return seq


async def event(request: web.Request) -> web.Response:
    """The record's page; the browser fetches the entry with its proof and verifies it."""
    return render(request, "event.html", seq=_seq(request))


async def event_proof(request: web.Request) -> web.Response:
    """An entry exactly as hashed, its inclusion proof and the checkpoint it is proved
    against: everything the browser needs, nothing it must trust."""
    seq = _seq(request)
    async with request.app[DB_ENGINE].connect() as conn:
        row = (
            (await conn.execute(select(audit_events).where(audit_events.c.seq == seq)))
            .mappings()
            .first()
        )
        if row is None:
            raise ApiError(404, "not_found", f"seq: no retained entry {seq}")
        head = await latest_tree_head(conn)
        if head is None or head.size < seq:
            raise ApiError(404, "no_checkpoint", f"seq: no checkpoint covers entry {seq} yet")
        hashes = await inclusion_proof(conn, seq - 1, head.size)
    return web.json_response(
        {
            "seq": seq,
            "entry": entry_from_row(row),
            "index": seq - 1,
            "size": head.size,
            "hashes": [base64.b64encode(h).decode() for h in hashes],
            "checkpoint": head.note,
        }
    )


async def verify_page(request: web.Request) -> web.Response:
    return render(request, "verify.html", report=None)


async def verify_run(request: web.Request) -> web.Response:
    """The gateway's full verification, as GET /v1/audit/verify answers it."""
    await _checked_form(request)
    report = await audit_routes.verify_report(request)
    return render(request, "verify.html", report=report.to_dict())


async def checkpoints(request: web.Request) -> web.Response:
    before = _number(request, "before", 1)
    statement = select(
        audit_tree_heads.c.size,
        audit_tree_heads.c.issued_at,
        audit_tree_heads.c.key_id,
        audit_tree_heads.c.root,
    ).order_by(audit_tree_heads.c.size.desc())
    if before is not None:
        statement = statement.where(audit_tree_heads.c.size < before)
    async with request.app[DB_ENGINE].connect() as conn:
        rows = (await conn.execute(statement.limit(CHECKPOINTS_PAGE + 1))).all()
    heads = [
        {
            "size": r.size,
            "issued_at": r.issued_at,
            "key_id": r.key_id,
            "root": base64.b64encode(bytes(r.root)).decode(),
        }
        for r in rows[:CHECKPOINTS_PAGE]
    ]
    more = len(rows) > CHECKPOINTS_PAGE
    next_url = f"{PREFIX}/checkpoints?before={heads[-1]['size']}" if more else None
    return render(request, "checkpoints.html", heads=heads, next_url=next_url)


async def _access_review(request: web.Request) -> dict[str, Any]:
    try:
        return await request.app[AUTH_SERVICE].access_review()
    except Exception as exc:
        raise to_api_error(exc) from exc


def _cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text, never runs as a formula."""
    text = ";".join(value) if isinstance(value, list) else "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


async def access_review(request: web.Request) -> web.Response:
    review = await _access_review(request)
    return render(request, "access_review.html", review=review)


async def access_review_csv(request: web.Request) -> web.Response:
    review = await _access_review(request)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(ACCESS_REVIEW_COLUMNS)
    for entry in review["principals"]:
        writer.writerow([_cell(entry.get(column)) for column in ACCESS_REVIEW_COLUMNS])
    stamp = review["generated_at"].replace(":", "").replace("-", "")[:15]
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="access-review-{stamp}.csv"'},
    )


async def keys(request: web.Request) -> web.Response:
    listing = await list_log_keys(request.app[DB_ENGINE])
    return render(request, "keys.html", keys=[k.to_dict() for k in listing])


async def export_page(request: web.Request) -> web.Response:
    return render(request, "export.html")


async def redirect_home(request: web.Request) -> web.Response:
    return _see_other(PREFIX + "/")


_HTML = {"text/html": {"schema": {"type": "string"}}}
_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_SEQ = {"name": "seq", "in": "query", "required": True, "schema": {"type": "integer"}}
_EVENT_FILTERS = tuple(
    {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
    for name in ("since", "until", "actor", "action", "outcome", "status", "after_seq")
)
_FORM = {
    "required": True,
    "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}},
}


def _document(
    app: web.Application,
    name: str,
    summary: str,
    answer: dict[str, Any] | None = None,
    parameters: tuple[dict[str, Any], ...] = (),
    form: bool = False,
) -> None:
    """The console in the OpenAPI document: browser pages (HTML, refusals too) and the
    JSON its scripts read (refusals as the error envelope)."""
    extra: dict[str, Any] = {
        "responses": {
            "200": {"description": "success", "content": answer or _HTML},
            "default": {
                "description": "a redirect, or a refusal saying why",
                "content": {**_HTML, **_ERROR},
            },
        }
    }
    if form:
        extra["requestBody"] = _FORM
    doc = RouteDoc(summary=summary, tags=("console",), parameters=parameters)
    document_route(app, name, dataclasses.replace(doc, extra=extra))


def _document_routes(app: web.Application) -> None:
    for name, summary in (
        ("console_redirect", "Redirect to the console"),
        ("console_login_form", "Console login page"),
        ("console_home", "Console home"),
        ("console_verify", "Verification page"),
        ("console_checkpoints", "Checkpoint history"),
        ("console_access_review", "Access review"),
        ("console_keys", "Log verifier keys"),
        ("console_export", "Export page"),
        ("console_static", "The console's scripts and stylesheet"),
    ):
        _document(app, name, summary)
    _document(app, "console_login", "Log in (password and one-time code)", form=True)
    _document(app, "console_logout", "Log out", form=True)
    _document(app, "console_verify_run", "Full verification by the gateway", form=True)
    _document(app, "console_events", "Audit events", parameters=_EVENT_FILTERS)
    _document(app, "console_event", "One audit event, verified in the browser", parameters=(_SEQ,))
    _document(
        app,
        "console_event_proof",
        "An entry, its inclusion proof and checkpoint",
        {"application/json": {"schema": {"type": "object"}}},
        parameters=(_SEQ,),
    )
    _document(
        app,
        "console_checkpoint",
        "The latest signed checkpoint",
        {"text/plain": {"schema": {"type": "string"}}},
    )
    consistency = tuple(
        {"name": n, "in": "query", "required": True, "schema": {"type": "integer"}}
        for n in ("old", "size")
    )
    _document(
        app,
        "console_proof_consistency",
        "RFC 9162 consistency proof",
        {"application/json": {"schema": {"type": "object"}}},
        parameters=consistency,
    )
    _document(
        app,
        "console_export_download",
        "JSON Lines export",
        {audit_routes.EXPORT_CONTENT_TYPE: {"schema": {"type": "string"}}},
    )
    _document(
        app,
        "console_access_review_csv",
        "Access review as CSV",
        {"text/csv": {"schema": {"type": "string"}}},
    )


def add_routes(app: web.Application) -> None:
    """Register the console under /console/ and its middleware (to be placed between the
    audit middleware and authentication)."""
    _document_routes(app)
    app[_CSRF_KEY] = app[MASTER_KEY].derive(CSRF_PURPOSE)
    app.on_response_prepare.append(_security_headers)
    router = app.router
    router.add_get(PREFIX, redirect_home, name="console_redirect")
    router.add_get(PREFIX + "/login", login_form, name="console_login_form")
    router.add_post(PREFIX + "/login", login, name="console_login")
    router.add_post(PREFIX + "/logout", logout, name="console_logout")
    router.add_get(PREFIX + "/", home, name="console_home")
    router.add_get(PREFIX + "/events", events, name="console_events")
    router.add_get(PREFIX + "/event", event, name="console_event")
    router.add_get(PREFIX + "/verify", verify_page, name="console_verify")
    router.add_post(PREFIX + "/verify", verify_run, name="console_verify_run")
    router.add_get(PREFIX + "/checkpoints", checkpoints, name="console_checkpoints")
    router.add_get(PREFIX + "/access-review", access_review, name="console_access_review")
    router.add_get(
        PREFIX + "/access-review.csv", access_review_csv, name="console_access_review_csv"
    )
    router.add_get(PREFIX + "/keys", keys, name="console_keys")
    router.add_get(PREFIX + "/export", export_page, name="console_export")
    # The JSON the pages' scripts read: the JSON API's own handlers where one exists.
    router.add_get(PREFIX + "/api/event-proof", event_proof, name="console_event_proof")
    router.add_get(
        PREFIX + "/api/checkpoint", audit_routes.log_checkpoint, name="console_checkpoint"
    )
    router.add_get(
        PREFIX + "/api/proof/consistency",
        audit_routes.log_consistency,
        name="console_proof_consistency",
    )
    router.add_get(PREFIX + "/api/export", audit_routes.export, name="console_export_download")
    router.add_static(PREFIX + "/static/", STATIC_DIR, name="console_static")
