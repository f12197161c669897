"""Every KZG route's happy path over real HTTPS, compared with the engine in-process,
with its receipt (the logged entry and its inclusion proof) verified by the reference
verifier against the published log keys, and its one audit record; receipts that were
tampered with fail that verifier."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from tests.audit import reference_tlog
from tests.gateway.conftest import Gateway, StartGateway
from tests.gateway.helpers import (
    ORIGIN,
    check_receipt,
    foreign_vkey,
    hx,
    input_digests,
    input_sha256,
    make_blob,
    reference_engine,
    stored_entry,
    vkeys_of,
)

Z = bytes(31) + b"\x05"


def _commitment(commitment: bytes) -> dict[str, str]:
    """An answer carrying a commitment carries its EIP-4844 versioned hash too: the
    version byte 0x01, then SHA-256 of the commitment without its first byte."""
    versioned = b"\x01" + hashlib.sha256(commitment).digest()[1:]
    return {"commitment": hx(commitment), "versioned_hash": hx(versioned)}


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
         _commitment(commitments[0])),
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
         {"cells": [hx(c) for c in cells], "proofs": [hx(p) for p in cell_proofs],
          **_commitment(commitments[0])}),
        ("recover_cells_and_kzg_proofs", "/v1/kzg/recover-cells-and-proofs",
         {"cell_indices": half, "cells": [hx(cells[i]) for i in half]},
         {"cells": [hx(c) for c in cells], "proofs": [hx(p) for p in cell_proofs]}),
        ("verify_cell_kzg_proof_batch", "/v1/kzg/verify-cell-proof-batch",
         {"commitments": [hx(commitments[0])] * 3, "cell_indices": [0, 7, 127],
          "cells": [hx(cells[i]) for i in (0, 7, 127)], "proofs": [hx(cell_proofs[i]) for i in (0, 7, 127)]},
         {"valid": True}),
    ]  # fmt: skip


CASES = _cases()


async def _vkeys(gw: Gateway) -> list[str]:
    response, listing = await gw.request("GET", "/v1/log/keys", role=None)
    assert response.status == 200, listing
    return vkeys_of(listing)


async def _check_case(
    gw: Gateway, case: tuple[str, str, dict[str, Any], dict[str, Any]]
) -> dict[str, Any]:
    operation, path, body, expected = case
    response, answer = await gw.post(path, body)
    assert response.status == 200, answer
    request_id = response.headers["X-Request-ID"]
    assert {k: v for k, v in answer.items() if k != "receipt"} == expected

    result = check_receipt(answer, request_id, await _vkeys(gw), input_digests(body))
    entry = result["entry"]
    assert entry["action"] == operation and entry["path"] == path
    assert set(entry["input_digests"]) == set(body)

    # The receipt's entry is the very record the log holds for this request.
    [record] = await gw.audit_records(request_id)
    assert stored_entry(record) == entry
    assert record["action"] == operation and record["outcome"] == "success"
    assert record["actor"] and record["role"] == "client"
    assert record["tls_version"] == "TLSv1.3"
    return result


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
async def test_route_happy_path_sqlite(sqlite_gateway: Gateway, case: Any) -> None:
    await _check_case(sqlite_gateway, case)


@pytest.mark.postgres
async def test_every_route_on_postgresql(start_gateway: StartGateway, pg_database: Any) -> None:
    gw = await start_gateway(pg_database)
    indices = [(await _check_case(gw, case))["index"] for case in CASES]
    assert indices == sorted(set(indices))


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
    vkeys = await _vkeys(sqlite_gateway)
    result = check_receipt(
        raw_answer, response.headers["X-Request-ID"], vkeys, {"blob": input_sha256(blob)}
    )
    assert result["entry"]["action"] == operation
    # The same inputs and result, logged twice: two entries, the same digests.
    other = reference_tlog.verify_receipt(json_answer["receipt"], vkeys, ORIGIN)["entry"]
    assert other["seq"] != result["entry"]["seq"]
    assert (other["input_digests"], other["result_digest"]) == (
        result["entry"]["input_digests"],
        result["entry"]["result_digest"],
    )


async def _consistent(gw: Gateway, old: dict[str, Any], new: dict[str, Any]) -> None:
    """The log proves that the tree of receipt ``old`` is a prefix of that of ``new``."""
    response, proof = await gw.request(
        "GET", f"/v1/log/proof/consistency?old={old['size']}&size={new['size']}"
    )
    assert response.status == 200, proof
    hashes = [base64.b64decode(h) for h in proof["hashes"]]
    assert reference_tlog.verify_consistency(
        old["size"], new["size"], old["root"], new["root"], hashes
    )


async def test_receipts_after_rotation_verify_with_retired_key(sqlite_gateway: Gateway) -> None:
    from gateway.appkeys import DB_ENGINE, LOG_SIGNER, MASTER_KEY
    from gateway.receipts import rotate_log_key

    gw = sqlite_gateway
    case = CASES[3]
    before, old = await gw.post(case[1], case[2])
    [old_vkey] = await _vkeys(gw)
    rotated = await rotate_log_key(gw.app[DB_ENGINE], gw.app[MASTER_KEY], ORIGIN)
    assert await gw.app[LOG_SIGNER].refresh()
    after, new = await gw.post(case[1], case[2])
    _, listing = await gw.request("GET", "/v1/log/keys", role=None)
    vkeys = vkeys_of(listing)
    statuses = {k["vkey"]: k["status"] for k in listing["keys"]}
    assert statuses == {old_vkey: "retired", rotated.vkey: "current"}
    retired = next(k for k in listing["keys"] if k["status"] == "retired")
    assert retired["not_after"] is not None
    assert {k["key_id"] for k in listing["keys"]} == {retired["key_id"], rotated.key_id}

    first = check_receipt(old, before.headers["X-Request-ID"], vkeys)
    second = check_receipt(new, after.headers["X-Request-ID"], vkeys)
    # Each checkpoint is signed by the key current when it was made, and by no other.
    check_receipt(old, before.headers["X-Request-ID"], [old_vkey])
    check_receipt(new, after.headers["X-Request-ID"], [rotated.vkey])
    with pytest.raises(AssertionError, match="no verified signature"):
        reference_tlog.verify_receipt(old["receipt"], [rotated.vkey])
    with pytest.raises(AssertionError, match="no verified signature"):
        reference_tlog.verify_receipt(new["receipt"], [old_vkey])
    # The rotation did not fork the log: the later tree extends the earlier one.
    assert first["size"] < second["size"]
    await _consistent(gw, first, second)


def _proof_lines(receipt: dict[str, Any]) -> list[str]:
    return receipt["proof"].split("\n")


def _with_proof(receipt: dict[str, Any], lines: list[str]) -> dict[str, Any]:
    return {**receipt, "proof": "\n".join(lines)}


def _tampered(receipt: dict[str, Any], other: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """Receipts that must be refused, by name, each with what the refusal says."""
    entry = receipt["entry"]
    lines = _proof_lines(receipt)
    assert lines[0] == "c2sp.org/tlog-proof@v1" and lines[1].startswith("index ")
    index = int(lines[1].removeprefix("index "))
    blank = lines.index("")
    hashes = lines[2:blank]
    assert hashes, "the tree holds more than this entry: its proof has hashes"
    size = int(lines[blank + 2])
    wrong_index = index - 1 if index > 0 else index + 1
    not_included = "is not included"
    return {
        "altered entry (result digest)": (
            {**receipt, "entry": entry.replace('"result_digest":"', '"result_digest":"0')},
            not_included,
        ),
        "altered entry (request id)": (
            {**receipt, "entry": entry.replace('"request_id":"', '"request_id":"x')},
            not_included,
        ),
        "entry re-serialised with spaces": (
            {**receipt, "entry": entry.replace(",", ", ", 1)},
            not_included,
        ),
        "another answer's entry": ({**receipt, "entry": other["entry"]}, not_included),
        "wrong index": (
            _with_proof(receipt, [lines[0], f"index {wrong_index}", *lines[2:]]),
            not_included,
        ),
        "index beyond the tree": (
            _with_proof(receipt, [lines[0], f"index {size}", *lines[2:]]),
            "not below the tree size",
        ),
        "truncated proof (a hash dropped)": (
            _with_proof(receipt, [*lines[:2], *hashes[:-1], *lines[blank:]]),
            not_included,
        ),
        "truncated proof (a hash cut short)": (
            _with_proof(receipt, [*lines[:2], *hashes[:-1], hashes[-1][:20], *lines[blank:]]),
            "proof hash",
        ),
        "truncated proof (no checkpoint signature)": (
            _with_proof(receipt, lines[: blank + 4]),
            "signature",
        ),
        "truncated proof (no checkpoint)": (_with_proof(receipt, lines[:blank]), "blank line"),
        "checkpoint size altered": (
            _with_proof(receipt, [*lines[: blank + 2], str(size + 1), *lines[blank + 3 :]]),
            "does not verify",
        ),
    }


async def test_tampered_receipts_fail_the_reference_verifier(gateway: Gateway) -> None:
    case = CASES[3]
    responses = [await gateway.post(case[1], case[2]) for _ in range(3)]
    vkeys = await _vkeys(gateway)
    for response, answer in responses:
        assert response.status == 200, answer
        check_receipt(answer, response.headers["X-Request-ID"], vkeys, input_digests(case[2]))
    # The last answer's entry is not alone in its tree: its proof has hashes.
    _, (second, other), (third, answer) = responses
    receipt = answer["receipt"]
    for name, (bad, says) in _tampered(receipt, other["receipt"]).items():
        with pytest.raises(AssertionError, match=says):
            reference_tlog.verify_receipt(bad, vkeys, ORIGIN)
        assert bad != receipt, name
    # A key that is not the log's, alone or named as the log: no signature verifies.
    with pytest.raises(AssertionError, match="no verified signature"):
        reference_tlog.verify_receipt(receipt, [foreign_vkey()], ORIGIN)
    with pytest.raises(AssertionError, match="no verified signature"):
        reference_tlog.verify_receipt(receipt, [foreign_vkey("another.example/log")], ORIGIN)
    # The log's own key under another origin is not the log the client pinned.
    with pytest.raises(AssertionError, match="origin"):
        reference_tlog.verify_receipt(receipt, vkeys, "another.example/log")
    # A valid receipt moved onto another answer names another request and result.
    moved = {**other, "receipt": receipt}
    with pytest.raises(AssertionError):
        check_receipt(moved, second.headers["X-Request-ID"], vkeys)
    altered_body = {**answer, "valid": not answer["valid"]}
    with pytest.raises(AssertionError):
        check_receipt(altered_body, third.headers["X-Request-ID"], vkeys)
