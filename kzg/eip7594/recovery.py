"""Erasure decoding: the blob's coefficients from any half of its cells, by dividing out
the polynomial that vanishes on the missing cells, over a coset where it has no zeros."""

from __future__ import annotations

from collections.abc import Sequence

from ..fft import brp, coset_fft, fft, roots_of_unity
from ..field import (
    BLS_MODULUS,
    FIELD_ELEMENTS_PER_BLOB,
    PRIMITIVE_ROOT_OF_UNITY,
    batch_inverse,
    reverse_bits,
)
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
    """Coefficients of z with Z(X) = z(X^64) vanishing on every point of the missing
    cells: cell i is the set of roots of X^64 − cᵢ, cᵢ the 128th root of unity at bit-reversed
    position i, so z vanishes on those cᵢ (degree ≤ 64, padded to 128 coefficients)."""
    small_roots = roots_of_unity(CELLS_PER_EXT_BLOB)
    short = vanishing_coefficients(
        [small_roots[reverse_bits(i, CELLS_PER_EXT_BLOB)] for i in missing]
    )
    return short + [0] * (CELLS_PER_EXT_BLOB - len(short))


def recover_coefficients(cell_indices: Sequence[int], cells: Sequence[Sequence[int]]) -> list[int]:
    """The 4096 coefficients of the polynomial whose extension contains ``cells``.

    The spec's method: E·Z agrees with P·Z on the whole domain and P·Z has degree < 8192,
    so it is known in coefficient form; P = (P·Z)/Z evaluated on the coset 7·⟨ω⟩, where
    Z has no zeros. Since Z(X) = z(X^64) and x ↦ x^64 maps the domain (and the coset)
    onto 128 points, Z's 8192 evaluations repeat those of z on 128 points: two FFTs of
    128 and 128 inversions instead of two FFTs of 8192 and 8192 inversions.
    """
    n = FIELD_ELEMENTS_PER_CELL
    evaluations_brp = [0] * FIELD_ELEMENTS_PER_EXT_BLOB
    for index, evals in zip(cell_indices, cells, strict=True):
        evaluations_brp[index * n : (index + 1) * n] = evals
    evaluations = brp(evaluations_brp)
    present = set(cell_indices)
    z = missing_cells_vanishing([i for i in range(CELLS_PER_EXT_BLOB) if i not in present])
    m = CELLS_PER_EXT_BLOB
    # Z(ω^t) = z(ω₁₂₈^(t mod 128)) and Z(7·ω^t) = z(7^64·ω₁₂₈^(t mod 128)).
    z_on_domain = fft(z) * (FIELD_ELEMENTS_PER_EXT_BLOB // m)
    product_coefficients = fft(
        [e * zv % R for e, zv in zip(evaluations, z_on_domain, strict=True)], inverse=True
    )
    shift = PRIMITIVE_ROOT_OF_UNITY
    numerator = coset_fft(product_coefficients, shift)
    z_inverses = batch_inverse(coset_fft(z, pow(shift, n, R)))
    quotient = [v * z_inverses[t % m] % R for t, v in enumerate(numerator)]
    return coset_fft(quotient, shift, inverse=True)[:FIELD_ELEMENTS_PER_BLOB]
