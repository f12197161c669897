"""The Fr and G1 FFTs of kzg/fft.py against the defining sums, and the fast recovery
against the spec-shaped one (full-size evaluations of the vanishing polynomial)."""

from __future__ import annotations

import random

import pytest

from kzg.curve import g1_generator_mul, g1_lincomb
from kzg.eip7594.cells import CELLS_PER_EXT_BLOB, FIELD_ELEMENTS_PER_CELL
from kzg.eip7594.recovery import missing_cells_vanishing, recover_coefficients
from kzg.fft import brp, coset_fft, fft, g1_fft, roots_of_unity
from kzg.field import (
    BLS_MODULUS,
    FIELD_ELEMENTS_PER_BLOB,
    PRIMITIVE_ROOT_OF_UNITY,
    batch_inverse,
    bit_reversal_permutation,
)

R = BLS_MODULUS


def _dft(values: list[int], root: int) -> list[int]:
    n = len(values)
    return [sum(v * pow(root, i * j, R) for j, v in enumerate(values)) % R for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fft_is_the_dft_and_inverts(n: int) -> None:
    rng = random.Random(n)
    values = [rng.randrange(R) for _ in range(n)]
    root = roots_of_unity(n)[1] if n > 1 else 1
    assert fft(values) == _dft(values, root)
    assert fft(fft(values), inverse=True) == values
    assert fft(brp(values), brp_input=True) == fft(values)
    assert brp(values) == bit_reversal_permutation(values)


def test_coset_fft_evaluates_on_the_shifted_domain() -> None:
    rng = random.Random(3)
    values = [rng.randrange(R) for _ in range(16)]
    shift = PRIMITIVE_ROOT_OF_UNITY
    expected = [
        sum(c * pow(shift * w, j, R) for j, c in enumerate(values)) % R for w in roots_of_unity(16)
    ]
    assert coset_fft(values, shift) == expected
    assert coset_fft(expected, shift, inverse=True) == values


def test_g1_fft_is_the_dft_over_points() -> None:
    rng = random.Random(4)
    scalars = [rng.randrange(R) for _ in range(8)]
    points = [g1_generator_mul(s) for s in scalars]
    root = roots_of_unity(8)[1]
    out = g1_fft(points)
    assert [bytes(p) for p in out] == [bytes(g1_generator_mul(v)) for v in _dft(scalars, root)]
    back = g1_fft(out, inverse=True)
    assert [bytes(p) for p in back] == [bytes(p) for p in points]
    assert bytes(out[3]) == bytes(g1_lincomb(points, [pow(root, 3 * j, R) for j in range(8)]))


def _recover_as_the_spec(indices: list[int], cells: list[list[int]]) -> list[int]:
    """recover_polynomialcoeff of the spec: Z over the whole 8192-point domain and coset."""
    n, size = FIELD_ELEMENTS_PER_CELL, 2 * FIELD_ELEMENTS_PER_BLOB
    evaluations_brp = [0] * size
    for index, evals in zip(indices, cells, strict=True):
        evaluations_brp[index * n : (index + 1) * n] = evals
    missing = [i for i in range(CELLS_PER_EXT_BLOB) if i not in indices]
    short = missing_cells_vanishing(missing)
    zero = [0] * size
    for i, c in enumerate(short):
        zero[i * n] = c
    zero_evals = fft(zero)
    extended = brp(evaluations_brp)
    product = fft([e * z % R for e, z in zip(extended, zero_evals, strict=True)], inverse=True)
    shift = PRIMITIVE_ROOT_OF_UNITY
    numerator = coset_fft(product, shift)
    denominator = batch_inverse(coset_fft(zero, shift))
    quotient = [a * b % R for a, b in zip(numerator, denominator, strict=True)]
    return coset_fft(quotient, shift, inverse=True)[:FIELD_ELEMENTS_PER_BLOB]


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_recovery_equals_the_spec_shaped_one(seed: int) -> None:
    rng = random.Random(seed)
    coefficients = [rng.randrange(R) for _ in range(FIELD_ELEMENTS_PER_BLOB)]
    extended = brp(fft(coefficients + [0] * FIELD_ELEMENTS_PER_BLOB))
    n = FIELD_ELEMENTS_PER_CELL
    kept = sorted(rng.sample(range(CELLS_PER_EXT_BLOB), CELLS_PER_EXT_BLOB // 2 + seed * 7))
    cells = [extended[i * n : (i + 1) * n] for i in kept]
    assert recover_coefficients(kept, cells) == coefficients
    assert _recover_as_the_spec(kept, cells) == coefficients
