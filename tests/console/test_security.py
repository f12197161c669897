"""The console's security over HTTPS, against a real gateway: the session cookie's flags
and its reach, CSRF on every form, the CSP on every answer, a client API key kept out of
the audit pages, the login's rules, and an expired session; each refusal audited."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.console.routes import CSP
from gateway.console.session import COOKIE
from tests.console.conftest import (
    LiveGateway,
    Person,
    start_live_gateway,
    stop_live_gateway,
)

PAGES = ("/console/", "/console/events", "/console/verify", "/console/checkpoints", "/console/keys")
AUDIT_PAGES = (
    "/console/events",
    "/console/event?seq=1",
    "/console/verify",
    "/console/checkpoints",
    "/console/export",
    "/console/api/event-proof?seq=1",
    "/console/api/checkpoint",
    "/console/api/export",
)


def log_in(
    gateway: LiveGateway, person: Person, **form: str
) -> tuple[requests.Session, requests.Response]:
    session = requests.Session()
    body = {"username": person.username, "password": person.password, "totp": person.code()}
    answer = gateway.http(
        "POST",
        "/console/login",
        session,
        data={**body, **form},
        headers={"Origin": gateway.url},
        allow_redirects=False,
    )
    return session, answer


def csrf_of(page: str) -> str:
    (token,) = set(re.findall(r'name="csrf_token" value="([0-9a-f]{64})"', page))
    return token


def detail(record: dict) -> dict:
    return json.loads(record["detail"])


def test_the_session_cookie_is_strict_and_only_the_console_reads_it(
    live_gateway: LiveGateway,
) -> None:
    auditor = live_gateway.person("carol", ["auditor"])
    session, answer = log_in(live_gateway, auditor, next="/console/verify")
    assert (answer.status_code, answer.headers["Location"]) == (303, "/console/verify")
    cookie = answer.headers["Set-Cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert attributes == {"httponly", "secure", "samesite", "path"}  # no Max-Age, no Expires
    assert "SameSite=Strict" in cookie and "Path=/console;" in cookie + ";"
    token = session.cookies[COOKIE]
    record = live_gateway.audit_record(answer.headers["X-Request-ID"])
    assert (record["action"], record["outcome"]) == ("console_login", "success")
    assert token not in json.dumps(record) and auditor.password not in json.dumps(record)
    # The console accepts the cookie; the JSON API does not, even on purpose.
    page = live_gateway.http("GET", "/console/events", session)
    assert page.status_code == 200
    viewed = live_gateway.audit_record(page.headers["X-Request-ID"])
    assert (viewed["action"], viewed["outcome"]) == ("console_events", "success")
    assert detail(viewed)["console_session"] is True and token not in json.dumps(viewed)
    api = live_gateway.http("GET", "/v1/audit/events", headers={"Cookie": f"{COOKIE}={token}"})
    assert api.status_code == 401
    # After login, the next page is a console page of this origin, never elsewhere.
    for n, target in enumerate(("https://evil.example/", "//evil.example/", "/v1/audit/export")):
        # Another person each time: a one-time code is accepted once.
        _, answer = log_in(live_gateway, live_gateway.person(f"carol{n}", ["auditor"]), next=target)
        assert answer.headers["Location"] == "/console/"


def test_forms_without_their_csrf_token_are_refused(live_gateway: LiveGateway) -> None:
    auditor = live_gateway.person("dave", ["auditor"])
    session, _ = log_in(live_gateway, auditor)
    other, _ = log_in(live_gateway, live_gateway.person("erin", ["auditor"]))
    token = csrf_of(live_gateway.http("GET", "/console/verify", session).text)
    foreign = csrf_of(live_gateway.http("GET", "/console/verify", other).text)
    assert token != foreign
    origin = {"Origin": live_gateway.url}
    for path in ("/console/logout", "/console/verify"):
        for form, headers in (
            ({"next": "/console/"}, origin),
            ({"csrf_token": ""}, origin),
            ({"csrf_token": foreign}, origin),
            ({"csrf_token": token}, {"Origin": "https://evil.example"}),
            ({"csrf_token": token}, {}),
        ):
            refused = live_gateway.http(
                "POST", path, session, data=form, headers=headers, allow_redirects=False
            )
            assert refused.status_code == 403, (path, form, headers)
            assert "csrf_failed" in refused.text
            record = live_gateway.audit_record(refused.headers["X-Request-ID"])
            assert (record["outcome"], record["http_status"]) == ("denied", 403)
            assert detail(record)["error"]["code"] == "csrf_failed"
    # Nothing happened: the session still works, and the right token does what it says.
    assert live_gateway.http("GET", "/console/events", session).status_code == 200
    ran = live_gateway.http(
        "POST", "/console/verify", session, data={"csrf_token": token}, headers=origin
    )
    assert ran.status_code == 200 and 'data-testid="verify-status"' in ran.text
    out = live_gateway.http(
        "POST", "/console/logout", session, data={"csrf_token": token}, headers=origin,
        allow_redirects=False,
    )  # fmt: skip
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["Set-Cookie"]


def test_every_console_answer_carries_the_csp_and_pages_need_nothing_inline(
    live_gateway: LiveGateway,
) -> None:
    assert "unsafe-inline" not in CSP and CSP.startswith("default-src 'self'")
    auditor, _ = log_in(live_gateway, live_gateway.person("frank", ["auditor"]))
    admin, _ = log_in(live_gateway, live_gateway.person("grace", ["admin"]))
    answers = [
        live_gateway.http("GET", "/console/login"),
        live_gateway.http("GET", "/console/events"),  # 401: the login page
        live_gateway.http("GET", "/console/nowhere", auditor),  # 404
        live_gateway.http("GET", "/console/static/console.js"),
        live_gateway.http("GET", "/console/api/event-proof?seq=1", auditor),
        live_gateway.http("GET", "/console/access-review", admin),
        *(live_gateway.http("GET", page, auditor) for page in PAGES),
        live_gateway.http("GET", "/console/event?seq=1", auditor),
    ]
    for answer in answers:
        assert answer.headers["Content-Security-Policy"] == CSP, answer.url
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["X-Frame-Options"] == "DENY"
        if answer.headers["Content-Type"].startswith("text/html"):
            html = answer.text
            assert re.search(r"<script(?![^>]*\bsrc=)", html) is None, answer.url
            assert re.search(r"<style|\sstyle=|\son[a-z]+=", html) is None, answer.url
            assert answer.headers["Cache-Control"] == "no-store"
    assert [a.status_code for a in answers[:3]] == [200, 401, 404]


def test_an_audit_outage_answer_carries_the_csp_too(live_gateway: LiveGateway) -> None:
    # The audit store refuses the console's records (a trigger, as the owner): the audit
    # middleware answers 503 outside the console's own middleware, with its headers all
    # the same, and records nothing.
    auditor, _ = log_in(live_gateway, live_gateway.person("olive", ["auditor"]))
    database = sqlite3.connect(live_gateway.data_dir / "gateway.db")
    try:
        database.execute(
            "CREATE TRIGGER test_refuse_console BEFORE INSERT ON audit_events "
            "WHEN NEW.action = 'console_events' BEGIN SELECT RAISE(ABORT, 'injected'); END"
        )
        database.commit()
        refused = live_gateway.http("GET", "/console/events", auditor)
    finally:
        database.execute("DROP TRIGGER test_refuse_console")
        database.commit()
        database.close()
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "audit_unavailable"
    assert refused.headers["Content-Security-Policy"] == CSP
    assert refused.headers["X-Frame-Options"] == "DENY"
    assert live_gateway.http("GET", "/console/events", auditor).status_code == 200


def test_a_client_api_key_cannot_open_audit_pages(live_gateway: LiveGateway) -> None:
    client = {"X-API-Key": live_gateway.api_key("client")}
    for path in (*AUDIT_PAGES, "/console/access-review", "/console/access-review.csv"):
        refused = live_gateway.http("GET", path, headers=client)
        assert refused.status_code == 403, path
        record = live_gateway.audit_record(refused.headers["X-Request-ID"])
        assert (record["outcome"], record["role"]) == ("denied", "client")
        assert detail(record)["reason"].startswith("missing ")
    # The gate is the role, not the kind of credential: an auditor's key reads the pages.
    auditor = {"X-API-Key": live_gateway.api_key("auditor")}
    assert live_gateway.http("GET", "/console/events", headers=auditor).status_code == 200


def test_login_follows_the_rules_of_the_json_login(live_gateway: LiveGateway) -> None:
    person = live_gateway.person("heidi", ["auditor"])
    origin = {"Origin": live_gateway.url}
    attempts = {
        "wrong password": {"username": "heidi", "password": "x" * 20, "totp": "000000"},
        "one-time code required": {"username": "heidi", "password": person.password},
        "unknown user": {"username": "nobody", "password": "x" * 20},
    }
    for reason, form in attempts.items():
        refused = live_gateway.http(
            "POST", "/console/login", data=form, headers=origin, allow_redirects=False
        )
        assert refused.status_code == 401 and 'data-testid="login-error"' in refused.text
        assert "Set-Cookie" not in refused.headers
        record = live_gateway.audit_record(refused.headers["X-Request-ID"])
        assert (record["action"], record["outcome"]) == ("console_login", "unauthenticated")
        assert detail(record)["reason"] == reason
        assert form["password"] not in record["detail"]
        assert detail(record)["username_ref"].startswith("username:")
    # The login throttle counts console failures like API ones: after them, this source is
    # held back even with the right password and code.
    for _ in range(3):
        live_gateway.http("POST", "/console/login", data=attempts["wrong password"], headers=origin)
    _, held = log_in(live_gateway, person)
    assert held.status_code == 429 and int(held.headers["Retry-After"]) >= 1
    reason = detail(live_gateway.audit_record(held.headers["X-Request-ID"]))["reason"]
    assert reason.startswith("throttled after")
    # A login posted from another origin is refused before any password is checked.
    cross = live_gateway.http(
        "POST", "/console/login", data=attempts["wrong password"],
        headers={"Origin": "https://evil.example"},
    )  # fmt: skip
    assert cross.status_code == 403


@pytest.fixture
def short_sessions(tmp_path: Path) -> Iterator[LiveGateway]:
    gateway, thread = start_live_gateway(tmp_path / "gw", auth={"tokens": {"ttl_seconds": 4}})
    yield gateway
    stop_live_gateway(gateway, thread)


def test_an_expired_session_returns_to_login_with_a_message(short_sessions: LiveGateway) -> None:
    gateway = short_sessions
    session, _ = log_in(gateway, gateway.person("ivan", ["auditor"]), next="/console/events")
    assert gateway.http("GET", "/console/events", session).status_code == 200
    time.sleep(4.1)  # past the token's whole lifetime, however late the first page came
    expired = gateway.http("GET", "/console/events", session)
    assert expired.status_code == 401
    assert "Your session has expired. Please log in again." in expired.text
    assert 'name="next" value="/console/events"' in expired.text
    assert f'{COOKIE}=""' in expired.headers["Set-Cookie"]  # the stale cookie is dropped
    record = gateway.audit_record(expired.headers["X-Request-ID"])
    assert (record["outcome"], record["actor"]) == ("unauthenticated", None)
    assert "expired" in detail(record)["reason"]


def test_a_foreign_cookie_or_a_crafted_next_breaks_nothing(live_gateway: LiveGateway) -> None:
    garbage = {"Cookie": f"{COOKIE}=not-a-token"}
    assert live_gateway.http("GET", "/console/login", headers=garbage).status_code == 200
    refused = live_gateway.http("GET", "/console/events", headers=garbage)
    assert refused.status_code == 401 and f'{COOKIE}=""' in refused.headers["Set-Cookie"]
    record = live_gateway.audit_record(refused.headers["X-Request-ID"])
    assert (record["outcome"], detail(record)["error"]["code"]) == (
        "unauthenticated",
        "invalid_credentials",
    )
    # A failed login keeps where the person was going; a crafted target is dropped.
    person = live_gateway.person("judy", ["auditor"])
    wrong = {"username": "judy", "password": "x" * 20, "totp": "000000"}
    for target, kept in (
        ("/console/checkpoints?before=9", "/console/checkpoints?before=9"),
        ("/console/\r\nSet-Cookie: x=y", "/console/"),
    ):
        page = live_gateway.http(
            "POST", "/console/login", data={**wrong, "next": target},
            headers={"Origin": live_gateway.url},
        )  # fmt: skip
        assert page.status_code == 401
        assert f'name="next" value="{kept}"' in page.text
    _, answer = log_in(live_gateway, person, next="/console/\r\nSet-Cookie: x=y")
    assert answer.status_code == 303 and answer.headers["Location"] == "/console/"


def test_login_attempts_spend_the_anonymous_rate_limit(tmp_path: Path) -> None:
    """The console's login is limited per address like POST /v1/auth/login."""
    limited = {"ratelimit": {"anonymous": {"rate": 0.01, "burst": 3}}}
    gateway, thread = start_live_gateway(tmp_path / "gw", auth=limited)
    try:
        wrong = {"username": "nobody", "password": "x" * 20}
        origin = {"Origin": gateway.url}
        statuses = [
            gateway.http("POST", "/console/login", data=wrong, headers=origin).status_code
            for _ in range(3)
        ]
        assert statuses == [401, 401, 401]
        limited_answer = gateway.http("POST", "/console/login", data=wrong, headers=origin)
        assert limited_answer.status_code == 429 and int(limited_answer.headers["Retry-After"]) > 0
        assert limited_answer.headers["Content-Type"].startswith("text/html")
        record = gateway.audit_record(limited_answer.headers["X-Request-ID"])
        assert (record["action"], record["outcome"]) == ("console_login", "rate_limited")
    finally:
        stop_live_gateway(gateway, thread)


def test_bad_page_parameters_are_precise_400s(live_gateway: LiveGateway) -> None:
    auditor = {"X-API-Key": live_gateway.api_key("auditor")}
    for path, named in (
        ("/console/events?status=42", "status"),
        ("/console/events?status=²", "status"),
        ("/console/events?since=yesterday", "since"),
        ("/console/events?outcome=fine", "outcome"),
        ("/console/events?colour=red", "colour"),
        ("/console/event?seq=0", "seq"),
        ("/console/event", "seq"),
        ("/console/checkpoints?before=99999999999999999999", "before"),
        ("/console/api/event-proof?seq=x", "seq"),
    ):
        refused = live_gateway.http("GET", path, headers=auditor)
        assert refused.status_code == 400, path
        assert f"&#39;{named}&#39;" in refused.text or f"'{named}'" in refused.text, path
        record = live_gateway.audit_record(refused.headers["X-Request-ID"])
        assert (record["outcome"], detail(record)["error"]["code"]) == ("invalid", "invalid_query")
    # Empty fields of the filter form mean "any".
    blank = "/console/events?since=&until=&actor=&action=&outcome=&status="
    assert live_gateway.http("GET", blank, headers=auditor).status_code == 200
