"""Batch verification of cells with the universal verification equation: one random
linear combination of every cell, one pairing check.

    e(Σ rᵏ·πₖ, [τ⁶⁴]) = e(Σᵢ wᵢ·Cᵢ − [Σ rᵏ·Iₖ(τ)] + Σ rᵏhₖ⁶⁴·πₖ, [1])

where Iₖ interpolates cell k over its coset hₖ·⟨ω₆₄⟩: Iₖ(X) = Σⱼ cⱼ (X/hₖ)ʲ with c the
inverse FFT of the cell's evaluations, so the sum over cells is one polynomial of 64
coefficients committed against the first 64 monomial setup points.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from blspy import G1Element, G2Element

from ..curve import g1_lincomb
from ..fft import fft
from ..field import (
    BLS_MODULUS,
    FIELD_ELEMENTS_PER_BLOB,
    bls_field_to_bytes,
    compute_powers,
    hash_to_bls_field,
    inv,
)
from .cells import FIELD_ELEMENTS_PER_CELL, coset_shift_for_cell

R = BLS_MODULUS
RANDOM_CHALLENGE_KZG_CELL_BATCH_DOMAIN = b"RCKZGCBATCH__V1_"


def batch_challenge(
    commitments: Sequence[bytes],
    commitment_indices: Sequence[int],
    cell_indices: Sequence[int],
    cosets_evals: Sequence[Sequence[int]],
    proofs: Sequence[bytes],
) -> int:
    """The spec's compute_verify_cell_kzg_proof_batch_challenge."""
    parts = [
        RANDOM_CHALLENGE_KZG_CELL_BATCH_DOMAIN,
        FIELD_ELEMENTS_PER_BLOB.to_bytes(8, "big"),
        FIELD_ELEMENTS_PER_CELL.to_bytes(8, "big"),
        len(commitments).to_bytes(8, "big"),
        len(cell_indices).to_bytes(8, "big"),
        *map(bytes, commitments),
    ]
    for k, evals in enumerate(cosets_evals):
        parts.append(commitment_indices[k].to_bytes(8, "big"))
        parts.append(cell_indices[k].to_bytes(8, "big"))
        parts.extend(bls_field_to_bytes(v) for v in evals)
        parts.append(bytes(proofs[k]))
    return hash_to_bls_field(hashlib.sha256(b"".join(parts)).digest())


def verify_batch(
    commitment_bytes: Sequence[bytes],
    commitments: Sequence[G1Element],
    commitment_indices: Sequence[int],
    cell_indices: Sequence[int],
    cosets_evals: Sequence[Sequence[int]],
    proof_bytes: Sequence[bytes],
    proofs: Sequence[G1Element],
    monomial: Sequence[G1Element],
    g2_tau_n: G2Element,
    g2_generator: G2Element,
) -> bool:
    n = FIELD_ELEMENTS_PER_CELL
    r = batch_challenge(
        commitment_bytes, commitment_indices, cell_indices, cosets_evals, proof_bytes
    )
    powers = compute_powers(r, len(cell_indices))
    weights = [0] * len(commitments)
    for k, i in enumerate(commitment_indices):
        weights[i] = (weights[i] + powers[k]) % R
    # Σ rᵏ·Iₖ: cells at the same index share their coset, so sum their evaluations first.
    by_cell: dict[int, list[int]] = {}
    for k, (index, evals) in enumerate(zip(cell_indices, cosets_evals, strict=True)):
        acc = by_cell.setdefault(index, [0] * n)
        rk = powers[k]
        for j, v in enumerate(evals):
            acc[j] += rk * v
    interpolation = [0] * n
    for index, evals in by_cell.items():
        # A cell lists its coset in bit-reversed order of the powers of ω₆₄.
        coefficients = fft([v % R for v in evals], inverse=True, brp_input=True)
        h_inv = inv(coset_shift_for_cell(index))
        scale = 1
        for j in range(n):
            interpolation[j] += coefficients[j] * scale
            scale = scale * h_inv % R
    interpolation = [c % R for c in interpolation]
    shifted_weights = [
        powers[k] * pow(coset_shift_for_cell(index), n, R) % R
        for k, index in enumerate(cell_indices)
    ]
    left = g1_lincomb(proofs, powers)
    right = g1_lincomb(
        [*commitments, *monomial[:n], *proofs],
        [*weights, *((R - c) % R for c in interpolation), *shifted_weights],
    )
    return bool(left.pair(g2_tau_n) == right.pair(g2_generator))
