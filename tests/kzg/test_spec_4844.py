"""Every official EIP-4844 KZG vector, on both engines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kzg import Engine, KZGError
from kzg.eip4844 import compute_challenge
from kzg.field import bls_field_to_bytes
from tests.kzg.vectors import BadHex, Case, cases, decode, ids


def _run(case: Case, call: Callable[[dict[str, Any]], Any]) -> Any:
    """Return the call's result, or None when the engine refused the input."""
    try:
        args = {k: decode(v) for k, v in case.input.items()}
    except BadHex:
        assert case.must_fail, f"{case.name}: malformed hex in a case that should succeed"
        return None
    if case.must_fail:
        with pytest.raises(KZGError):
            call(args)
        return None
    return call(args)


def _expected(case: Case) -> Any:
    return decode(case.output)


BLOB_TO_COMMITMENT = cases("blob_to_kzg_commitment")
COMPUTE_KZG_PROOF = cases("compute_kzg_proof")
COMPUTE_BLOB_PROOF = cases("compute_blob_kzg_proof")
VERIFY_KZG_PROOF = cases("verify_kzg_proof")
VERIFY_BLOB_PROOF = cases("verify_blob_kzg_proof")
VERIFY_BLOB_BATCH = cases("verify_blob_kzg_proof_batch")
COMPUTE_CHALLENGE = cases("compute_challenge")


def test_every_function_has_its_vectors(spec_tests_dir: Path) -> None:
    counts = {
        "blob_to_kzg_commitment": len(BLOB_TO_COMMITMENT),
        "compute_kzg_proof": len(COMPUTE_KZG_PROOF),
        "compute_blob_kzg_proof": len(COMPUTE_BLOB_PROOF),
        "verify_kzg_proof": len(VERIFY_KZG_PROOF),
        "verify_blob_kzg_proof": len(VERIFY_BLOB_PROOF),
        "verify_blob_kzg_proof_batch": len(VERIFY_BLOB_BATCH),
        "compute_challenge": len(COMPUTE_CHALLENGE),
    }
    assert all(counts.values()), counts
    assert sum(counts.values()) == 262, counts


@pytest.mark.parametrize("case", BLOB_TO_COMMITMENT, ids=ids(BLOB_TO_COMMITMENT))
def test_blob_to_kzg_commitment(engine: Engine, case: Case) -> None:
    result = _run(case, lambda a: engine.blob_to_kzg_commitment(a["blob"]))
    if not case.must_fail:
        assert result == _expected(case)


@pytest.mark.parametrize("case", COMPUTE_KZG_PROOF, ids=ids(COMPUTE_KZG_PROOF))
def test_compute_kzg_proof(engine: Engine, case: Case) -> None:
    result = _run(case, lambda a: engine.compute_kzg_proof(a["blob"], a["z"]))
    if not case.must_fail:
        assert list(result) == _expected(case)


@pytest.mark.parametrize("case", COMPUTE_BLOB_PROOF, ids=ids(COMPUTE_BLOB_PROOF))
def test_compute_blob_kzg_proof(engine: Engine, case: Case) -> None:
    result = _run(case, lambda a: engine.compute_blob_kzg_proof(a["blob"], a["commitment"]))
    if not case.must_fail:
        assert result == _expected(case)


@pytest.mark.parametrize("case", VERIFY_KZG_PROOF, ids=ids(VERIFY_KZG_PROOF))
def test_verify_kzg_proof(engine: Engine, case: Case) -> None:
    result = _run(
        case, lambda a: engine.verify_kzg_proof(a["commitment"], a["z"], a["y"], a["proof"])
    )
    if not case.must_fail:
        assert result is case.output


@pytest.mark.parametrize("case", VERIFY_BLOB_PROOF, ids=ids(VERIFY_BLOB_PROOF))
def test_verify_blob_kzg_proof(engine: Engine, case: Case) -> None:
    result = _run(
        case, lambda a: engine.verify_blob_kzg_proof(a["blob"], a["commitment"], a["proof"])
    )
    if not case.must_fail:
        assert result is case.output


@pytest.mark.parametrize("case", VERIFY_BLOB_BATCH, ids=ids(VERIFY_BLOB_BATCH))
def test_verify_blob_kzg_proof_batch(engine: Engine, case: Case) -> None:
    result = _run(
        case,
        lambda a: engine.verify_blob_kzg_proof_batch(a["blobs"], a["commitments"], a["proofs"]),
    )
    if not case.must_fail:
        assert result is case.output


@pytest.mark.parametrize("case", COMPUTE_CHALLENGE, ids=ids(COMPUTE_CHALLENGE))
def test_compute_challenge(case: Case) -> None:
    args = {k: decode(v) for k, v in case.input.items()}
    assert bls_field_to_bytes(compute_challenge(args["blob"], args["commitment"])) == _expected(
        case
    )
