"""Times the blspy engine against c-kzg-4844 in one run and prints, per operation, both
times and the ratio blspy/ckzg, for random blobs and rollup-style blobs (31-byte packed,
~60% full); then the EIP-7594 cell operations against ckzg loaded without and with its
precomputation (precompute=0 is c-kzg's default, 8 what the gateway's ckzg engine uses).

    python bench/kzg_engines.py [--repeat N] [--batch 16] [--cache-dir D] [--eip4844-only]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kzg import load_engine
from kzg.ckzg_engine import CkzgEngine
from kzg.eip7594.engine import CellEngine
from kzg.field import BLS_MODULUS, BYTES_PER_BLOB, FIELD_ELEMENTS_PER_BLOB
from kzg.setup import bundled_setup_path, read_setup_bytes


def random_blob(rng: random.Random) -> bytes:
    return b"".join(
        rng.randrange(BLS_MODULUS).to_bytes(32, "big") for _ in range(FIELD_ELEMENTS_PER_BLOB)
    )


def rollup_blob(rng: random.Random, fill: float = 0.6) -> bytes:
    used = int(FIELD_ELEMENTS_PER_BLOB * fill)
    return b"".join(b"\0" + rng.randbytes(31) for _ in range(used)).ljust(BYTES_PER_BLOB, b"\0")


def best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) if repeat < 5 else statistics.median(times)


def operations(engine: Any, blobs: list[bytes], batch: int) -> dict[str, Callable[[], Any]]:
    blob = blobs[0]
    commitments = [engine.blob_to_kzg_commitment(b) for b in blobs[:batch]]
    proofs = [engine.compute_blob_kzg_proof(b, c) for b, c in zip(blobs, commitments, strict=False)]
    z = (BLS_MODULUS - 12345).to_bytes(32, "big")
    proof, y = engine.compute_kzg_proof(blob, z)
    return {
        "blob_to_kzg_commitment": lambda: engine.blob_to_kzg_commitment(blob),
        "compute_kzg_proof": lambda: engine.compute_kzg_proof(blob, z),
        "compute_blob_kzg_proof": lambda: engine.compute_blob_kzg_proof(blob, commitments[0]),
        "verify_kzg_proof": lambda: engine.verify_kzg_proof(commitments[0], z, y, proof),
        "verify_blob_kzg_proof": lambda: engine.verify_blob_kzg_proof(
            blob, commitments[0], proofs[0]
        ),
        f"verify_blob_kzg_proof_batch[{batch}]": lambda: engine.verify_blob_kzg_proof_batch(
            blobs[:batch], commitments, proofs
        ),
    }


def cell_operations(engine: Any, blob: bytes) -> dict[str, Callable[[], Any]]:
    cells, proofs = engine.compute_cells_and_kzg_proofs(blob)
    commitment = engine.blob_to_kzg_commitment(blob)
    half = list(range(0, 128, 2))
    return {
        "compute_cells": lambda: engine.compute_cells(blob),
        "compute_cells_and_kzg_proofs": lambda: engine.compute_cells_and_kzg_proofs(blob),
        "recover_cells_and_kzg_proofs[64 of 128]": lambda: engine.recover_cells_and_kzg_proofs(
            half, [cells[i] for i in half]
        ),
        "verify_cell_kzg_proof_batch[128]": lambda: engine.verify_cell_kzg_proof_batch(
            [commitment] * 128, list(range(128)), cells, proofs
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--eip4844-only", action="store_true", help="skip the cell operations")
    args = parser.parse_args()

    cache_dir = args.cache_dir or Path(tempfile.mkdtemp(prefix="kzg-bench-"))
    start = time.perf_counter()
    blspy = load_engine("blspy", cache_dir=cache_dir)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    blspy = load_engine("blspy", cache_dir=cache_dir)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    ckzg = load_engine("ckzg")
    ckzg_load = time.perf_counter() - start
    print(
        f"engine load: blspy cold {cold:.2f} s (table built: {not blspy.table_from_cache}), "
        f"blspy warm {warm:.2f} s, ckzg {ckzg_load:.2f} s"
    )

    rng = random.Random(1)
    workloads = {
        "random": [random_blob(rng) for _ in range(args.batch)],
        "rollup": [rollup_blob(rng) for _ in range(args.batch)],
    }
    print(f"{'operation':40} {'blobs':7} {'blspy ms':>10} {'ckzg ms':>10} {'ratio':>7}")
    for kind, blobs in workloads.items():
        ours = operations(blspy, blobs, args.batch)
        theirs = operations(ckzg, blobs, args.batch)
        for name, fn in ours.items():
            t_ours = best(fn, args.repeat)
            t_theirs = best(theirs[name], args.repeat)
            print(
                f"{name:40} {kind:7} {t_ours * 1e3:10.2f} {t_theirs * 1e3:10.2f} "
                f"{t_ours / t_theirs:6.2f}x"
            )

    if args.eip4844_only:
        return 0
    # The cells' own precomputation (FK20 tables) alone, warm from the cache.
    setup_bytes = read_setup_bytes(blspy.setup_path)
    start = time.perf_counter()
    cells = CellEngine(setup_bytes, blspy.cache_dir, lambda: blspy.setup)
    cells_warm = time.perf_counter() - start
    print(
        f"\nEIP-7594 precomputation warm load: {cells_warm:.2f} s (from cache: {cells.from_cache})"
    )
    ckzg_plain = CkzgEngine(bundled_setup_path(), precompute=0)
    blob = workloads["random"][0]
    ours = cell_operations(blspy, blob)
    peers = {"p0": cell_operations(ckzg_plain, blob), "p8": cell_operations(ckzg, blob)}
    print(
        f"\n{'EIP-7594 operation':40} {'blspy ms':>10} {'ckzg p0':>10} {'ratio':>7} "
        f"{'ckzg p8':>10} {'ratio':>7}"
    )
    for name, fn in ours.items():
        t_ours = best(fn, args.repeat)
        t_p0 = best(peers["p0"][name], args.repeat)
        t_p8 = best(peers["p8"][name], args.repeat)
        print(
            f"{name:40} {t_ours * 1e3:10.1f} {t_p0 * 1e3:10.1f} {t_ours / t_p0:6.2f}x "
            f"{t_p8 * 1e3:10.1f} {t_ours / t_p8:6.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
