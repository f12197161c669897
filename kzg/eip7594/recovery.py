"""Erasure decoding: the blob's coefficients from any half of its cells, by dividing out
the polynomial that vanishes on the missing cells, over a coset where it has no zeros."""

from __future__ import annotations

from collections.abc import Sequence

from ..fft import coset_fft, fft, roots_of_unity
from ..field import (
    BLS_MODULUS,
    FIELD_ELEMENTS_PER_BLOB,
    PRIMITIVE_ROOT_OF_UNITY,
    batch_inverse,
    reverse_bits,
)
from ..field import bit_reversal_permutation as brp
from .cells import CELLS_PER_EXT_BLOB, FIELD_ELEMENTS_PER_CELL, FIELD_ELEMENTS_PER_EXT_BLOB

R = BLS_MODULUS


def vanishing_coefficients(points: Sequence[int]) -> list[int]:
    """Coefficients of Π (X − p), lowest degree first."""
    poly = [1]
    for p in points:
        shifted = [0, *poly]
        for i, c in enumerate(poly):
            shifted[i] = (shifted[i] - c * p) % R
        poly = shifted
    return poly


def missing_cells_vanishing(missing: Sequence[int]) -> list[int]:
    """Z(X) vanishing on every point of the missing cells: the cells' cosets are the
    roots of X^64 − c, so Z(X) = z(X^64) with z vanishing on the 128th roots c."""
    small_roots = roots_of_unity(CELLS_PER_EXT_BLOB)
    short = vanishing_coefficients(
        [small_roots[reverse_bits(i, CELLS_PER_EXT_BLOB)] for i in missing]
    )
    full = [0] * FIELD_ELEMENTS_PER_EXT_BLOB
    for i, c in enumerate(short):
        full[i * FIELD_ELEMENTS_PER_CELL] = c
    return full


def recover_coefficients(cell_indices: Sequence[int], cells: Sequence[Sequence[int]]) -> list[int]:
    """The 4096 coefficients of the polynomial whose extension contains ``cells``."""
    n = FIELD_ELEMENTS_PER_CELL
    evaluations_brp = [0] * FIELD_ELEMENTS_PER_EXT_BLOB
    for index, evals in zip(cell_indices, cells, strict=True):
        evaluations_brp[index * n : (index + 1) * n] = evals
    evaluations = brp(evaluations_brp)
    present = set(cell_indices)
    zero = missing_cells_vanishing([i for i in range(CELLS_PER_EXT_BLOB) if i not in present])
    zero_evals = fft(zero)
    # E·Z agrees with P·Z on the whole domain, and P·Z has degree < 8192.
    product_coefficients = fft(
        [e * z % R for e, z in zip(evaluations, zero_evals, strict=True)], inverse=True
    )
    shift = PRIMITIVE_ROOT_OF_UNITY
    numerator = coset_fft(product_coefficients, shift)
    denominator_inverses = batch_inverse(coset_fft(zero, shift))
    quotient = [a * b % R for a, b in zip(numerator, denominator_inverses, strict=True)]
    return coset_fft(quotient, shift, inverse=True)[:FIELD_ELEMENTS_PER_BLOB]
