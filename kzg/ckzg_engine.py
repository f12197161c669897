"""c-kzg-4844's Python binding behind the engine API: the audited reference."""

from __future__ import annotations

from pathlib import Path

from .errors import KZGError

try:
    import ckzg
except ImportError:  # pragma: no cover - exercised only where the extra is missing
    ckzg = None


class CkzgEngine:
    """Engine backed by c-kzg-4844; raises KZGError on any rejected input."""

    name = "ckzg"

    def __init__(self, trusted_setup: str | Path, precompute: int = 8) -> None:
        if ckzg is None:
            raise KZGError("engine: ckzg is not installed (pip install 'kzg-gateway[ckzg]')")
        self._ts = ckzg.load_trusted_setup(str(trusted_setup), precompute)

    def _call(self, fn_name: str, *args):
        try:
            return getattr(ckzg, fn_name)(*args, self._ts)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise KZGError(f"{fn_name}: rejected by c-kzg-4844 ({exc})") from exc

    def blob_to_kzg_commitment(self, blob: bytes) -> bytes:
        return self._call("blob_to_kzg_commitment", blob)

    def compute_kzg_proof(self, blob: bytes, z: bytes) -> tuple[bytes, bytes]:
        proof, y = self._call("compute_kzg_proof", blob, z)
        return proof, y

    def compute_blob_kzg_proof(self, blob: bytes, commitment: bytes) -> bytes:
        return self._call("compute_blob_kzg_proof", blob, commitment)

    def verify_kzg_proof(self, commitment: bytes, z: bytes, y: bytes, proof: bytes) -> bool:
        return self._call("verify_kzg_proof", commitment, z, y, proof)

    def verify_blob_kzg_proof(self, blob: bytes, commitment: bytes, proof: bytes) -> bool:
        return self._call("verify_blob_kzg_proof", blob, commitment, proof)

    def verify_blob_kzg_proof_batch(
        self, blobs: list[bytes], commitments: list[bytes], proofs: list[bytes]
    ) -> bool:
        if not len(blobs) == len(commitments) == len(proofs):
            raise KZGError(
                "verify_blob_kzg_proof_batch: blobs, commitments, proofs differ in length"
            )
        return self._call(
            "verify_blob_kzg_proof_batch", b"".join(blobs), b"".join(commitments), b"".join(proofs)
        )

    def compute_cells(self, blob: bytes) -> list[bytes]:
        return list(self._call("compute_cells", blob))

    def compute_cells_and_kzg_proofs(self, blob: bytes) -> tuple[list[bytes], list[bytes]]:
        cells, proofs = self._call("compute_cells_and_kzg_proofs", blob)
        return list(cells), list(proofs)

    def recover_cells_and_kzg_proofs(
        self, cell_indices: list[int], cells: list[bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        out_cells, out_proofs = self._call("recover_cells_and_kzg_proofs", cell_indices, cells)
        return list(out_cells), list(out_proofs)

    def verify_cell_kzg_proof_batch(
        self,
        commitments: list[bytes],
        cell_indices: list[int],
        cells: list[bytes],
        proofs: list[bytes],
    ) -> bool:
        return self._call("verify_cell_kzg_proof_batch", commitments, cell_indices, cells, proofs)
