"""The blspy engine: field arithmetic in Python, G1/G2 through blspy.

Commitments and proofs are fixed-base multi-scalar multiplications over the
bit-reversed Lagrange setup, from a table cached on disk (see ``curve.FixedBaseMSM``);
verification is one pairing equation, batches one random linear combination.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from blspy import G1Element, G2Element

from . import cache
from .curve import (
    FixedBaseMSM,
    g1_generator_mul,
    g1_lincomb,
    g1_mul,
    windows_for,
)
from .eip4844 import (
    batch_challenge,
    compute_challenge,
    evaluate_polynomial,
    evaluate_with_quotient,
)
from .eip7594.engine import CellEngine
from .errors import KZGError
from .field import BLS_MODULUS, bit_reversal_permutation, bls_field_to_bytes, compute_powers
from .setup import (
    BYTES_PER_G1,
    TrustedSetup,
    bundled_setup_path,
    load_trusted_setup,
    read_setup_bytes,
)
from .validate import blob_to_polynomial, check_list, field_from_bytes, g1_from_bytes

# 13-bit windows: 20 windows of 4096 points; ~86k additions a commitment (see docs/engine.md).
DEFAULT_WINDOW = 13
_TABLE_VERSION = 1


class BlspyEngine:
    """EIP-4844 (and, through ``kzg.eip7594``, EIP-7594) on blspy."""

    name = "blspy"

    def __init__(
        self,
        trusted_setup: str | Path | None = None,
        cache_dir: str | Path | None = None,
        window: int = DEFAULT_WINDOW,
        table_windows: int | None = None,
    ) -> None:
        """``table_windows`` below the 20 that 255-bit scalars need stores a smaller table
        (warm load ∝ stored points) and pays one more bucket set per extra chunk."""
        self.setup_path = Path(trusted_setup) if trusted_setup else bundled_setup_path()
        self.cache_dir = cache.default_cache_dir(cache_dir)
        raw = read_setup_bytes(self.setup_path)
        self.setup_sha256 = raw.sha256
        self._setup: TrustedSetup | None = None
        self.table_from_cache = True
        windows = table_windows or windows_for(window, 255)
        meta = {
            "kind": "lagrange-brp",
            "version": _TABLE_VERSION,
            "setup_sha256": raw.sha256,
            "window": window,
            "windows": windows,
        }
        path = cache.table_path(self.cache_dir, "lagrange", meta)
        lagrange_brp = b"".join(bit_reversal_permutation(raw.g1_lagrange))
        payload = cache.read_table(path, meta)
        if payload is None or not payload.startswith(lagrange_brp):
            # Cold start: validate every setup point, then build and store the table.
            self.table_from_cache = False
            setup = self.setup
            table = FixedBaseMSM.build(setup.g1_lagrange_brp, window, windows=windows)
            cache.write_table(path, meta, b"".join(bytes(p) for row in table.rows for p in row))
            self._lagrange = table
            g2 = setup.g2_monomial
        else:
            self._lagrange = self._table_from_payload(payload, window, len(raw.g1_lagrange))
            g2 = [G2Element.from_bytes(b) for b in raw.g2_monomial[:2]]
        self._g2_generator = g2[0]
        self._g2_tau = g2[1]
        self._cells = CellEngine(raw, self.cache_dir, lambda: self.setup)

    @property
    def setup(self) -> TrustedSetup:
        """The fully validated setup (parsed on first use when the tables came from cache)."""
        if self._setup is None:
            self._setup = load_trusted_setup(self.setup_path)
        return self._setup

    @staticmethod
    def _table_from_payload(payload: bytes, window: int, size: int) -> FixedBaseMSM:
        unchecked = G1Element.from_bytes_unchecked
        points = [
            unchecked(payload[i : i + BYTES_PER_G1]) for i in range(0, len(payload), BYTES_PER_G1)
        ]
        rows = [points[j : j + size] for j in range(0, len(points), size)]
        return FixedBaseMSM(rows, window)

    # -- EIP-4844 ---------------------------------------------------------------------

    def blob_to_kzg_commitment(self, blob: bytes) -> bytes:
        return bytes(self._lagrange.lincomb(blob_to_polynomial(blob)))

    def _proof(self, poly: list[int], z: int) -> tuple[bytes, int]:
        y, quotient = evaluate_with_quotient(poly, z)
        return bytes(self._lagrange.lincomb(quotient)), y

    def compute_kzg_proof(self, blob: bytes, z: bytes) -> tuple[bytes, bytes]:
        poly = blob_to_polynomial(blob)
        proof, y = self._proof(poly, field_from_bytes(z, "z"))
        return proof, bls_field_to_bytes(y)

    def compute_blob_kzg_proof(self, blob: bytes, commitment: bytes) -> bytes:
        poly = blob_to_polynomial(blob)
        g1_from_bytes(commitment, "commitment")
        proof, _ = self._proof(poly, compute_challenge(blob, commitment))
        return proof

    def _check(self, commitment: G1Element, z: int, y: int, proof: G1Element) -> bool:
        # e(C − [y]G1 + [z]π, G2) = e(π, [τ]G2), i.e. e(π, [τ − z]G2) = e(C − [y]G1, G2)
        # with the G2 scalar multiplication moved to G1, where blspy lets us build it.
        lhs = commitment + g1_generator_mul(-y) + g1_mul(proof, z)
        return bool(lhs.pair(self._g2_generator) == proof.pair(self._g2_tau))

    def verify_kzg_proof(self, commitment: bytes, z: bytes, y: bytes, proof: bytes) -> bool:
        c = g1_from_bytes(commitment, "commitment")
        zz = field_from_bytes(z, "z")
        yy = field_from_bytes(y, "y")
        p = g1_from_bytes(proof, "proof")
        return self._check(c, zz, yy, p)

    def verify_blob_kzg_proof(self, blob: bytes, commitment: bytes, proof: bytes) -> bool:
        poly = blob_to_polynomial(blob)
        c = g1_from_bytes(commitment, "commitment")
        p = g1_from_bytes(proof, "proof")
        z = compute_challenge(blob, commitment)
        return self._check(c, z, evaluate_polynomial(poly, z), p)

    def verify_blob_kzg_proof_batch(
        self, blobs: Sequence[bytes], commitments: Sequence[bytes], proofs: Sequence[bytes]
    ) -> bool:
        blobs = check_list(blobs, "blobs")
        commitments = check_list(commitments, "commitments")
        proofs = check_list(proofs, "proofs")
        if not len(blobs) == len(commitments) == len(proofs):
            raise KZGError(
                f"blobs, commitments and proofs must have the same length, got "
                f"{len(blobs)}, {len(commitments)} and {len(proofs)}"
            )
        if not blobs:
            return True
        polys = [blob_to_polynomial(b, "blobs", i) for i, b in enumerate(blobs)]
        cs = [g1_from_bytes(c, "commitments", i) for i, c in enumerate(commitments)]
        ps = [g1_from_bytes(p, "proofs", i) for i, p in enumerate(proofs)]
        if len(blobs) == 1:
            z = compute_challenge(blobs[0], commitments[0])
            return self._check(cs[0], z, evaluate_polynomial(polys[0], z), ps[0])
        zs = [compute_challenge(b, c) for b, c in zip(blobs, commitments, strict=True)]
        ys = [evaluate_polynomial(poly, z) for poly, z in zip(polys, zs, strict=True)]
        r = batch_challenge(commitments, zs, ys, proofs)
        powers = compute_powers(r, len(blobs))
        proof_lincomb = g1_lincomb(ps, powers)
        # Σ rⁱ·Cᵢ + Σ rⁱzᵢ·πᵢ − [Σ rⁱyᵢ]G1 in one multi-scalar multiplication.
        weights = powers + [p * z % BLS_MODULUS for p, z in zip(powers, zs, strict=True)]
        rhs = g1_lincomb(cs + ps, weights)
        rhs = rhs + g1_generator_mul(-sum(p * y for p, y in zip(powers, ys, strict=True)))
        return bool(proof_lincomb.pair(self._g2_tau) == rhs.pair(self._g2_generator))

    # -- EIP-7594 ---------------------------------------------------------------------

    def compute_cells(self, blob: bytes) -> list[bytes]:
        return self._cells.compute_cells(blob)

    def compute_cells_and_kzg_proofs(self, blob: bytes) -> tuple[list[bytes], list[bytes]]:
        return self._cells.compute_cells_and_kzg_proofs(blob)

    def recover_cells_and_kzg_proofs(
        self, cell_indices: Sequence[int], cells: Sequence[bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        return self._cells.recover_cells_and_kzg_proofs(cell_indices, cells)

    def verify_cell_kzg_proof_batch(
        self,
        commitments: Sequence[bytes],
        cell_indices: Sequence[int],
        cells: Sequence[bytes],
        proofs: Sequence[bytes],
    ) -> bool:
        return self._cells.verify_cell_kzg_proof_batch(commitments, cell_indices, cells, proofs)
