"""Every refusal is a JSON error envelope with the request id, names the offending
field, and leaves exactly one audit record."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from auth.errors import NotFound
from gateway.identity import AUTH_SERVICE
from tests.gateway.conftest import Gateway
from tests.gateway.helpers import hx, make_blob

Z = "0x" + "00" * 32
C48 = "0x" + "c0" + "00" * 47


async def _refused(
    gw: Gateway, response: Any, body: Any, status: int, code: str, outcome: str
) -> dict[str, Any]:
    assert response.status == status, body
    request_id = response.headers["X-Request-ID"]
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == request_id
    assert "receipt" not in body
    [record] = await gw.audit_records(request_id)
    assert record["http_status"] == status and record["outcome"] == outcome
    assert json.loads(record["detail"])["error"] == {
        "code": code,
        "message": body["error"]["message"],
    }
    return body["error"]


@pytest.mark.parametrize(
    ("path", "payload", "code", "named"),
    [
        ("/v1/kzg/verify-proof", {"commitment": C48, "z": Z, "y": Z}, "missing_field", "proof"),
        ("/v1/kzg/verify-proof", {"commitment": C48, "z": Z, "y": Z, "proof": C48, "x": 1},
         "unknown_field", "x"),
        ("/v1/kzg/verify-proof", {"commitment": "c0" * 48, "z": Z, "y": Z, "proof": C48},
         "invalid_commitment", "commitment"),
        ("/v1/kzg/verify-proof", {"commitment": C48[:-2], "z": Z, "y": Z, "proof": C48},
         "invalid_commitment", "48 bytes"),
        ("/v1/kzg/verify-proof", {"commitment": C48, "z": "0x" + "zz" * 32, "y": Z, "proof": C48},
         "invalid_z", "z is not valid hex"),
        ("/v1/kzg/verify-blob-proof-batch",
         {"blobs": [hx(make_blob(1))] * 3 + ["0x00"], "commitments": [C48] * 4, "proofs": [C48] * 4},
         "invalid_blobs", "blobs[3]"),
        ("/v1/kzg/recover-cells-and-proofs", {"cell_indices": [0, 128], "cells": []},
         "invalid_cell_indices", "cell_indices[1]"),
        ("/v1/kzg/recover-cells-and-proofs", {"cell_indices": [0, True], "cells": []},
         "invalid_cell_indices", "cell_indices[1]"),
        ("/v1/kzg/blob-to-commitment", ["0x00"], "invalid_json", "JSON object"),
        ("/v1/kzg/blob-to-commitment", {"blob": "0x" + "ff" * 131072}, "invalid_blob", "blob"),
        ("/v1/kzg/verify-proof", {"commitment": C48, "z": "0x" + "ff" * 32, "y": Z, "proof": C48},
         "invalid_z", "not a canonical field element"),
        ("/v1/kzg/verify-proof", {"commitment": "0x" + "ab" * 48, "z": Z, "y": Z, "proof": C48},
         "invalid_commitment", "not a valid G1 point"),
    ],
)  # fmt: skip
async def test_bad_input_is_400_naming_the_field(
    sqlite_gateway: Gateway, path: str, payload: Any, code: str, named: str
) -> None:
    response, body = await sqlite_gateway.post(path, payload)
    error = await _refused(sqlite_gateway, response, body, 400, code, "invalid")
    assert named in error["message"]


async def test_not_json_is_400(sqlite_gateway: Gateway) -> None:
    response, body = await sqlite_gateway.request(
        "POST", "/v1/kzg/verify-proof", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    await _refused(sqlite_gateway, response, body, 400, "invalid_json", "invalid")


async def test_unknown_path_is_404(sqlite_gateway: Gateway) -> None:
    response, body = await sqlite_gateway.request("GET", "/v1/kzg/nothing-here")
    await _refused(sqlite_gateway, response, body, 404, "not_found", "not_found")


@pytest.mark.parametrize(
    ("raised", "status", "code", "outcome"),
    [
        (NotFound("no user 'nobody'"), 404, "not_found", "not_found"),
        (KeyError("kid"), 500, "internal_error", "error"),
    ],
)
async def test_only_a_missing_thing_is_404_not_a_key_error_bug(
    sqlite_gateway: Gateway,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    status: int,
    code: str,
    outcome: str,
) -> None:
    """Given the identity service failing under a route (fault injected), then NotFound
    is answered 404 naming what is missing, while a KeyError, which is a bug, is a 500
    that says nothing of it; both audited."""

    async def fail() -> None:
        raise raised

    monkeypatch.setattr(sqlite_gateway.app[AUTH_SERVICE], "jwks", fail)
    response, body = await sqlite_gateway.request("GET", "/.well-known/jwks.json", role=None)
    error = await _refused(sqlite_gateway, response, body, status, code, outcome)
    assert ("nobody" in error["message"]) == (status == 404)


async def test_wrong_method_is_405_with_allow(sqlite_gateway: Gateway) -> None:
    response, body = await sqlite_gateway.request("GET", "/v1/kzg/verify-proof")
    await _refused(sqlite_gateway, response, body, 405, "method_not_allowed", "invalid")
    assert response.headers["Allow"] == "POST"


async def test_body_over_the_route_limit_is_413(sqlite_gateway: Gateway) -> None:
    big = {"commitment": "0x" + "00" * 8000, "z": Z, "y": Z, "proof": C48}
    response, body = await sqlite_gateway.post("/v1/kzg/verify-proof", big)
    await _refused(sqlite_gateway, response, body, 413, "too_large", "too_large")


async def test_raw_blob_of_wrong_size_is_400_and_over_size_413(sqlite_gateway: Gateway) -> None:
    octet = {"Content-Type": "application/octet-stream"}
    response, body = await sqlite_gateway.request(
        "POST", "/v1/kzg/blob-to-commitment", data=b"\x00" * 1000, headers=octet
    )
    await _refused(sqlite_gateway, response, body, 400, "invalid_blob", "invalid")
    response, body = await sqlite_gateway.request(
        "POST", "/v1/kzg/blob-to-commitment", data=b"\x00" * 131073, headers=octet
    )
    await _refused(sqlite_gateway, response, body, 413, "too_large", "too_large")


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/kzg/verify-proof", "text/plain"),
        ("/v1/kzg/verify-proof", "application/octet-stream"),
        ("/v1/kzg/compute-blob-proof", "application/octet-stream"),
    ],
)
async def test_wrong_content_type_is_415(
    sqlite_gateway: Gateway, path: str, content_type: str
) -> None:
    response, body = await sqlite_gateway.request(
        "POST", path, data=b"\x00" * 64, headers={"Content-Type": content_type}
    )
    await _refused(sqlite_gateway, response, body, 415, "unsupported_media_type", "invalid")


async def test_no_credential_is_401(sqlite_gateway: Gateway) -> None:
    response, body = await sqlite_gateway.post(
        "/v1/kzg/verify-proof", {"commitment": C48, "z": Z, "y": Z, "proof": C48}, role=None
    )
    await _refused(sqlite_gateway, response, body, 401, "unauthenticated", "unauthenticated")


async def test_without_a_security_module_kzg_routes_are_closed(start_gateway: Any) -> None:
    from gateway import app as gateway_app

    gw = await start_gateway(security=lambda app, config: [gateway_app.deny_by_default])
    response, body = await gw.post(
        "/v1/kzg/verify-proof", {}, role=None, headers={"X-API-Key": "kzg_anything"}
    )
    await _refused(gw, response, body, 401, "unauthenticated", "unauthenticated")
    response, _ = await gw.request("GET", "/healthz", role=None)
    assert response.status == 200


async def test_a_path_decoding_to_nul_is_audited_without_failing_others(gateway: Gateway) -> None:
    # "/%00" decodes to NUL, which PostgreSQL text refuses: the record is stored escaped,
    # and the requests committed in the same batch are not turned into 503s.
    results = await asyncio.gather(
        gateway.request("GET", "/%00", role=None),
        *(gateway.request("GET", f"/nothing-{n}", role=None) for n in range(10)),
    )
    assert [r.status for r, _ in results] == [404] * 11, [b for _, b in results]
    response, body = results[0]
    await _refused(gateway, response, body, 404, "not_found", "not_found")
    [record] = await gateway.audit_records(response.headers["X-Request-ID"])
    assert record["path"] == "/\\x00"


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


@pytest.mark.parametrize(
    ("path", "role", "document"),
    [
        # Deeper than the interpreter's recursion limit: once a 500 RecursionError.
        ("/v1/auth/login", None, _nested(2000)),
        ("/v1/kzg/verify-proof", "client", _nested(2000)),
        ("/v1/kzg/batch", "client", b'{"operations": ' + _nested(5000) + b"}"),
        # Past the bound but parseable: refused all the same.
        ("/v1/auth/login", None, b'{"username": ' + _nested(40) + b"}"),
        ("/v1/kzg/verify-proof", "client", b'{"commitment": ' + _nested(40) + b"}"),
    ],
    ids=["login-2000", "kzg-2000", "batch-5000", "login-40", "kzg-40"],
)
async def test_deeply_nested_json_is_400_naming_the_body(
    sqlite_gateway: Gateway, path: str, role: str | None, document: bytes
) -> None:
    response, body = await sqlite_gateway.request(
        "POST", path, role=role, data=document, headers={"Content-Type": "application/json"}
    )
    error = await _refused(sqlite_gateway, response, body, 400, "invalid_json", "invalid")
    assert "body" in error["message"] and "nests deeper than 32 levels" in error["message"]


def test_json_within_the_depth_bound_parses() -> None:
    from gateway.limits import MAX_JSON_DEPTH, JsonTooDeep, parse_json

    assert parse_json(_nested(MAX_JSON_DEPTH)) is not None
    assert parse_json(b'{"a": [' + b"[1]," * 100 + b"[2]]}")["a"][-1] == [2]
    with pytest.raises(JsonTooDeep):
        parse_json(_nested(MAX_JSON_DEPTH + 1))


def test_every_request_body_is_parsed_by_the_bounded_parser() -> None:
    """The server's modules decode JSON only through gateway.limits.parse_json, so that
    no route (admin and identity routes included) parses a body without the bound. The
    CLI and the client SDK read files and answers, not requests."""
    import ast
    from pathlib import Path

    import gateway

    root = Path(gateway.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.parent.name in ("cli", "client") or path.name == "limits.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("loads", "load")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "json"
            ):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []
