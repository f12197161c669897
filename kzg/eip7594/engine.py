"""The EIP-7594 operations over a validated setup, with the FK20 precomputation cached."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from blspy import G1Element, G2Element

from .. import cache
from ..errors import KZGError
from ..setup import BYTES_PER_G1, Point, SetupBytes, TrustedSetup
from ..validate import (
    blob_to_polynomial,
    cell_to_evals,
    check_bytes,
    check_cell_index,
    check_list,
    g1_from_bytes,
)
from . import fk20
from .cells import (
    CELLS_PER_EXT_BLOB,
    FIELD_ELEMENTS_PER_CELL,
    blob_coefficients,
    cells_from_coefficients,
)
from .recovery import recover_coefficients
from .verify import verify_batch

_VERSION = 3


def _setup_point(cls: type[Point], encoded: Sequence[bytes], index: int, what: str) -> Point:
    try:
        return cls.from_bytes(encoded[index])
    except (ValueError, RuntimeError) as exc:
        raise KZGError(f"trusted setup: {what}[{index}] is not a valid point") from exc


class CellEngine:
    """Cells, proofs, recovery and verification. The FK20 tables are built from the
    setup's monomial points (validated on a cold start) and cached; the points the
    verification equation uses are always read from the setup itself, not the cache."""

    def __init__(
        self,
        setup_bytes: SetupBytes,
        cache_dir: Path,
        load_setup: Callable[[], TrustedSetup],
    ) -> None:
        n = FIELD_ELEMENTS_PER_CELL
        # The table is derived from a setup file whose every point was validated before
        # it was cached (the file's SHA-256 keys the cache); these few are checked again.
        self.monomial = [
            _setup_point(G1Element, setup_bytes.g1_monomial, i, "g1_monomial") for i in range(n)
        ]
        self.g2_generator = _setup_point(G2Element, setup_bytes.g2_monomial, 0, "g2_monomial")
        self.g2_tau_n = _setup_point(G2Element, setup_bytes.g2_monomial, n, "g2_monomial")
        meta = {
            "kind": "fk20",
            "version": _VERSION,
            "chunks": fk20.CHUNKS,
            "setup_sha256": setup_bytes.sha256,
        }
        path = cache.table_path(cache_dir, "fk20", meta)
        payload = cache.read_table(path, meta)
        per_column = fk20.CHUNKS * fk20.L
        if payload is None or len(payload) != fk20.SIZE * per_column * BYTES_PER_G1:
            self.columns = fk20.precompute(load_setup().g1_monomial)
            cache.write_table(path, meta, b"".join(bytes(p) for col in self.columns for p in col))
            self.from_cache = False
            return
        unchecked = G1Element.from_bytes_unchecked
        points = [
            unchecked(payload[i : i + BYTES_PER_G1]) for i in range(0, len(payload), BYTES_PER_G1)
        ]
        self.columns = [points[j : j + per_column] for j in range(0, len(points), per_column)]
        self.from_cache = True

    def compute_cells(self, blob: bytes) -> list[bytes]:
        return cells_from_coefficients(blob_coefficients(blob_to_polynomial(blob)))

    def _cells_and_proofs(self, coefficients: list[int]) -> tuple[list[bytes], list[bytes]]:
        cells = cells_from_coefficients(coefficients)
        return cells, [bytes(p) for p in fk20.proofs(coefficients, self.columns)]

    def compute_cells_and_kzg_proofs(self, blob: bytes) -> tuple[list[bytes], list[bytes]]:
        return self._cells_and_proofs(blob_coefficients(blob_to_polynomial(blob)))

    def recover_cells_and_kzg_proofs(
        self, cell_indices: Sequence[int], cells: Sequence[bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        indices = check_list(cell_indices, "cell_indices")
        cells = check_list(cells, "cells")
        if len(indices) != len(cells):
            raise KZGError(
                f"cell_indices and cells must have the same length, got {len(indices)} and {len(cells)}"
            )
        half = CELLS_PER_EXT_BLOB // 2
        if not half <= len(indices) <= CELLS_PER_EXT_BLOB:
            reason = f"recovery needs {half} to {CELLS_PER_EXT_BLOB} cells, got {len(indices)}"
            raise KZGError(reason, "cells")
        checked = [check_cell_index(v, "cell_indices", i) for i, v in enumerate(indices)]
        for i in range(1, len(checked)):
            if checked[i] == checked[i - 1]:
                raise KZGError(f"duplicate cell index {checked[i]}", "cell_indices", i)
            if checked[i] < checked[i - 1]:
                raise KZGError("indices must be in ascending order", "cell_indices", i)
        evals = [cell_to_evals(c, "cells", i) for i, c in enumerate(cells)]
        return self._cells_and_proofs(recover_coefficients(checked, evals))

    def verify_cell_kzg_proof_batch(
        self,
        commitments: Sequence[bytes],
        cell_indices: Sequence[int],
        cells: Sequence[bytes],
        proofs: Sequence[bytes],
    ) -> bool:
        commitments = check_list(commitments, "commitments")
        indices = check_list(cell_indices, "cell_indices")
        cells = check_list(cells, "cells")
        proofs = check_list(proofs, "proofs")
        if not len(commitments) == len(indices) == len(cells) == len(proofs):
            raise KZGError(
                "commitments, cell_indices, cells and proofs must have the same length, got "
                f"{len(commitments)}, {len(indices)}, {len(cells)} and {len(proofs)}"
            )
        raw = [check_bytes(c, BYTES_PER_G1, "commitments", i) for i, c in enumerate(commitments)]
        checked = [check_cell_index(v, "cell_indices", i) for i, v in enumerate(indices)]
        evals = [cell_to_evals(c, "cells", i) for i, c in enumerate(cells)]
        proof_bytes = [check_bytes(p, BYTES_PER_G1, "proofs", i) for i, p in enumerate(proofs)]
        # Each distinct commitment is parsed once, and named by its first position.
        unique: dict[bytes, int] = {}
        points = []
        for i, c in enumerate(raw):
            if c not in unique:
                unique[c] = len(unique)
                points.append(g1_from_bytes(c, "commitments", i))
        proof_points = [g1_from_bytes(p, "proofs", i) for i, p in enumerate(proof_bytes)]
        if not checked:
            return True
        return verify_batch(
            list(unique),
            points,
            [unique[c] for c in raw],
            checked,
            evals,
            proof_bytes,
            proof_points,
            self.monomial,
            self.g2_tau_n,
            self.g2_generator,
        )
