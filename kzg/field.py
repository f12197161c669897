"""Arithmetic in Fr, the scalar field of BLS12-381, as the consensus specs use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

BLS_MODULUS = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001
BYTES_PER_FIELD_ELEMENT = 32
FIELD_ELEMENTS_PER_BLOB = 4096
BYTES_PER_BLOB = BYTES_PER_FIELD_ELEMENT * FIELD_ELEMENTS_PER_BLOB
PRIMITIVE_ROOT_OF_UNITY = 7

T = TypeVar("T")


def bls_field_to_bytes(x: int) -> bytes:
    """Return the 32-byte big-endian encoding of a field element."""
    return x.to_bytes(BYTES_PER_FIELD_ELEMENT, "big")


def hash_to_bls_field(data: bytes) -> int:
    """Return the field element of a 32-byte hash, reduced modulo BLS_MODULUS."""
    return int.from_bytes(data, "big") % BLS_MODULUS


def inv(x: int) -> int:
    """Return the multiplicative inverse of a non-zero field element."""
    if x % BLS_MODULUS == 0:
        raise ZeroDivisionError("inverse of zero in Fr")
    return pow(x, -1, BLS_MODULUS)


def batch_inverse(xs: Sequence[int]) -> list[int]:
    """Return the inverses of all ``xs`` (all non-zero) with a single field inversion."""
    n = len(xs)
    if n == 0:
        return []
    prefix = [0] * n
    acc = 1
    for i, x in enumerate(xs):
        prefix[i] = acc
        acc = acc * x % BLS_MODULUS
    acc_inv = inv(acc)
    out = [0] * n
    for i in range(n - 1, -1, -1):
        out[i] = prefix[i] * acc_inv % BLS_MODULUS
        acc_inv = acc_inv * xs[i] % BLS_MODULUS
    return out


def compute_powers(x: int, n: int) -> list[int]:
    """Return ``[x^0, x^1, ..., x^(n-1)]``."""
    powers = [0] * n
    cur = 1
    for i in range(n):
        powers[i] = cur
        cur = cur * x % BLS_MODULUS
    return powers


def compute_roots_of_unity(order: int) -> list[int]:
    """Return the ``order`` roots of unity in natural order (order is a power of two)."""
    if order & (order - 1) or order == 0:
        raise ValueError("order must be a power of two")
    root = pow(PRIMITIVE_ROOT_OF_UNITY, (BLS_MODULUS - 1) // order, BLS_MODULUS)
    return compute_powers(root, order)


def reverse_bits(n: int, order: int) -> int:
    """Return ``n`` with its ``log2(order)`` low bits reversed."""
    width = order.bit_length() - 1
    return int(format(n, f"0{width}b")[::-1], 2) if width else 0


def bit_reversal_permutation(sequence: Sequence[T]) -> list[T]:
    """Return a copy of ``sequence`` with bit-reversed indices (length a power of two)."""
    order = len(sequence)
    return [sequence[reverse_bits(i, order)] for i in range(order)]
