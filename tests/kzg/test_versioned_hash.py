"""``kzg_to_versioned_hash`` against an implementation written here from the text of
EIP-4844, on the commitments of the official consensus-spec vectors."""

from __future__ import annotations

import hashlib

import pytest

from kzg import KZGError
from kzg.eip4844 import VERSIONED_HASH_VERSION_KZG, kzg_to_versioned_hash
from tests.kzg.vectors import cases, decode


def eip4844_versioned_hash(commitment: bytes) -> bytes:
    """EIP-4844, "Helpers": ``VERSIONED_HASH_VERSION_KZG + sha256(commitment)[1:]`` with
    ``VERSIONED_HASH_VERSION_KZG = Bytes1(0x01)``."""
    return b"\x01" + hashlib.sha256(commitment).digest()[1:]


def _vector_commitments() -> list[bytes]:
    """Every distinct well-formed commitment the official vectors hold: the outputs of
    blob_to_kzg_commitment and the commitment inputs of the proof verifications."""
    found = [decode(c.output) for c in cases("blob_to_kzg_commitment") if not c.must_fail]
    for function in ("verify_kzg_proof", "verify_blob_kzg_proof"):
        found += [decode(c.input["commitment"]) for c in cases(function)]
    found += [
        decode(c)
        for case in cases("verify_blob_kzg_proof_batch")
        for c in case.input["commitments"]
    ]
    return sorted({c for c in found if isinstance(c, bytes) and len(c) == 48})


COMMITMENTS = _vector_commitments()


def test_the_vectors_hold_commitments(spec_tests_dir: object) -> None:
    # At least the commitments of the seven valid blob_to_kzg_commitment cases.
    assert len(COMMITMENTS) >= 7


@pytest.mark.parametrize("commitment", COMMITMENTS, ids=[c.hex()[:12] for c in COMMITMENTS])
def test_versioned_hash_matches_the_eip(commitment: bytes) -> None:
    versioned = kzg_to_versioned_hash(commitment)
    assert versioned == eip4844_versioned_hash(commitment)
    assert len(versioned) == 32 and versioned[0] == VERSIONED_HASH_VERSION_KZG == 0x01


def test_the_empty_blobs_versioned_hash() -> None:
    # The commitment of the all-zero blob is the point at infinity; its versioned hash is
    # the one blob transactions of empty blobs carry on every network.
    infinity = bytes([0xC0]) + bytes(47)
    expected = bytes.fromhex("010657f37554c781402a22917dee2f75def7ab966d7b770905398eba3c444014")
    assert kzg_to_versioned_hash(infinity) == eip4844_versioned_hash(infinity) == expected


@pytest.mark.parametrize("bad", [b"", bytes(47), bytes(49), "0x" + "00" * 48])
def test_anything_but_48_bytes_is_refused_naming_the_commitment(bad: object) -> None:
    with pytest.raises(KZGError, match=r"^commitment: "):
        kzg_to_versioned_hash(bad)  # type: ignore[arg-type]
