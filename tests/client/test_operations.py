"""Every KZG operation through the SDK against a real gateway: the official consensus-spec
vectors give the inputs and the answers, each result's receipt is verified before it is
returned, invalid inputs raise ``InvalidInput`` naming the request, and a batch is one
request, one receipt, with per-item errors."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

from gateway.client import (
    AsyncGatewayClient,
    BatchItemError,
    CellsResult,
    CommitmentResult,
    InvalidInput,
    Operation,
    Result,
    VerifyResult,
    verify_receipt,
)
from kzg import Engine
from tests.client.conftest import LiveGateway, make_blob
from tests.kzg.vectors import cases, decode

OPERATIONS = (
    "blob_to_kzg_commitment",
    "compute_kzg_proof",
    "compute_blob_kzg_proof",
    "verify_kzg_proof",
    "verify_blob_kzg_proof",
    "verify_blob_kzg_proof_batch",
    "compute_cells_and_kzg_proofs",
    "recover_cells_and_kzg_proofs",
    "verify_cell_kzg_proof_batch",
)


def _cases(spec_tests_dir: Path, function: str) -> list[tuple[str, dict[str, Any], Any]]:
    """(case name, inputs in the engine's argument order, expected output or None)."""
    assert spec_tests_dir.is_dir()
    found = [
        (c.name, {k: decode(v) for k, v in c.input.items()}, decode(c.output))
        for c in cases(function)
    ]
    assert found, f"no vectors for {function}"
    return found


def versioned_hash(commitment: bytes) -> bytes:
    """EIP-4844 kzg_to_versioned_hash, written here from the EIP's text."""
    return bytes([1]) + hashlib.sha256(commitment).digest()[1:]


def _values(function: str, result: Result) -> Any:
    """The result's fields in the vectors' output shape."""
    match function:
        case "blob_to_kzg_commitment":
            return result.commitment  # type: ignore[attr-defined]
        case "compute_kzg_proof":
            return [result.proof, result.y]  # type: ignore[attr-defined]
        case "compute_blob_kzg_proof":
            return result.proof  # type: ignore[attr-defined]
        case "compute_cells_and_kzg_proofs" | "recover_cells_and_kzg_proofs":
            return [list(result.cells), list(result.proofs)]  # type: ignore[attr-defined]
    return result.valid  # type: ignore[attr-defined]


def _check_receipt(result: Result, function: str, gateway: LiveGateway) -> None:
    """The receipt was verified by the client; verify it again, independently of the
    client object, and check what its entry records."""
    assert result.verified is not None
    again = verify_receipt(
        result.receipt, gateway.vkeys, answer=result.answer, request_id=result.request_id
    )
    assert again.entry == result.verified.entry
    assert again.action == function and again.entry["outcome"] == "success"
    assert again.seq == again.index + 1


@pytest.mark.parametrize("function", OPERATIONS)
async def test_every_official_vector_through_the_sdk(
    function: str, gateway: LiveGateway, spec_tests_dir: Path
) -> None:
    """Given the consensus-spec vectors of an operation, when each is sent through the
    async client, then valid inputs answer the spec's output with a verified receipt and
    invalid ones raise InvalidInput carrying the request id."""
    cases = _cases(spec_tests_dir, function)
    limit = asyncio.Semaphore(8)

    async def run(client: AsyncGatewayClient, inputs: dict[str, Any]) -> Result | InvalidInput:
        async with limit:
            try:
                return await getattr(client, function)(*inputs.values())
            except InvalidInput as exc:
                return exc

    async with gateway.async_client() as client:
        outcomes = await asyncio.gather(*(run(client, inputs) for _, inputs, _ in cases))
        assert client.latest_checkpoint is not None

    for (name, _, expected), outcome in zip(cases, outcomes, strict=True):
        if expected is None:
            assert isinstance(outcome, InvalidInput), name
            assert outcome.status == 400 and outcome.code.startswith("invalid_"), name
            assert outcome.request_id, name
            continue
        assert isinstance(outcome, Result), (name, outcome)
        assert _values(function, outcome) == expected, name
        _check_receipt(outcome, function, gateway)
        if isinstance(outcome, CommitmentResult) or (
            isinstance(outcome, CellsResult) and function == "compute_cells_and_kzg_proofs"
        ):
            assert outcome.commitment is not None
            assert outcome.versioned_hash == versioned_hash(outcome.commitment), name
            assert outcome.answer["versioned_hash"] == "0x" + outcome.versioned_hash.hex()


def test_an_invalid_input_is_refused_and_audited(gateway: LiveGateway) -> None:
    """Given a blob with a non-canonical field element, the client raises InvalidInput
    naming the field, with the request id the gateway audited the refusal under."""
    blob = b"\xff" * 131072
    with pytest.raises(InvalidInput) as refused:
        gateway.client().compute_kzg_proof(blob, bytes(32))
    error = refused.value
    assert (error.status, error.code) == (400, "invalid_blob")
    assert "blob" in error.message
    [record] = gateway.audit_records(str(error.request_id))
    assert record["outcome"] == "invalid" and record["http_status"] == 400


def test_arguments_that_are_not_bytes_fail_before_sending(gateway: LiveGateway) -> None:
    client = gateway.client()
    with pytest.raises(TypeError, match="blob: expected bytes"):
        client.blob_to_kzg_commitment("0x00")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"cell_indices\[1\]: expected an int"):
        client.recover_cells_and_kzg_proofs([0, True], [bytes(2048)] * 2)


def test_a_rollup_batch_is_one_request_with_one_receipt(
    gateway: LiveGateway, ckzg_engine: Engine
) -> None:
    """Given six blobs, when a rollup operator asks for each one's commitment and cells
    with proofs in one batch, then the results come in order, equal the engine's, and one
    verified receipt covers them all (one audit entry)."""
    blobs = [make_blob(100 + i) for i in range(6)]
    operations = [
        op
        for blob in blobs
        for op in (
            Operation.blob_to_kzg_commitment(blob),
            Operation.compute_cells_and_kzg_proofs(blob),
        )
    ]
    answer = gateway.client().batch(operations)

    assert answer.errors == [] and len(answer.results) == 12
    for i, blob in enumerate(blobs):
        commitment, cells = answer.results[2 * i], answer.results[2 * i + 1]
        assert isinstance(commitment, CommitmentResult) and isinstance(cells, CellsResult)
        expected = ckzg_engine.blob_to_kzg_commitment(blob)
        assert commitment.commitment == cells.commitment == expected
        assert commitment.versioned_hash == versioned_hash(expected)
        expected_cells, expected_proofs = ckzg_engine.compute_cells_and_kzg_proofs(blob)
        assert (list(cells.cells), list(cells.proofs)) == (expected_cells, expected_proofs)
        assert commitment.receipt == answer.receipt and cells.request_id == answer.request_id
    assert answer.verified is not None and answer.verified.action == "kzg_batch"
    assert len(answer.verified.entry["input_digests"]) == 12
    assert len(gateway.audit_records(answer.request_id)) == 1


def test_a_bad_batch_item_gets_its_own_error(gateway: LiveGateway, ckzg_engine: Engine) -> None:
    """A batch with a refused item still answers the others, and the receipt verifies."""
    blob = make_blob(7)
    commitment = ckzg_engine.blob_to_kzg_commitment(blob)
    proof = ckzg_engine.compute_blob_kzg_proof(blob, commitment)
    answer = gateway.client().batch(
        [
            Operation.verify_blob_kzg_proof(blob, commitment, proof),
            Operation.compute_kzg_proof(b"\xff" * 131072, bytes(32)),  # not canonical
            Operation.blob_to_kzg_commitment(bytes(100)),  # not a blob at all
            Operation.compute_blob_kzg_proof(blob, commitment),
        ]
    )
    ok, bad_field, bad_length, proven = answer.results
    assert isinstance(ok, VerifyResult) and ok.valid is True
    assert isinstance(bad_field, BatchItemError) and bad_field.index == 1
    assert bad_field.code == "invalid_blob" and "operations[1]" in bad_field.message
    assert isinstance(bad_length, BatchItemError) and "operations[2]" in bad_length.message
    assert proven.proof == proof  # type: ignore[union-attr]
    assert [e.index for e in answer.errors] == [1, 2]
    assert answer.verified is not None
