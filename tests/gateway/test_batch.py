"""POST /v1/kzg/batch over real HTTPS: its results equal the single routes' on both
engines, a bad operation gets its own error while the others get their results, a body
that is no batch is refused whole, a saturated pool refuses the whole batch, and the
batch is one request: one audit entry listing every operation, one receipt."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest

from gateway.appkeys import KZG_POOL
from gateway.routes.kzg import _code_for, _item_message
from kzg import KZGError
from tests.gateway.conftest import Gateway, StartGateway
from tests.gateway.helpers import (
    body_digest,
    check_receipt,
    hold_worker,
    hx,
    input_sha256,
    make_blob,
    reference_engine,
    stored_entry,
    vkeys_of,
)

BATCH = "/v1/kzg/batch"
Z = bytes(31) + b"\x09"
PATHS = {
    "blob_to_kzg_commitment": "/v1/kzg/blob-to-commitment",
    "compute_kzg_proof": "/v1/kzg/compute-proof",
    "compute_blob_kzg_proof": "/v1/kzg/compute-blob-proof",
    "verify_kzg_proof": "/v1/kzg/verify-proof",
    "verify_blob_kzg_proof": "/v1/kzg/verify-blob-proof",
    "verify_blob_kzg_proof_batch": "/v1/kzg/verify-blob-proof-batch",
    "compute_cells_and_kzg_proofs": "/v1/kzg/compute-cells-and-proofs",
    "recover_cells_and_kzg_proofs": "/v1/kzg/recover-cells-and-proofs",
    "verify_cell_kzg_proof_batch": "/v1/kzg/verify-cell-proof-batch",
}


def versioned_hash(commitment_hex: str) -> str:
    """EIP-4844 kzg_to_versioned_hash, from the EIP's text."""
    commitment = bytes.fromhex(commitment_hex.removeprefix("0x"))
    return hx(b"\x01" + hashlib.sha256(commitment).digest()[1:])


def _every_operation() -> list[dict[str, Any]]:
    """One batch item per KZG operation, with inputs made by the reference engine."""
    eng = reference_engine()
    blobs = [make_blob(40 + n) for n in range(2)]
    commitments = [eng.blob_to_kzg_commitment(b) for b in blobs]
    proofs = [eng.compute_blob_kzg_proof(b, c) for b, c in zip(blobs, commitments, strict=True)]
    proof, y = eng.compute_kzg_proof(blobs[0], Z)
    cells, cell_proofs = eng.compute_cells_and_kzg_proofs(blobs[1])
    half = list(range(1, 128, 2))
    picked = (3, 64, 100)
    return [
        {"operation": "blob_to_kzg_commitment", "blob": hx(blobs[0])},
        {"operation": "compute_kzg_proof", "blob": hx(blobs[0]), "z": hx(Z)},
        {"operation": "compute_blob_kzg_proof", "blob": hx(blobs[1]), "commitment": hx(commitments[1])},
        {"operation": "verify_kzg_proof", "commitment": hx(commitments[0]), "z": hx(Z), "y": hx(y),
         "proof": hx(proof)},
        {"operation": "verify_blob_kzg_proof", "blob": hx(blobs[1]), "commitment": hx(commitments[1]),
         "proof": hx(proofs[0])},
        {"operation": "verify_blob_kzg_proof_batch", "blobs": [hx(b) for b in blobs],
         "commitments": [hx(c) for c in commitments], "proofs": [hx(p) for p in proofs]},
        {"operation": "compute_cells_and_kzg_proofs", "blob": hx(blobs[1])},
        {"operation": "recover_cells_and_kzg_proofs", "cell_indices": half,
         "cells": [hx(cells[i]) for i in half]},
        {"operation": "verify_cell_kzg_proof_batch", "commitments": [hx(commitments[1])] * 3,
         "cell_indices": list(picked), "cells": [hx(cells[i]) for i in picked],
         "proofs": [hx(cell_proofs[i]) for i in picked]},
    ]  # fmt: skip


def _inputs(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "operation"}


def _decoded(value: Any) -> Any:
    if isinstance(value, str):
        return bytes.fromhex(value.removeprefix("0x"))
    return [_decoded(v) if isinstance(v, str) else v for v in value]


def batch_input_digests(operations: list[dict[str, Any]], indices: list[int]) -> dict[str, str]:
    """What the entry's input_digests must be: every input of the operations that ran,
    named ``operations[i].<field>``."""
    return {
        f"operations[{i}].{name}": input_sha256(_decoded(value))
        for i in indices
        for name, value in _inputs(operations[i]).items()
    }


async def _vkeys(gw: Gateway) -> list[str]:
    response, listing = await gw.request("GET", "/v1/log/keys", role=None)
    assert response.status == 200, listing
    return vkeys_of(listing)


def _without_receipt(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "receipt"}


@pytest.mark.parametrize("engine", ["ckzg", "blspy"])
async def test_results_equal_the_single_routes(start_gateway: StartGateway, engine: str) -> None:
    gw = await start_gateway(engine={"name": engine})
    operations = _every_operation()
    singles = []
    for item in operations:
        response, answer = await gw.post(PATHS[item["operation"]], _inputs(item))
        assert response.status == 200, answer
        singles.append(answer)

    response, answer = await gw.post(BATCH, {"operations": operations})

    assert response.status == 200, answer
    assert set(answer) == {"results", "receipt"}
    assert answer["results"] == [_without_receipt(single) for single in singles]
    for result in answer["results"]:
        if "commitment" in result:
            assert result["versioned_hash"] == versioned_hash(result["commitment"])
    # One request, one entry: it directly follows the last single call's.
    request_id = response.headers["X-Request-ID"]
    inputs = batch_input_digests(operations, list(range(len(operations))))
    entry = check_receipt(answer, request_id, await _vkeys(gw), inputs)["entry"]
    assert entry["action"] == "kzg_batch" and entry["path"] == BATCH
    assert entry["detail"]["operations"] == [
        {"operation": item["operation"], "result_digest": body_digest(result)}
        for item, result in zip(operations, answer["results"], strict=True)
    ]
    [record] = await gw.audit_records(request_id)
    assert stored_entry(record) == entry
    previous = json.loads(singles[-1]["receipt"]["entry"])
    assert entry["seq"] == previous["seq"] + 1


async def test_the_operations_run_in_parallel_across_the_workers(
    start_gateway: StartGateway,
) -> None:
    # The speed-up itself is timed by bench/batch_speedup.py; here, what makes it: every
    # operation is admitted at once, both workers busy and the rest queued behind them.
    gw = await start_gateway(pool={"workers": 2})
    pool = gw.app[KZG_POOL]
    operations = [
        {"operation": "blob_to_kzg_commitment", "blob": hx(make_blob(110 + n))} for n in range(4)
    ]
    request = asyncio.create_task(gw.post(BATCH, {"operations": operations}))
    busy = queued = 0
    while not request.done():
        busy, queued = max(busy, pool.busy), max(queued, pool.queue_depth)
        await asyncio.sleep(0.002)
    response, answer = await request
    assert response.status == 200, answer
    assert (busy, queued) == (2, 2)
    assert len({r["commitment"] for r in answer["results"]}) == 4


async def test_a_rollups_six_blobs_are_one_request(sqlite_gateway: Gateway) -> None:
    """Commitment, then cells and proofs with the commitment, for each of 6 blobs."""
    gw = sqlite_gateway
    eng = reference_engine()
    blobs = [make_blob(60 + n) for n in range(6)]
    operations = [
        {"operation": operation, "blob": hx(blob)}
        for blob in blobs
        for operation in ("blob_to_kzg_commitment", "compute_cells_and_kzg_proofs")
    ]

    response, answer = await gw.post(BATCH, {"operations": operations})

    assert response.status == 200, answer
    results = answer["results"]
    assert len(results) == 12
    for n, blob in enumerate(blobs):
        commitment, cells = results[2 * n], results[2 * n + 1]
        expected = hx(eng.blob_to_kzg_commitment(blob))
        assert commitment == {"commitment": expected, "versioned_hash": versioned_hash(expected)}
        assert (cells["commitment"], cells["versioned_hash"]) == (
            expected,
            commitment["versioned_hash"],
        )
        expected_cells, expected_proofs = eng.compute_cells_and_kzg_proofs(blob)
        assert cells["cells"] == [hx(c) for c in expected_cells]
        assert cells["proofs"] == [hx(p) for p in expected_proofs]
    inputs = batch_input_digests(operations, list(range(12)))
    check_receipt(answer, response.headers["X-Request-ID"], await _vkeys(gw), inputs)


async def test_a_bad_operation_gets_its_own_error(sqlite_gateway: Gateway) -> None:
    gw = sqlite_gateway
    eng = reference_engine()
    blob = make_blob(70)
    commitment = eng.blob_to_kzg_commitment(blob)
    proof, y = eng.compute_kzg_proof(blob, Z)
    verify = {"commitment": hx(commitment), "z": hx(Z), "y": hx(y), "proof": hx(proof)}
    operations: list[Any] = [
        {"operation": "blob_to_kzg_commitment", "blob": hx(blob)},
        {"operation": "make_coffee", "blob": hx(blob)},
        {"operation": "blob_to_kzg_commitment", "blob": "0x1234"},
        {"operation": "compute_kzg_proof", "blob": hx(blob)},
        {"operation": "verify_kzg_proof", **verify, "extra": 1},
        "blob_to_kzg_commitment",
        {"operation": "blob_to_kzg_commitment", "blob": hx(b"\xff" * 131072)},
        {"blob": hx(blob)},
        {"operation": "verify_kzg_proof", **verify},
    ]

    response, answer = await gw.post(BATCH, {"operations": operations})

    assert response.status == 200, answer
    results = answer["results"]
    expected = hx(commitment)
    assert results[0] == {"commitment": expected, "versioned_hash": versioned_hash(expected)}
    assert results[8] == {"valid": True}
    errors = {i: r["error"] for i, r in enumerate(results) if "error" in r}
    assert all(set(e) == {"code", "message"} for e in errors.values())
    assert {i: e["code"] for i, e in errors.items()} == {
        1: "unknown_operation",
        2: "invalid_blob",
        3: "missing_field",
        4: "unknown_field",
        5: "invalid_operation",
        6: "invalid_blob",
        7: "missing_field",
    }
    messages = {i: e["message"] for i, e in errors.items()}
    assert messages[1].startswith("operations[1].operation must be one of ")
    assert "verify_cell_kzg_proof_batch" in messages[1] and "make_coffee" not in messages[1]
    assert messages[2] == (
        "operations[2].blob must be 131072 bytes (262146 characters with 0x), got 6 characters"
    )
    assert messages[3] == "operations[3].z is required"
    assert messages[4] == "operations[4].extra is not a field of verify_kzg_proof"
    assert messages[5] == "operations[5] must be a JSON object"
    # Refused by the engine itself, which names the field element.
    assert messages[6].startswith("operations[6].blob: field element 0 ")
    assert messages[7] == "operations[7].operation is required"

    # The inputs of the operations that reached an engine are in the entry.
    inputs = batch_input_digests(operations, [0, 6, 8])
    entry = check_receipt(answer, response.headers["X-Request-ID"], await _vkeys(gw), inputs)[
        "entry"
    ]
    assert entry["detail"]["operations"] == [
        {"operation": "blob_to_kzg_commitment", "result_digest": body_digest(results[0])},
        {"operation": None, "error": "unknown_operation"},
        {"operation": "blob_to_kzg_commitment", "error": "invalid_blob"},
        {"operation": "compute_kzg_proof", "error": "missing_field"},
        {"operation": "verify_kzg_proof", "error": "unknown_field"},
        {"operation": None, "error": "invalid_operation"},
        {"operation": "blob_to_kzg_commitment", "error": "invalid_blob"},
        {"operation": None, "error": "missing_field"},
        {"operation": "verify_kzg_proof", "result_digest": body_digest(results[8])},
    ]


async def test_a_body_that_is_no_batch_is_refused_whole(start_gateway: StartGateway) -> None:
    gw = await start_gateway(server={"max_batch_operations": 3})
    item = {"operation": "blob_to_kzg_commitment", "blob": hx(make_blob(80))}
    json_type = {"Content-Type": "application/json"}
    cases: list[tuple[bytes, dict[str, str], int, str, str]] = [
        (b"{not json", json_type, 400, "invalid_json", "the body is not valid JSON"),
        (b"[]", json_type, 400, "invalid_json", "the body must be a JSON object"),
        (b"{}", json_type, 400, "missing_field", "operations is required"),
        (b'{"operations": {}}', json_type, 400, "invalid_operations",
         "operations must be a non-empty list"),
        (b'{"operations": []}', json_type, 400, "invalid_operations",
         "operations must be a non-empty list"),
        (json.dumps({"operations": [item] * 4}).encode(), json_type, 400, "invalid_operations",
         "operations has 4 items, at most 3 allowed"),
        (json.dumps({"operations": [item], "priority": 1}).encode(), json_type, 400,
         "unknown_field", "priority is not a field of a batch"),
        (json.dumps({"operations": [item]}).encode(), {"Content-Type": "text/plain"}, 415,
         "unsupported_media_type", "Content-Type must be application/json"),
    ]  # fmt: skip
    for body, headers, status, code, message in cases:
        response, answer = await gw.request("POST", BATCH, data=body, headers=headers)
        assert response.status == status, (body[:40], answer)
        assert answer["error"]["code"] == code and answer["error"]["message"] == message
        assert "results" not in answer and "receipt" not in answer
        [record] = await gw.audit_records(response.headers["X-Request-ID"])
        assert (record["action"], record["http_status"]) == ("kzg_batch", status)
        assert record["result_digest"] is None
    # Three operations are within the limit.
    response, answer = await gw.post(BATCH, {"operations": [item] * 3})
    assert response.status == 200 and len(answer["results"]) == 3


async def test_a_saturated_pool_refuses_the_whole_batch(start_gateway: StartGateway) -> None:
    gw = await start_gateway(pool={"workers": 1, "max_queue": 2, "retry_after_seconds": 3})
    pool = gw.app[KZG_POOL]
    eng = reference_engine()
    blob = make_blob(90)
    commitment = eng.blob_to_kzg_commitment(blob)
    proof, y = eng.compute_kzg_proof(blob, Z)
    verify = {"operation": "verify_kzg_proof", "commitment": hx(commitment), "z": hx(Z),
              "y": hx(y), "proof": hx(proof)}  # fmt: skip
    busy = asyncio.create_task(pool.call(hold_worker, 1.5))
    while pool.busy < 1:
        await asyncio.sleep(0.01)

    # The one worker is busy and two calls may queue: three cannot all be admitted.
    response, answer = await gw.post(BATCH, {"operations": [verify] * 3})

    assert response.status == 503, answer
    assert answer["error"]["code"] == "overloaded" and response.headers["Retry-After"] == "3"
    assert "results" not in answer
    [record] = await gw.audit_records(response.headers["X-Request-ID"])
    assert (record["http_status"], record["outcome"]) == (503, "unavailable")
    assert pool.queue_depth == 0, "a refused batch holds no place in the queue"
    # Two fit in the queue: they wait for the worker and are answered.
    response, answer = await gw.post(BATCH, {"operations": [verify] * 2})
    assert response.status == 200, answer
    assert answer["results"] == [{"valid": True}] * 2
    assert await busy == "ckzg"
    assert pool.free_slots == 3


async def test_the_batch_route_is_documented(start_gateway: StartGateway) -> None:
    gw = await start_gateway(server={"max_batch_operations": 5})
    response, document = await gw.request("GET", "/openapi.json", role=None)
    assert response.status == 200
    operation = document["paths"][BATCH]["post"]
    assert operation["operationId"] == "kzg_batch"
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    items = schema["properties"]["operations"]
    assert (items["minItems"], items["maxItems"]) == (1, 5)
    names = [v["properties"]["operation"]["const"] for v in items["items"]["oneOf"]]
    assert sorted(names) == sorted(PATHS)
    commitment = document["paths"][PATHS["blob_to_kzg_commitment"]]["post"]["responses"]["200"]
    properties = commitment["content"]["application/json"]["schema"]["properties"]
    assert {"commitment", "versioned_hash", "receipt"} <= set(properties)


def test_engine_refusals_are_placed_by_their_argument_not_their_text() -> None:
    named = KZGError("field element 0 is not canonical (>= BLS_MODULUS)", "blobs", 3)
    assert _code_for(named) == "invalid_blobs"
    assert _item_message("operations[2]", named) == (
        "operations[2].blobs[3]: field element 0 is not canonical (>= BLS_MODULUS)"
    )
    # A reason that merely begins like a field names none: the engine said no argument.
    unnamed = KZGError("blob: rejected by c-kzg-4844 (bad)")
    assert _code_for(unnamed) == "invalid_input"
    assert (
        _item_message("operations[2]", unnamed)
        == "operations[2]: blob: rejected by c-kzg-4844 (bad)"
    )
    # An argument that is no field of any request (the engine choice) names none either.
    engine = KZGError("unknown engine 'x'", "engine")
    assert _code_for(engine) == "invalid_input"
    assert _item_message("operations[0]", engine) == "operations[0]: engine: unknown engine 'x'"
