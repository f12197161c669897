"""Radix-2 FFTs over Fr and over G1 (natural order in and out), as the specs' fft_field.

The Fr transform works level by level with list comprehensions: at each level the
longer of the two loop dimensions (blocks or positions within a block) runs inside a
comprehension, so Python overhead stays per level, not per butterfly.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import TypeVar

from blspy import G1Element

from .curve import g1_mul
from .field import BLS_MODULUS, PRIMITIVE_ROOT_OF_UNITY, bit_reversal_permutation, inv

R = BLS_MODULUS
T = TypeVar("T")


@cache
def roots_of_unity(order: int) -> tuple[int, ...]:
    root = pow(PRIMITIVE_ROOT_OF_UNITY, (R - 1) // order, R)
    out = [1] * order
    for i in range(1, order):
        out[i] = out[i - 1] * root % R
    return tuple(out)


@cache
def _brp_indices(order: int) -> tuple[int, ...]:
    return tuple(bit_reversal_permutation(list(range(order))))


def brp(values: Sequence[T]) -> list[T]:
    """``field.bit_reversal_permutation`` with the index table cached per length."""
    return [values[i] for i in _brp_indices(len(values))]


def fft(values: Sequence[int], inverse: bool = False, brp_input: bool = False) -> list[int]:
    """Evaluations p(ω^i) of the polynomial with coefficients ``values`` (or, inverse,
    the coefficients from evaluations), ω the primitive len(values)-th root of unity.
    With ``brp_input`` the values are given in bit-reversed order, which is the order
    the iterative transform consumes, so no permutation is made."""
    n = len(values)
    roots = roots_of_unity(n)
    if inverse:
        roots = (roots[0], *roots[:0:-1])
    a = list(values) if brp_input else brp(values)
    # Sums and differences are left unreduced, as are butterflies whose twiddle is 1
    # (every one of the first level): values grow by at most a bit a level; products are
    # reduced, and everything once at the end.
    h = 1
    while h < n:
        stride = n // (2 * h)
        twiddles = roots[::stride][:h]
        if h >= stride:
            for k in range(0, n, 2 * h):
                lo = a[k : k + h]
                t = [x * w % R for x, w in zip(a[k + h : k + 2 * h], twiddles, strict=True)]
                a[k : k + h] = [u + v for u, v in zip(lo, t, strict=True)]
                a[k + h : k + 2 * h] = [u - v for u, v in zip(lo, t, strict=True)]
        else:
            for j in range(h):
                w = twiddles[j]
                lo = a[j :: 2 * h]
                t = a[j + h :: 2 * h] if w == 1 else [x * w % R for x in a[j + h :: 2 * h]]
                a[j :: 2 * h] = [u + v for u, v in zip(lo, t, strict=True)]
                a[j + h :: 2 * h] = [u - v for u, v in zip(lo, t, strict=True)]
        h *= 2
    if inverse:
        n_inv = inv(n)
        return [x * n_inv % R for x in a]
    return [x % R for x in a]


def coset_fft(values: Sequence[int], shift: int, inverse: bool = False) -> list[int]:
    """FFT over the coset shift·⟨ω⟩ (the spec's coset_fft_field with shift 7)."""
    n = len(values)
    if inverse:
        out = fft(values, inverse=True)
        factor, acc = inv(shift), 1
        for i in range(n):
            out[i] = out[i] * acc % R
            acc = acc * factor % R
        return out
    scaled, acc = [0] * n, 1
    for i in range(n):
        scaled[i] = values[i] * acc % R
        acc = acc * shift % R
    return fft(scaled)


def g1_fft(points: Sequence[G1Element], inverse: bool = False) -> list[G1Element]:
    """The same transform with G1 points as coefficients (scalar multiplications by the
    twiddles; the twiddle 1 costs nothing)."""
    n = len(points)
    roots = roots_of_unity(n)
    if inverse:
        roots = (roots[0], *roots[:0:-1])
    a = brp(points)
    h = 1
    while h < n:
        stride = n // (2 * h)
        for k in range(0, n, 2 * h):
            for j in range(h):
                w = roots[j * stride]
                x = a[k + j + h]
                t = x if w == 1 else g1_mul(x, w)
                u = a[k + j]
                a[k + j] = u + t
                a[k + j + h] = u + t.negate()
        h *= 2
    if inverse:
        n_inv = inv(n)
        return [g1_mul(p, n_inv) for p in a]
    return a
