"""The blspy engine and c-kzg-4844 agree on random and edge-case blobs, and both refuse
corrupted proofs; the cached tables rebuild themselves when damaged."""

from __future__ import annotations

import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from kzg import Engine, KZGError, load_engine
from kzg.field import BLS_MODULUS, BYTES_PER_BLOB, FIELD_ELEMENTS_PER_BLOB

R = BLS_MODULUS


def _blob(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(32, "big") for v in values)


def _blobs() -> dict[str, bytes]:
    rng = random.Random(4844)
    n = FIELD_ELEMENTS_PER_BLOB
    # 31 bytes of payload per element, as rollups pack their data, ~60% of the blob used.
    rollup = bytes(1).join(rng.randbytes(31) for _ in range(n * 6 // 10))
    rollup_blob = b"".join(
        bytes(1) + rollup[i * 32 : i * 32 + 31] for i in range(n * 6 // 10)
    ).ljust(BYTES_PER_BLOB, b"\0")
    return {
        "random": _blob([rng.randrange(R) for _ in range(n)]),
        "zeros": bytes(BYTES_PER_BLOB),
        "all_r_minus_1": _blob([R - 1] * n),
        "rollup_31_byte_packed": rollup_blob,
        "partially_empty": _blob([rng.randrange(R) if i < 100 else 0 for i in range(n)]),
        "single_element_last": _blob([0] * (n - 1) + [7]),
    }


BLOBS = _blobs()


@pytest.mark.parametrize("kind", list(BLOBS))
def test_engines_agree_on_commitments_and_proofs(
    blspy_engine: Engine, ckzg_engine: Engine, kind: str
) -> None:
    blob = BLOBS[kind]
    commitment = blspy_engine.blob_to_kzg_commitment(blob)
    assert commitment == ckzg_engine.blob_to_kzg_commitment(blob)
    proof = blspy_engine.compute_blob_kzg_proof(blob, commitment)
    assert proof == ckzg_engine.compute_blob_kzg_proof(blob, commitment)
    z = (R - 5).to_bytes(32, "big")
    assert blspy_engine.compute_kzg_proof(blob, z) == ckzg_engine.compute_kzg_proof(blob, z)
    for eng in (blspy_engine, ckzg_engine):
        assert eng.verify_blob_kzg_proof(blob, commitment, proof) is True


def test_both_refuse_corrupted_proofs(blspy_engine: Engine, ckzg_engine: Engine) -> None:
    blob = BLOBS["random"]
    other = BLOBS["partially_empty"]
    commitment = ckzg_engine.blob_to_kzg_commitment(blob)
    proof = ckzg_engine.compute_blob_kzg_proof(blob, commitment)
    wrong_proof = ckzg_engine.compute_blob_kzg_proof(
        other, ckzg_engine.blob_to_kzg_commitment(other)
    )
    for eng in (blspy_engine, ckzg_engine):
        assert eng.verify_blob_kzg_proof(blob, commitment, wrong_proof) is False
        assert eng.verify_blob_kzg_proof(other, commitment, proof) is False
        flipped = bytearray(proof)
        flipped[-1] ^= 1  # almost surely off the curve or out of the subgroup
        with pytest.raises(KZGError, match="proof"):
            eng.verify_blob_kzg_proof(blob, commitment, bytes(flipped))
        blobs = [blob, other, blob]
        commitments = [eng.blob_to_kzg_commitment(b) for b in blobs]
        proofs = [eng.compute_blob_kzg_proof(b, c) for b, c in zip(blobs, commitments, strict=True)]
        assert eng.verify_blob_kzg_proof_batch(blobs, commitments, proofs) is True
        swapped = [proofs[1], proofs[0], proofs[2]]
        assert eng.verify_blob_kzg_proof_batch(blobs, commitments, swapped) is False


def _refusal(call: Callable[[], object], message: str) -> KZGError:
    """The KZGError ``call`` raises, whose message matches ``message``."""
    with pytest.raises(KZGError, match=message) as refused:
        call()
    return refused.value


def test_errors_name_the_argument_and_index(engine: Engine) -> None:
    # Both engines: c-kzg-4844's own messages name no argument, so the ckzg engine finds
    # the one at fault with the same validators.
    bad = bytearray(BLOBS["random"])
    bad[32 * 17 : 32 * 18] = R.to_bytes(32, "big")
    identity = bytes([0xC0]) + bytes(47)
    zeros = BLOBS["zeros"]
    refusals = [
        (
            _refusal(
                lambda: engine.verify_blob_kzg_proof_batch(
                    [zeros, bytes(bad)], [identity] * 2, [identity] * 2
                ),
                r"^blobs\[1\]: field element 17 is not canonical",
            ),
            ("blobs", 1),
        ),
        (
            _refusal(
                lambda: engine.verify_blob_kzg_proof_batch(
                    [zeros] * 2, [identity] * 2, [identity, b"\xab" * 48]
                ),
                r"^proofs\[1\]: not a valid G1 point",
            ),
            ("proofs", 1),
        ),
        (
            _refusal(
                lambda: engine.compute_kzg_proof(zeros, R.to_bytes(32, "big")),
                "^z: not a canonical",
            ),
            ("z", None),
        ),
        (
            _refusal(
                lambda: engine.verify_kzg_proof(b"\x00", bytes(32), bytes(32), bytes(48)),
                "^commitment: expected 48 bytes",
            ),
            ("commitment", None),
        ),
        (
            _refusal(
                lambda: engine.verify_cell_kzg_proof_batch(
                    [identity], [0], [R.to_bytes(32, "big") * 64], [identity]
                ),
                r"^cells\[0\]: field element 0 is not canonical",
            ),
            ("cells", 0),
        ),
    ]
    for exc, (argument, index) in refusals:
        assert (exc.argument, exc.index) == (argument, index)
        assert str(exc) == f"{exc.where}: {exc.reason}"
        # Refusals reach the gateway from the engine workers by pickle, fields and all.
        copy = pickle.loads(pickle.dumps(exc))
        assert (copy.argument, copy.index, copy.reason, str(copy)) == (
            argument,
            index,
            exc.reason,
            str(exc),
        )


def test_corrupt_table_cache_is_rebuilt(
    tmp_path: Path, blspy_engine: Engine, kzg_cache_dir: Path
) -> None:
    # Only the Lagrange table is under test: reuse the session's cell precomputation.
    for cached in kzg_cache_dir.glob("fk20-*.bin"):
        shutil.copy(cached, tmp_path / cached.name)
    first = load_engine("blspy", cache_dir=tmp_path)
    assert first.table_from_cache is False
    (table,) = tmp_path.glob("lagrange-*.bin")
    data = bytearray(table.read_bytes())
    data[-100] ^= 0xFF
    table.write_bytes(bytes(data))
    rebuilt = load_engine("blspy", cache_dir=tmp_path)
    assert rebuilt.table_from_cache is False
    warm = load_engine("blspy", cache_dir=tmp_path)
    assert warm.table_from_cache is True
    blob = BLOBS["random"]
    assert warm.blob_to_kzg_commitment(blob) == first.blob_to_kzg_commitment(blob)


def test_compact_table_gives_the_same_results(
    tmp_path: Path, blspy_engine: Engine, ckzg_engine: Engine, kzg_cache_dir: Path
) -> None:
    for cached in kzg_cache_dir.glob("fk20-*.bin"):
        shutil.copy(cached, tmp_path / cached.name)
    compact = load_engine("blspy", cache_dir=tmp_path, table_windows=7)
    assert len(compact._lagrange.rows) == 7  # type: ignore[attr-defined]
    for kind in ("random", "rollup_31_byte_packed", "all_r_minus_1"):
        blob = BLOBS[kind]
        commitment = ckzg_engine.blob_to_kzg_commitment(blob)
        assert compact.blob_to_kzg_commitment(blob) == commitment, kind
        assert compact.compute_blob_kzg_proof(blob, commitment) == (
            ckzg_engine.compute_blob_kzg_proof(blob, commitment)
        ), kind
