"""Cells: the blob's polynomial evaluated over the 8192 roots of unity in bit-reversed
order, cut into 128 cells of 64 field elements; cell i is the coset hᵢ·⟨ω₆₄⟩."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

from ..fft import brp, fft, roots_of_unity
from ..field import BLS_MODULUS, BYTES_PER_FIELD_ELEMENT, FIELD_ELEMENTS_PER_BLOB

FIELD_ELEMENTS_PER_EXT_BLOB = 2 * FIELD_ELEMENTS_PER_BLOB
FIELD_ELEMENTS_PER_CELL = 64
BYTES_PER_CELL = FIELD_ELEMENTS_PER_CELL * BYTES_PER_FIELD_ELEMENT
CELLS_PER_EXT_BLOB = FIELD_ELEMENTS_PER_EXT_BLOB // FIELD_ELEMENTS_PER_CELL


@cache
def ext_roots_brp() -> tuple[int, ...]:
    return tuple(brp(roots_of_unity(FIELD_ELEMENTS_PER_EXT_BLOB)))


def coset_for_cell(index: int) -> tuple[int, ...]:
    start = index * FIELD_ELEMENTS_PER_CELL
    return ext_roots_brp()[start : start + FIELD_ELEMENTS_PER_CELL]


def coset_shift_for_cell(index: int) -> int:
    return ext_roots_brp()[index * FIELD_ELEMENTS_PER_CELL]


def evals_to_cell(evals: Sequence[int]) -> bytes:
    return b"".join(v.to_bytes(BYTES_PER_FIELD_ELEMENT, "big") for v in evals)


def blob_coefficients(poly_brp: Sequence[int]) -> list[int]:
    """Monomial coefficients of a blob given in (bit-reversed) evaluation form."""
    return fft(poly_brp, inverse=True, brp_input=True)


def extend(coefficients: Sequence[int]) -> list[int]:
    """All 8192 evaluations in the cells' order (bit-reversed extended domain)."""
    padded = list(coefficients) + [0] * (FIELD_ELEMENTS_PER_EXT_BLOB - len(coefficients))
    return brp(fft(padded))


def cells_from_coefficients(coefficients: Sequence[int]) -> list[bytes]:
    evaluations = extend(coefficients)
    n = FIELD_ELEMENTS_PER_CELL
    return [evals_to_cell(evaluations[i * n : (i + 1) * n]) for i in range(CELLS_PER_EXT_BLOB)]


def evaluate_coefficients(coefficients: Sequence[int], z: int) -> int:
    """Horner's rule: the spec-shaped reference the FFT path is tested against."""
    y = 0
    for c in reversed(coefficients):
        y = (y * z + c) % BLS_MODULUS
    return y
