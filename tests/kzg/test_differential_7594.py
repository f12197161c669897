"""EIP-7594 on the blspy engine against c-kzg-4844 and against spec-shaped references:
random blobs, random erasures of exactly half, wrong cells and swapped proofs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kzg import Engine, KZGError
from kzg.curve import g1_lincomb
from kzg.eip7594.cells import (
    CELLS_PER_EXT_BLOB,
    FIELD_ELEMENTS_PER_CELL,
    blob_coefficients,
    coset_for_cell,
    evaluate_coefficients,
)
from kzg.eip7594.engine import CellEngine
from kzg.field import BLS_MODULUS
from kzg.setup import read_setup_bytes
from kzg.validate import blob_to_polynomial, cell_to_evals

R = BLS_MODULUS


def _blob(seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randrange(R).to_bytes(32, "big") for _ in range(4096))


@pytest.fixture(scope="module")
def blob_data(blspy_engine: Engine, ckzg_engine: Engine) -> tuple[bytes, list[bytes], list[bytes]]:
    blob = _blob(7594)
    cells, proofs = blspy_engine.compute_cells_and_kzg_proofs(blob)
    assert (cells, proofs) == tuple(ckzg_engine.compute_cells_and_kzg_proofs(blob))
    return blob, cells, proofs


def test_cells_match_horner_evaluation_on_their_cosets(blob_data: tuple) -> None:
    blob, cells, _ = blob_data
    coefficients = blob_coefficients(blob_to_polynomial(blob))
    for index in (0, 1, 77, 127):
        expected = [evaluate_coefficients(coefficients, z) for z in coset_for_cell(index)]
        assert cell_to_evals(cells[index], "cell") == expected


def test_fk20_matches_the_quotient_by_the_coset_vanishing_polynomial(
    blspy_engine: Engine, blob_data: tuple
) -> None:
    blob, _, proofs = blob_data
    f = blob_coefficients(blob_to_polynomial(blob))
    n = FIELD_ELEMENTS_PER_CELL
    monomial = blspy_engine.setup.g1_monomial
    for index in (0, 5, 126):
        c = pow(coset_for_cell(index)[0], n, R)
        # Long division by X^64 − c, the spec's compute_kzg_proof_multi_impl quotient.
        remainder = list(f)
        quotient = [0] * (len(f) - n)
        for top in range(len(f) - 1, n - 1, -1):
            q = remainder[top]
            quotient[top - n] = q
            remainder[top - n] = (remainder[top - n] + q * c) % R
        assert bytes(g1_lincomb(monomial[: len(quotient)], quotient)) == proofs[index]


@pytest.mark.parametrize("seed", [1, 2])
def test_recovery_from_a_random_half(
    blspy_engine: Engine, ckzg_engine: Engine, blob_data: tuple, seed: int
) -> None:
    _, cells, proofs = blob_data
    kept = sorted(random.Random(seed).sample(range(CELLS_PER_EXT_BLOB), CELLS_PER_EXT_BLOB // 2))
    ours = blspy_engine.recover_cells_and_kzg_proofs(kept, [cells[i] for i in kept])
    assert (list(ours[0]), list(ours[1])) == (cells, proofs)
    theirs = ckzg_engine.recover_cells_and_kzg_proofs(kept, [cells[i] for i in kept])
    assert list(theirs[0]) == list(ours[0])


def test_verification_agrees_on_wrong_cells_and_swapped_proofs(
    blspy_engine: Engine, ckzg_engine: Engine, blob_data: tuple
) -> None:
    blob, cells, proofs = blob_data
    commitment = ckzg_engine.blob_to_kzg_commitment(blob)
    indices = list(range(CELLS_PER_EXT_BLOB))
    wrong_cell = list(cells)
    wrong_cell[9] = (int.from_bytes(cells[9][:32], "big") + 1).to_bytes(32, "big") + cells[9][32:]
    swapped = list(proofs)
    swapped[3], swapped[4] = swapped[4], swapped[3]
    for eng in (blspy_engine, ckzg_engine):
        assert eng.verify_cell_kzg_proof_batch([commitment] * 128, indices, cells, proofs) is True
        assert (
            eng.verify_cell_kzg_proof_batch([commitment] * 128, indices, wrong_cell, proofs)
            is False
        )
        assert eng.verify_cell_kzg_proof_batch([commitment] * 128, indices, cells, swapped) is False
        sample = [3, 3, 64, 100]  # a cell may appear more than once
        assert (
            eng.verify_cell_kzg_proof_batch(
                [commitment] * 4, sample, [cells[i] for i in sample], [proofs[i] for i in sample]
            )
            is True
        )


def test_recovery_refusals_name_the_problem(blspy_engine: Engine, blob_data: tuple) -> None:
    _, cells, _ = blob_data
    half = list(range(64))
    with pytest.raises(KZGError, match="recovery needs 64"):
        blspy_engine.recover_cells_and_kzg_proofs(half[:63], cells[:63])
    with pytest.raises(KZGError, match=r"cell_indices\[1\]: duplicate"):
        blspy_engine.recover_cells_and_kzg_proofs([0, 0, *half[2:]], cells[:64])
    with pytest.raises(KZGError, match="out of range"):
        blspy_engine.recover_cells_and_kzg_proofs([*half[:63], 128], cells[:64])
    with pytest.raises(KZGError, match="same length"):
        blspy_engine.recover_cells_and_kzg_proofs(half, cells[:65])


def _rollup_blob(seed: int, used: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(b"\0" + rng.randbytes(31) for _ in range(used)).ljust(131072, b"\0")


def test_cells_agree_on_random_and_edge_case_blobs(
    blspy_engine: Engine, ckzg_engine: Engine
) -> None:
    top = (R - 1).to_bytes(32, "big")
    blobs = [
        _blob(1),
        _blob(2),
        bytes(131072),
        top * 4096,
        _rollup_blob(3, 1),
        _rollup_blob(4, 2500),
    ]
    for blob in blobs:
        assert blspy_engine.compute_cells(blob) == list(ckzg_engine.compute_cells(blob))


def test_cached_precomputation_gives_the_same_proofs(
    blspy_engine: Engine, ckzg_engine: Engine, kzg_cache_dir: Path
) -> None:
    # A second cell engine over the session's cache: the warm path (tables read back
    # from disk) must give c-kzg's proofs, here on a rollup-style blob.
    warm = CellEngine(read_setup_bytes(blspy_engine.setup_path), kzg_cache_dir, _no_setup)
    assert warm.from_cache is True
    blob = _rollup_blob(5, 2458)
    assert warm.compute_cells_and_kzg_proofs(blob) == tuple(
        list(x) for x in ckzg_engine.compute_cells_and_kzg_proofs(blob)
    )


def _no_setup() -> None:
    raise AssertionError("the warm path must not need the parsed setup")
