"""Every KZG route's happy path over real HTTPS, compared with the engine in-process,
with its receipt verified from the published key and its one audit record."""

from __future__ import annotations

from typing import Any

import pytest

from tests.gateway.conftest import Gateway, StartGateway
from tests.gateway.helpers import (
    hx,
    input_digest,
    make_blob,
    output_digest,
    receipt_output,
    reference_engine,
    verify_receipt,
)

Z = bytes(31) + b"\x05"


def _cases() -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(operation, path, request body, expected response without receipt)."""
    eng = reference_engine()
    blobs = [make_blob(n) for n in range(3)]
    commitments = [eng.blob_to_kzg_commitment(b) for b in blobs]
    proofs = [eng.compute_blob_kzg_proof(b, c) for b, c in zip(blobs, commitments, strict=True)]
    proof, y = eng.compute_kzg_proof(blobs[0], Z)
    cells, cell_proofs = eng.compute_cells_and_kzg_proofs(blobs[0])
    half = list(range(0, 128, 2))
    return [
        ("blob_to_kzg_commitment", "/v1/kzg/blob-to-commitment", {"blob": hx(blobs[0])},
         {"commitment": hx(commitments[0])}),
        ("compute_kzg_proof", "/v1/kzg/compute-proof", {"blob": hx(blobs[0]), "z": hx(Z)},
         {"proof": hx(proof), "y": hx(y)}),
        ("compute_blob_kzg_proof", "/v1/kzg/compute-blob-proof",
         {"blob": hx(blobs[1]), "commitment": hx(commitments[1])}, {"proof": hx(proofs[1])}),
        ("verify_kzg_proof", "/v1/kzg/verify-proof",
         {"commitment": hx(commitments[0]), "z": hx(Z), "y": hx(y), "proof": hx(proof)}, {"valid": True}),
        ("verify_blob_kzg_proof", "/v1/kzg/verify-blob-proof",
         {"blob": hx(blobs[0]), "commitment": hx(commitments[0]), "proof": hx(proofs[1])}, {"valid": False}),
        ("verify_blob_kzg_proof_batch", "/v1/kzg/verify-blob-proof-batch",
         {"blobs": [hx(b) for b in blobs], "commitments": [hx(c) for c in commitments],
          "proofs": [hx(p) for p in proofs]}, {"valid": True}),
        ("compute_cells_and_kzg_proofs", "/v1/kzg/compute-cells-and-proofs", {"blob": hx(blobs[0])},
         {"cells": [hx(c) for c in cells], "proofs": [hx(p) for p in cell_proofs]}),
        ("recover_cells_and_kzg_proofs", "/v1/kzg/recover-cells-and-proofs",
         {"cell_indices": half, "cells": [hx(cells[i]) for i in half]},
         {"cells": [hx(c) for c in cells], "proofs": [hx(p) for p in cell_proofs]}),
        ("verify_cell_kzg_proof_batch", "/v1/kzg/verify-cell-proof-batch",
         {"commitments": [hx(commitments[0])] * 3, "cell_indices": [0, 7, 127],
          "cells": [hx(cells[i]) for i in (0, 7, 127)], "proofs": [hx(cell_proofs[i]) for i in (0, 7, 127)]},
         {"valid": True}),
    ]  # fmt: skip


CASES = _cases()


async def _check_case(gw: Gateway, case: tuple[str, str, dict[str, Any], dict[str, Any]]) -> None:
    operation, path, body, expected = case
    response, answer = await gw.post(path, body)
    assert response.status == 200, answer
    request_id = response.headers["X-Request-ID"]
    assert {k: v for k, v in answer.items() if k != "receipt"} == expected

    _, keys = await gw.request("GET", "/v1/keys/receipts", role=None)
    message = verify_receipt(answer["receipt"], keys["keys"], operation, request_id)
    assert message["output"] == receipt_output(answer)
    first_field = next(iter(body))
    value = body[first_field]
    raw = (
        [bytes.fromhex(v[2:]) for v in value]
        if isinstance(value, list) and isinstance(value[0], str)
        else value
    )
    if isinstance(raw, str):
        raw = bytes.fromhex(raw[2:])
    assert message["input_sha256"][first_field] == input_digest(raw)

    [record] = await gw.audit_records(request_id)
    assert record["seq"] == message["audit_seq"]
    assert record["action"] == operation and record["outcome"] == "success"
    assert record["result_digest"] == output_digest(message["output"])
    assert record["actor"] and record["role"] == "client"
    assert record["tls_version"] == "TLSv1.3"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_route_happy_path_sqlite(sqlite_gateway: Gateway, case: Any) -> None:
    await _check_case(sqlite_gateway, case)


@pytest.mark.postgres
async def test_every_route_on_postgresql(start_gateway: StartGateway, pg_database: Any) -> None:
    gw = await start_gateway(pg_database)
    for case in CASES:
        await _check_case(gw, case)


async def test_blspy_engine_serves_every_route(start_gateway: StartGateway) -> None:
    gw = await start_gateway(engine={"name": "blspy"})
    for case in CASES:
        await _check_case(gw, case)


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/v1/kzg/blob-to-commitment", "blob_to_kzg_commitment"),
        ("/v1/kzg/compute-cells-and-proofs", "compute_cells_and_kzg_proofs"),
    ],
)
async def test_raw_octet_stream_blob(sqlite_gateway: Gateway, path: str, operation: str) -> None:
    blob = make_blob(9)
    response, raw_answer = await sqlite_gateway.request(
        "POST", path, data=blob, headers={"Content-Type": "application/octet-stream"}
    )
    assert response.status == 200, raw_answer
    _, json_answer = await sqlite_gateway.post(path, {"blob": hx(blob)})
    strip = lambda a: {k: v for k, v in a.items() if k != "receipt"}  # noqa: E731
    assert strip(raw_answer) == strip(json_answer)
    message = verify_receipt(
        raw_answer["receipt"],
        (await sqlite_gateway.request("GET", "/v1/keys/receipts", role=None))[1]["keys"],
        operation,
        response.headers["X-Request-ID"],
    )
    assert message["input_sha256"] == {"blob": input_digest(blob)}


async def test_receipts_after_rotation_verify_with_retired_key(sqlite_gateway: Gateway) -> None:
    from gateway.appkeys import DB_ENGINE, MASTER_KEY, RECEIPT_SIGNER
    from gateway.receipts import rotate_receipt_key

    gw = sqlite_gateway
    case = CASES[3]
    before, old = await gw.post(case[1], case[2])
    await rotate_receipt_key(gw.app[DB_ENGINE], gw.app[MASTER_KEY])
    assert await gw.app[RECEIPT_SIGNER].refresh()
    after, new = await gw.post(case[1], case[2])
    assert old["receipt"]["key_id"] != new["receipt"]["key_id"]
    _, listing = await gw.request("GET", "/v1/keys/receipts", role=None)
    statuses = {k["key_id"]: k["status"] for k in listing["keys"]}
    assert statuses == {old["receipt"]["key_id"]: "retired", new["receipt"]["key_id"]: "current"}
    retired = next(k for k in listing["keys"] if k["status"] == "retired")
    assert retired["not_after"] is not None
    verify_receipt(old["receipt"], listing["keys"], case[0], before.headers["X-Request-ID"])
    verify_receipt(new["receipt"], listing["keys"], case[0], after.headers["X-Request-ID"])
