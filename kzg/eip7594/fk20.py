"""FK20: the KZG multi-proofs of all 128 cells at once.

For f of degree < n = 4096, cells of l = 64 points and k = n/l = 64, the proof of the
cell whose coset has Z(X) = X^l − c is [q(τ)] with q = f div (X^l − c), and
    q(τ) = Σ_{s<k−1} c^s · H_s,   H_s = Σ_{m>s} Σ_{r<l} f_{ml+r} · [τ^{(m−1−s)l+r}].
The c of the 128 cells are the 128th roots of unity (bit-reversed), so the proofs are one
G1 FFT of (H_0 … H_{k−2}). Each H_s is, for every offset r, a Toeplitz product, computed
as a cyclic convolution of size 2k: the G1 side, FFT_2k of the reversed setup points of
each offset, depends only on the setup and is precomputed (and cached on disk); per blob
it costs l field FFTs, 2k multi-scalar multiplications (of l points, each stored with
its multiples by 2^85 and 2^170), and two G1 FFTs.
"""

from __future__ import annotations

from collections.abc import Sequence

from blspy import G1Element

from ..curve import g1_lincomb
from ..fft import brp, fft, g1_fft
from ..field import BLS_MODULUS, FIELD_ELEMENTS_PER_BLOB, inv
from .cells import CELLS_PER_EXT_BLOB, FIELD_ELEMENTS_PER_CELL

L = FIELD_ELEMENTS_PER_CELL
K = FIELD_ELEMENTS_PER_BLOB // L
SIZE = 2 * K  # the circulant embedding; equals CELLS_PER_EXT_BLOB here


# The 64 scalars of each product are cut into three 85-bit chunks, the points stored with
# their multiples by 2^85 and 2^170: a product is then one MSM of 192 points with 85-bit
# scalars, where bucket (Pippenger) sums need ~25% fewer additions than for 64 points with
# 255-bit scalars (the doubling chains are precomputed), for 24576 stored points (~0.8 s
# warm load) instead of 8192. Two 128-bit chunks fall in the range where g1_lincomb picks
# interleaved NAF, which is slower in practice; four would load too slowly.
CHUNKS = 3
CHUNK_BITS = 85


def precompute(monomial: Sequence[G1Element]) -> list[list[G1Element]]:
    """Per frequency j < 2k, the points of its product: for every chunk q and offset r,
    2^(85q) times entry j of FFT_2k of (τ^{(k−1−v)l+r})_{v<k} padded with k identities."""
    rows = []
    for r in range(L):
        column = [monomial[(K - 1 - v) * L + r] for v in range(K)]
        rows.append(g1_fft(column + [G1Element()] * K))
    chunks = [rows]
    for _ in range(CHUNKS - 1):
        shifted = []
        for row in chunks[-1]:
            out = []
            for p in row:
                for _ in range(CHUNK_BITS):
                    p = p + p
                out.append(p)
            shifted.append(out)
        chunks.append(shifted)
    return [[chunk[r][j] for chunk in chunks for r in range(L)] for j in range(SIZE)]


def proofs(coefficients: Sequence[int], columns: Sequence[Sequence[G1Element]]) -> list[G1Element]:
    """The 128 cell proofs, in cell order."""
    # Per offset r, the FFT of a_m = f_{ml+r}, scaled by 1/2k: the inverse G1 FFT below
    # then needs no scalar multiplication by 1/2k of its 128 outputs.
    scale = inv(SIZE)
    spectra = [
        fft([coefficients[m * L + r] * scale % BLS_MODULUS for m in range(K)] + [0] * K)
        for r in range(L)
    ]
    mask = (1 << CHUNK_BITS) - 1
    shifts = [q * CHUNK_BITS for q in range(CHUNKS)]
    products = [
        g1_lincomb(
            columns[j], [spectra[r][j] >> shift & mask for shift in shifts for r in range(L)]
        )
        for j in range(SIZE)
    ]
    # H_s is position k + s of the inverse transform of the products; an unscaled
    # inverse DFT is the forward DFT read at negated positions: (2k − k − s) = k − s.
    transformed = g1_fft(products)
    h = [transformed[K - s] for s in range(K - 1)]
    padded = h + [G1Element()] * (CELLS_PER_EXT_BLOB - len(h))
    return brp(g1_fft(padded))
