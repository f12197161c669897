"""EIP-4844 polynomial commitments, the field side: blobs as polynomials in evaluation
form over the bit-reversed roots of unity, barycentric evaluation, quotients and the
Fiat-Shamir challenges, exactly as the consensus specs define them (polynomial-commitments.md).
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from functools import cache

from .field import (
    BLS_MODULUS,
    FIELD_ELEMENTS_PER_BLOB,
    batch_inverse,
    bit_reversal_permutation,
    bls_field_to_bytes,
    compute_roots_of_unity,
    hash_to_bls_field,
    inv,
)
from .validate import check_bytes

FIAT_SHAMIR_PROTOCOL_DOMAIN = b"FSBLOBVERIFY_V1_"
RANDOM_CHALLENGE_KZG_BATCH_DOMAIN = b"RCKZGBATCH___V1_"
# EIP-4844: the first byte of a blob transaction's versioned hash names the commitment scheme.
VERSIONED_HASH_VERSION_KZG = 0x01
BYTES_PER_COMMITMENT = 48


@cache
def roots_of_unity_brp() -> tuple[int, ...]:
    """The evaluation domain of a blob: the 4096th roots of unity, bit-reversed."""
    return tuple(bit_reversal_permutation(compute_roots_of_unity(FIELD_ELEMENTS_PER_BLOB)))


@cache
def _root_index() -> dict[int, int]:
    return {w: i for i, w in enumerate(roots_of_unity_brp())}


def kzg_to_versioned_hash(commitment: bytes) -> bytes:
    """Return the versioned hash a blob transaction carries for ``commitment`` (EIP-4844):
    the version byte, then the SHA-256 digest of the commitment minus the digest's first byte."""
    digest = hashlib.sha256(check_bytes(commitment, BYTES_PER_COMMITMENT, "commitment")).digest()
    return bytes([VERSIONED_HASH_VERSION_KZG]) + digest[1:]


@cache
def _fold_roots() -> tuple[tuple[int, ...], ...]:
    """Per folding level, the even-indexed roots: level ℓ holds the (N/2^ℓ)-th roots of
    unity in bit-reversed order, where neighbours 2j and 2j+1 are ±w."""
    levels = []
    roots = list(roots_of_unity_brp())
    while len(roots) > 1:
        levels.append(tuple(roots[0::2]))
        roots = [w * w % BLS_MODULUS for w in roots[0::2]]
    return tuple(levels)


def evaluate_polynomial(poly: Sequence[int], z: int) -> int:
    """Return p(z) for p in evaluation form over the blob's domain.

    Outside the domain this is the barycentric formula p(z) = (zᴺ−1)/N · Σ fᵢωᵢ/(z−ωᵢ),
    summed by folding: a/(Z−w) + b/(Z+w) = ((a+b)·Z + (a−b)·w)/(Z²−w²) pairs the
    neighbours ±w of the bit-reversed domain, and after log₂N folds the one remaining
    denominator is zᴺ−1, which cancels. About 2.5·N products and no inversion per z.
    """
    index = _root_index().get(z)
    if index is not None:
        return poly[index]
    r = BLS_MODULUS
    levels = _fold_roots()
    # First fold with a = f·w and b = f'·(−w) written out: w·((f − f')·z + (f + f')·w);
    # the factor w stays outside the reduction (the next fold's reduction covers it), so
    # the next level multiplies 510-bit rather than 765-bit numbers (measured ~30% faster).
    acc = [
        ((a - b) * z + (a + b) * w) % r * w
        for w, a, b in zip(levels[0], poly[0::2], poly[1::2], strict=True)
    ]
    big_z = z * z % r
    for roots in levels[1:]:
        acc = [
            ((a + b) * big_z + (a - b) * w) % r
            for w, a, b in zip(roots, acc[0::2], acc[1::2], strict=True)
        ]
        big_z = big_z * big_z % r
    return acc[0] * _inverse_width() % r


@cache
def _inverse_width() -> int:
    return inv(FIELD_ELEMENTS_PER_BLOB)


@cache
def _halving_levels() -> tuple[tuple[int, ...], ...]:
    """Level k: the even-indexed entries of the bit-reversed (N/2^k)-th roots of unity
    (the odd-indexed ones are their negatives)."""
    return _fold_roots()


def _inverse_differences(z: int) -> tuple[list[int], int]:
    """Return 1/(ωᵢ − z) for every ωᵢ of the bit-reversed domain, z outside it.

    Halving instead of a batch inversion: for neighbours ±w, 1/(w − Z) = (w + Z)/(w² − Z²)
    and 1/(−w − Z) = (Z − w)/(w² − Z²), and the w² − Z² are the same problem over the
    (N/2)-th roots with Z² for Z. One inversion at the bottom and ~2N products in list
    comprehensions, against 3N products in a Python loop for a batch inversion.
    Also returns zᴺ, which the barycentric formula needs.
    """
    r = BLS_MODULUS
    levels = _halving_levels()
    powers = [z]
    for _ in levels:
        powers.append(powers[-1] * powers[-1] % r)
    inverses = [pow((1 - powers[-1]) % r, -1, r)]
    for k in range(len(levels) - 1, -1, -1):
        big_z = powers[k]
        evens = levels[k]
        level = [0] * (2 * len(evens))
        level[0::2] = [(w + big_z) * d % r for w, d in zip(evens, inverses, strict=True)]
        level[1::2] = [(big_z - w) * d % r for w, d in zip(evens, inverses, strict=True)]
        inverses = level
    return inverses, powers[-1]


def compute_quotient(poly: Sequence[int], z: int, y: int) -> list[int]:
    """Return q = (p − y)/(X − z) in evaluation form, including the in-domain case."""
    r = BLS_MODULUS
    index = _root_index().get(z)
    if index is None:
        # q(ωᵢ) = (fᵢ − y)/(ωᵢ − z)
        inverses, _ = _inverse_differences(z)
        return [(f - y) * d % r for f, d in zip(poly, inverses, strict=True)]
    roots = roots_of_unity_brp()
    denominators = [(w - z) % r for w in roots]
    denominators[index] = 1
    inverses = batch_inverse(denominators)
    quotient = [(f - y) * d % r for f, d in zip(poly, inverses, strict=True)]
    # q(ω_m) = Σ_{i≠m} (fᵢ − y)·ωᵢ / (z·(z − ωᵢ))
    terms = [(z * (z - w)) % r for i, w in enumerate(roots) if i != index]
    term_inverses = iter(batch_inverse(terms))
    total = 0
    for i, (f, w) in enumerate(zip(poly, roots, strict=True)):
        if i != index:
            total += (f - y) * w % r * next(term_inverses)
    quotient[index] = total % r
    return quotient


def evaluate_with_quotient(poly: Sequence[int], z: int) -> tuple[int, list[int]]:
    """Return (p(z), (p − p(z))/(X − z)): outside the domain the inverses 1/(ωᵢ − z) serve
    both the barycentric sum and the quotient, so the evaluation costs two C-level
    products per element instead of a separate fold."""
    index = _root_index().get(z)
    if index is not None:
        y = poly[index]
        return y, compute_quotient(poly, z, y)
    r = BLS_MODULUS
    inverses, z_n = _inverse_differences(z)
    weighted = sum(map(operator.mul, map(operator.mul, poly, roots_of_unity_brp()), inverses))
    # p(z) = (zᴺ − 1)/N · Σ fᵢωᵢ/(z − ωᵢ), and the inverses are of ωᵢ − z
    y = (1 - z_n) * _inverse_width() % r * (weighted % r) % r
    return y, [(f - y) * d % r for f, d in zip(poly, inverses, strict=True)]


def compute_challenge(blob: bytes, commitment: bytes) -> int:
    """The spec's Fiat-Shamir challenge of a blob and its commitment."""
    data = (
        FIAT_SHAMIR_PROTOCOL_DOMAIN
        + FIELD_ELEMENTS_PER_BLOB.to_bytes(16, "big")
        + bytes(blob)
        + bytes(commitment)
    )
    return hash_to_bls_field(hashlib.sha256(data).digest())


def batch_challenge(
    commitments: Sequence[bytes], zs: Sequence[int], ys: Sequence[int], proofs: Sequence[bytes]
) -> int:
    """The spec's random-linear-combination challenge of verify_kzg_proof_batch."""
    parts = [
        RANDOM_CHALLENGE_KZG_BATCH_DOMAIN,
        FIELD_ELEMENTS_PER_BLOB.to_bytes(8, "big"),
        len(commitments).to_bytes(8, "big"),
    ]
    for commitment, z, y, proof in zip(commitments, zs, ys, proofs, strict=True):
        parts += [bytes(commitment), bls_field_to_bytes(z), bls_field_to_bytes(y), bytes(proof)]
    return hash_to_bls_field(hashlib.sha256(b"".join(parts)).digest())
