"""Every official EIP-7594 KZG vector, on both engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from kzg import Engine
from kzg.eip7594.verify import batch_challenge
from kzg.field import bls_field_to_bytes
from tests.kzg.test_spec_4844 import _run
from tests.kzg.vectors import Case, cases, decode, ids

COMPUTE_CELLS = cases("compute_cells")
CELLS_AND_PROOFS = cases("compute_cells_and_kzg_proofs")
RECOVER = cases("recover_cells_and_kzg_proofs")
VERIFY_BATCH = cases("verify_cell_kzg_proof_batch")
CHALLENGE = cases("compute_verify_cell_kzg_proof_batch_challenge")


def test_every_function_has_its_vectors(spec_tests_dir: Path) -> None:
    counts = [
        len(COMPUTE_CELLS),
        len(CELLS_AND_PROOFS),
        len(RECOVER),
        len(VERIFY_BATCH),
        len(CHALLENGE),
    ]
    assert counts == [11, 11, 18, 32, 10]


@pytest.mark.parametrize("case", COMPUTE_CELLS, ids=ids(COMPUTE_CELLS))
def test_compute_cells(engine: Engine, case: Case) -> None:
    result = _run(case, lambda a: engine.compute_cells(a["blob"]))
    if not case.must_fail:
        assert result == decode(case.output)


@pytest.mark.parametrize("case", CELLS_AND_PROOFS, ids=ids(CELLS_AND_PROOFS))
def test_compute_cells_and_kzg_proofs(engine: Engine, case: Case) -> None:
    result = _run(case, lambda a: engine.compute_cells_and_kzg_proofs(a["blob"]))
    if not case.must_fail:
        assert [list(result[0]), list(result[1])] == decode(case.output)


@pytest.mark.parametrize("case", RECOVER, ids=ids(RECOVER))
def test_recover_cells_and_kzg_proofs(engine: Engine, case: Case) -> None:
    result = _run(
        case, lambda a: engine.recover_cells_and_kzg_proofs(a["cell_indices"], a["cells"])
    )
    if not case.must_fail:
        assert [list(result[0]), list(result[1])] == decode(case.output)


@pytest.mark.parametrize("case", VERIFY_BATCH, ids=ids(VERIFY_BATCH))
def test_verify_cell_kzg_proof_batch(engine: Engine, case: Case) -> None:
    result = _run(
        case,
        lambda a: engine.verify_cell_kzg_proof_batch(
            a["commitments"], a["cell_indices"], a["cells"], a["proofs"]
        ),
    )
    if not case.must_fail:
        assert result is case.output


@pytest.mark.parametrize("case", CHALLENGE, ids=ids(CHALLENGE))
def test_compute_verify_cell_kzg_proof_batch_challenge(case: Case) -> None:
    a = case.input
    evals = [[int(v, 16) for v in cell] for cell in a["cosets_evals"]]
    challenge = batch_challenge(
        decode(a["commitments"]),
        a["commitment_indices"],
        a["cell_indices"],
        evals,
        decode(a["proofs"]),
    )
    assert bls_field_to_bytes(challenge) == decode(case.output)
