"""c-kzg-4844's Python binding behind the engine API: the audited reference."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

from .errors import KZGError
from .validate import (
    blob_to_polynomial,
    cell_to_evals,
    check_cell_index,
    field_from_bytes,
    g1_from_bytes,
)

try:
    import ckzg
except ImportError:  # pragma: no cover - exercised only where the extra is missing
    ckzg = None


class CkzgEngine:
    """Engine backed by c-kzg-4844; raises KZGError on any rejected input."""

    name = "ckzg"

    def __init__(self, trusted_setup: str | Path, precompute: int = 8) -> None:
        if ckzg is None:
            raise KZGError("ckzg is not installed (pip install 'kzg-gateway[ckzg]')", "engine")
        self._ts = ckzg.load_trusted_setup(str(trusted_setup), precompute)

    def _call(
        self, fn_name: str, *args: object, named: Iterable[tuple[str, object]] | None = None
    ) -> Any:
        """Call c-kzg-4844. On a refusal, name the argument at fault (c-kzg's message does
        not) by checking the ``named`` arguments (the call's own, by default) with the
        validators both engines share: only on this error path."""
        try:
            return getattr(ckzg, fn_name)(*args, self._ts)
        except (RuntimeError, ValueError, TypeError) as exc:
            pairs = named if named is not None else zip(_ARGUMENTS[fn_name], args, strict=True)
            _raise_first_invalid(pairs)
            raise KZGError(f"{fn_name}: rejected by c-kzg-4844 ({exc})") from exc

    def blob_to_kzg_commitment(self, blob: bytes) -> bytes:
        return cast(bytes, self._call("blob_to_kzg_commitment", blob))

    def compute_kzg_proof(self, blob: bytes, z: bytes) -> tuple[bytes, bytes]:
        proof, y = self._call("compute_kzg_proof", blob, z)
        return proof, y

    def compute_blob_kzg_proof(self, blob: bytes, commitment: bytes) -> bytes:
        return cast(bytes, self._call("compute_blob_kzg_proof", blob, commitment))

    def verify_kzg_proof(self, commitment: bytes, z: bytes, y: bytes, proof: bytes) -> bool:
        return cast(bool, self._call("verify_kzg_proof", commitment, z, y, proof))

    def verify_blob_kzg_proof(self, blob: bytes, commitment: bytes, proof: bytes) -> bool:
        return cast(bool, self._call("verify_blob_kzg_proof", blob, commitment, proof))

    def verify_blob_kzg_proof_batch(
        self, blobs: list[bytes], commitments: list[bytes], proofs: list[bytes]
    ) -> bool:
        if not len(blobs) == len(commitments) == len(proofs):
            raise KZGError(
                "verify_blob_kzg_proof_batch: blobs, commitments, proofs differ in length"
            )
        valid: bool = self._call(
            "verify_blob_kzg_proof_batch",
            b"".join(blobs),
            b"".join(commitments),
            b"".join(proofs),
            named=(("blobs", blobs), ("commitments", commitments), ("proofs", proofs)),
        )
        return valid

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
        valid: bool = self._call(
            "verify_cell_kzg_proof_batch", commitments, cell_indices, cells, proofs
        )
        return valid


# The engine API's argument names of each c-kzg-4844 call, in order.
_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "blob_to_kzg_commitment": ("blob",),
    "compute_kzg_proof": ("blob", "z"),
    "compute_blob_kzg_proof": ("blob", "commitment"),
    "verify_kzg_proof": ("commitment", "z", "y", "proof"),
    "verify_blob_kzg_proof": ("blob", "commitment", "proof"),
    "compute_cells": ("blob",),
    "compute_cells_and_kzg_proofs": ("blob",),
    "recover_cells_and_kzg_proofs": ("cell_indices", "cells"),
    "verify_cell_kzg_proof_batch": ("commitments", "cell_indices", "cells", "proofs"),
}
# How each argument is validated (a list: each item, with its index).
_CHECKS: dict[str, Callable[[object, str, int | None], object]] = {
    "blob": blob_to_polynomial,
    "blobs": blob_to_polynomial,
    "commitment": g1_from_bytes,
    "commitments": g1_from_bytes,
    "proof": g1_from_bytes,
    "proofs": g1_from_bytes,
    "z": field_from_bytes,
    "y": field_from_bytes,
    "cells": cell_to_evals,
    "cell_indices": check_cell_index,
}
_LISTS = frozenset({"blobs", "commitments", "proofs", "cells", "cell_indices"})


def _raise_first_invalid(arguments: Iterable[tuple[str, object]]) -> None:
    """Raise the KZGError of the first argument (or list item) that is invalid."""
    for name, value in arguments:
        check = _CHECKS[name]
        if name in _LISTS and isinstance(value, list | tuple):
            for i, item in enumerate(value):
                check(item, name, i)
        else:
            check(value, name, None)
