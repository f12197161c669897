"""Engine registry: the same byte-level API over our blspy engine and c-kzg-4844."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import KZGError
from .setup import bundled_setup_path


@runtime_checkable
class Engine(Protocol):
    """The KZG operations of EIP-4844 and EIP-7594, bytes in and bytes out."""

    name: str

    def blob_to_kzg_commitment(self, blob: bytes) -> bytes: ...
    def compute_kzg_proof(self, blob: bytes, z: bytes) -> tuple[bytes, bytes]: ...
    def compute_blob_kzg_proof(self, blob: bytes, commitment: bytes) -> bytes: ...
    def verify_kzg_proof(self, commitment: bytes, z: bytes, y: bytes, proof: bytes) -> bool: ...
    def verify_blob_kzg_proof(self, blob: bytes, commitment: bytes, proof: bytes) -> bool: ...
    def verify_blob_kzg_proof_batch(
        self, blobs: list[bytes], commitments: list[bytes], proofs: list[bytes]
    ) -> bool: ...
    def compute_cells(self, blob: bytes) -> list[bytes]: ...
    def compute_cells_and_kzg_proofs(self, blob: bytes) -> tuple[list[bytes], list[bytes]]: ...
    def recover_cells_and_kzg_proofs(
        self, cell_indices: list[int], cells: list[bytes]
    ) -> tuple[list[bytes], list[bytes]]: ...
    def verify_cell_kzg_proof_batch(
        self,
        commitments: list[bytes],
        cell_indices: list[int],
        cells: list[bytes],
        proofs: list[bytes],
    ) -> bool: ...


ENGINE_NAMES = ("blspy", "ckzg")


def load_engine(
    name: str = "blspy",
    trusted_setup: str | Path | None = None,
    cache_dir: str | Path | None = None,
    table_windows: int | None = None,
) -> Engine:
    """Return a ready engine by name, over the bundled mainnet setup unless a path is given.
    ``cache_dir`` holds the blspy engine's precomputed tables (see ``kzg.cache``);
    ``table_windows`` (blspy) trades commitment speed for a smaller, faster-loading table."""
    if name == "ckzg":
        from .ckzg_engine import CkzgEngine

        return CkzgEngine(trusted_setup or bundled_setup_path())
    if name == "blspy":
        from .blspy_engine import BlspyEngine

        return BlspyEngine(trusted_setup, cache_dir=cache_dir, table_windows=table_windows)
    raise KZGError(f"unknown engine {name!r}, expected one of {ENGINE_NAMES}", "engine")
