"""The KZG operations as the client sees them: their routes and inputs, the typed results
they answer with, and the batch items (``Operation``).

Inputs go out as the API's ``0x`` hex (a lone blob as raw bytes, half the upload); the
digests the audit entry must name are computed from the very bytes sent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.client._errors import InvalidResponse
from gateway.client._receipts import (
    Receipt,
    VerifiedReceipt,
    input_digest,
    kzg_to_versioned_hash,
)

__all__ = [
    "BatchItemError",
    "BatchResult",
    "BlobProofResult",
    "CellsResult",
    "CommitmentResult",
    "KZGProofResult",
    "Operation",
    "Result",
    "VerifyResult",
]

BYTES_PER_COMMITMENT = BYTES_PER_PROOF = 48
BYTES_PER_FIELD_ELEMENT = 32
BYTES_PER_CELL = 2048
CELLS_PER_EXT_BLOB = 128
VERSIONED_HASH_SIZE = 32


@dataclass(frozen=True, kw_only=True)
class Result:
    """What every answer carries: its ``receipt`` (verified before the result was
    returned, unless the client was built with ``verify_receipts=False``), what the
    verification proved (``verified``), the gateway's ``request_id`` and the whole
    ``answer`` the receipt binds (for a batch item, the whole batch answer)."""

    receipt: Receipt = field(repr=False)
    request_id: str
    verified: VerifiedReceipt | None = field(default=None, repr=False, compare=False)
    answer: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def save_answer(self, path: str | os.PathLike[str]) -> Path:
        """Write the whole answer as JSON: ``kzg-gateway audit verify-receipt FILE --key
        VKEY`` then also checks that the entry's ``result_digest`` is this answer's."""
        target = Path(path)
        target.write_text(json.dumps(self.answer, indent=1) + "\n", encoding="utf-8")
        return target


@dataclass(frozen=True, kw_only=True)
class CommitmentResult(Result):
    """``blob_to_kzg_commitment``: the commitment and its EIP-4844 versioned hash."""

    commitment: bytes
    versioned_hash: bytes


@dataclass(frozen=True, kw_only=True)
class KZGProofResult(Result):
    """``compute_kzg_proof``: the proof and the evaluation ``y = p(z)``."""

    proof: bytes
    y: bytes


@dataclass(frozen=True, kw_only=True)
class BlobProofResult(Result):
    """``compute_blob_kzg_proof``."""

    proof: bytes


@dataclass(frozen=True, kw_only=True)
class VerifyResult(Result):
    """The ``verify_*`` operations: ``valid`` is the verdict (an invalid proof is an
    answer, not an error)."""

    valid: bool


@dataclass(frozen=True, kw_only=True)
class CellsResult(Result):
    """``compute_cells_and_kzg_proofs`` (which also commits: ``commitment`` and
    ``versioned_hash``) and ``recover_cells_and_kzg_proofs`` (where both are None)."""

    cells: tuple[bytes, ...]
    proofs: tuple[bytes, ...]
    commitment: bytes | None = None
    versioned_hash: bytes | None = None


@dataclass(frozen=True)
class BatchItemError:
    """A batch item the gateway refused; the other items still have their results."""

    index: int
    code: str
    message: str


@dataclass(frozen=True, kw_only=True)
class BatchResult(Result):
    """``batch``: one result (or ``BatchItemError``) per operation, in order, under one
    receipt; every item result carries that receipt and request id."""

    results: tuple[Result | BatchItemError, ...]

    @property
    def errors(self) -> list[BatchItemError]:
        return [r for r in self.results if isinstance(r, BatchItemError)]


# ---- decoding answers ----------------------------------------------------------------


def _hex(value: Any, what: str, size: int) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 2 + 2 * size:
        raise InvalidResponse(f"{what}: expected {size} bytes of 0x-prefixed hex")
    try:
        return bytes.fromhex(value[2:])
    except ValueError:
        raise InvalidResponse(f"{what}: not hex") from None


def _hex_list(value: Any, what: str, size: int, count: int | None) -> tuple[bytes, ...]:
    if not isinstance(value, list) or (count is not None and len(value) != count):
        raise InvalidResponse(f"{what}: expected a list of {count} items")
    return tuple(_hex(item, f"{what}[{i}]", size) for i, item in enumerate(value))


def _versioned(body: Mapping[str, Any], commitment: bytes) -> bytes:
    """The versioned hash, computed here; one the gateway sent must agree."""
    computed = kzg_to_versioned_hash(commitment)
    if "versioned_hash" in body:
        sent = _hex(body["versioned_hash"], "versioned_hash", VERSIONED_HASH_SIZE)
        if sent != computed:
            raise InvalidResponse("versioned_hash is not 0x01 || SHA-256(commitment)[1:]")
    return computed


def _commitment(body: Mapping[str, Any]) -> dict[str, Any]:
    commitment = _hex(body.get("commitment"), "commitment", BYTES_PER_COMMITMENT)
    return {"commitment": commitment, "versioned_hash": _versioned(body, commitment)}


def _kzg_proof(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "proof": _hex(body.get("proof"), "proof", BYTES_PER_PROOF),
        "y": _hex(body.get("y"), "y", BYTES_PER_FIELD_ELEMENT),
    }


def _blob_proof(body: Mapping[str, Any]) -> dict[str, Any]:
    return {"proof": _hex(body.get("proof"), "proof", BYTES_PER_PROOF)}


def _verdict(body: Mapping[str, Any]) -> dict[str, Any]:
    valid = body.get("valid")
    if not isinstance(valid, bool):
        raise InvalidResponse("valid: expected true or false")
    return {"valid": valid}


def _cells(body: Mapping[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "cells": _hex_list(body.get("cells"), "cells", BYTES_PER_CELL, CELLS_PER_EXT_BLOB),
        "proofs": _hex_list(body.get("proofs"), "proofs", BYTES_PER_PROOF, CELLS_PER_EXT_BLOB),
    }
    if "commitment" in body:
        fields.update(_commitment(body))
    return fields


# ---- the operations ------------------------------------------------------------------

BYTES, BYTES_LIST, INDEX_LIST = "bytes", "bytes_list", "index_list"


@dataclass(frozen=True)
class OperationSpec:
    """One KZG route: engine name, path, inputs ``(name, kind)``, how its answer decodes."""

    name: str
    path: str
    inputs: tuple[tuple[str, str], ...]
    result: type[Result]
    decode: Callable[[Mapping[str, Any]], dict[str, Any]]
    raw_blob: bool = False

    def encode(self, args: Sequence[Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Return the inputs as bytes (lists of bytes, lists of ints) by field name, and the
        digests the audit entry must name for them."""
        if len(args) != len(self.inputs):
            raise TypeError(f"{self.name} takes {len(self.inputs)} arguments, got {len(args)}")
        raw = {
            name: _coerce(name, kind, value)
            for (name, kind), value in zip(self.inputs, args, strict=True)
        }
        return raw, {name: input_digest(value) for name, value in raw.items()}

    def to_json(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON body of the inputs: bytes as 0x hex, indices as numbers."""
        return {
            name: raw[name] if kind == INDEX_LIST else _to_hex(raw[name])
            for name, kind in self.inputs
        }

    def parse(self, body: Mapping[str, Any], **common: Any) -> Result:
        return self.result(**self.decode(body), **common)


def _bytes(name: str, value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{name}: expected bytes, got {type(value).__name__}")


def _coerce(name: str, kind: str, value: Any) -> bytes | list[bytes] | list[int]:
    if kind == BYTES:
        return _bytes(name, value)
    if isinstance(value, bytes | bytearray | memoryview | str) or not isinstance(value, Iterable):
        raise TypeError(f"{name}: expected a list")
    if kind == BYTES_LIST:
        return [_bytes(f"{name}[{i}]", item) for i, item in enumerate(value)]
    indices = list(value)
    for i, item in enumerate(indices):
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{name}[{i}]: expected an int")
    return indices


def _to_hex(raw: bytes | list[bytes]) -> str | list[str]:
    if isinstance(raw, bytes):
        return "0x" + raw.hex()
    return ["0x" + item.hex() for item in raw]


_BLOB = ("blob", BYTES)
SPECS: dict[str, OperationSpec] = {
    spec.name: spec
    for spec in (
        OperationSpec("blob_to_kzg_commitment", "/v1/kzg/blob-to-commitment",
                      (_BLOB,), CommitmentResult, _commitment, raw_blob=True),
        OperationSpec("compute_kzg_proof", "/v1/kzg/compute-proof",
                      (_BLOB, ("z", BYTES)), KZGProofResult, _kzg_proof),
        OperationSpec("compute_blob_kzg_proof", "/v1/kzg/compute-blob-proof",
                      (_BLOB, ("commitment", BYTES)), BlobProofResult, _blob_proof),
        OperationSpec("verify_kzg_proof", "/v1/kzg/verify-proof",
                      (("commitment", BYTES), ("z", BYTES), ("y", BYTES), ("proof", BYTES)),
                      VerifyResult, _verdict),
        OperationSpec("verify_blob_kzg_proof", "/v1/kzg/verify-blob-proof",
                      (_BLOB, ("commitment", BYTES), ("proof", BYTES)), VerifyResult, _verdict),
        OperationSpec("verify_blob_kzg_proof_batch", "/v1/kzg/verify-blob-proof-batch",
                      (("blobs", BYTES_LIST), ("commitments", BYTES_LIST), ("proofs", BYTES_LIST)),
                      VerifyResult, _verdict),
        OperationSpec("compute_cells_and_kzg_proofs", "/v1/kzg/compute-cells-and-proofs",
                      (_BLOB,), CellsResult, _cells, raw_blob=True),
        OperationSpec("recover_cells_and_kzg_proofs", "/v1/kzg/recover-cells-and-proofs",
                      (("cell_indices", INDEX_LIST), ("cells", BYTES_LIST)), CellsResult, _cells),
        OperationSpec("verify_cell_kzg_proof_batch", "/v1/kzg/verify-cell-proof-batch",
                      (("commitments", BYTES_LIST), ("cell_indices", INDEX_LIST),
                       ("cells", BYTES_LIST), ("proofs", BYTES_LIST)),
                      VerifyResult, _verdict),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Operation:
    """One item of a ``batch``, built like the single call:
    ``Operation.compute_kzg_proof(blob, z)``."""

    name: str
    args: tuple[Any, ...]
    # Checked and hashed once, when built: wrong arguments fail here, not in the batch.
    raw: dict[str, Any] = field(init=False, repr=False, compare=False)
    digests: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.name not in SPECS:
            raise ValueError(f"unknown operation {self.name!r}")
        raw, digests = SPECS[self.name].encode(self.args)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "digests", digests)

    def to_json(self) -> dict[str, Any]:
        """The batch item: ``{"operation": name, ...inputs}``."""
        return {"operation": self.name, **SPECS[self.name].to_json(self.raw)}

    @classmethod
    def blob_to_kzg_commitment(cls, blob: bytes) -> Operation:
        return cls("blob_to_kzg_commitment", (blob,))

    @classmethod
    def compute_kzg_proof(cls, blob: bytes, z: bytes) -> Operation:
        return cls("compute_kzg_proof", (blob, z))

    @classmethod
    def compute_blob_kzg_proof(cls, blob: bytes, commitment: bytes) -> Operation:
        return cls("compute_blob_kzg_proof", (blob, commitment))

    @classmethod
    def verify_kzg_proof(cls, commitment: bytes, z: bytes, y: bytes, proof: bytes) -> Operation:
        return cls("verify_kzg_proof", (commitment, z, y, proof))

    @classmethod
    def verify_blob_kzg_proof(cls, blob: bytes, commitment: bytes, proof: bytes) -> Operation:
        return cls("verify_blob_kzg_proof", (blob, commitment, proof))

    @classmethod
    def verify_blob_kzg_proof_batch(
        cls, blobs: Sequence[bytes], commitments: Sequence[bytes], proofs: Sequence[bytes]
    ) -> Operation:
        return cls("verify_blob_kzg_proof_batch", (blobs, commitments, proofs))

    @classmethod
    def compute_cells_and_kzg_proofs(cls, blob: bytes) -> Operation:
        return cls("compute_cells_and_kzg_proofs", (blob,))

    @classmethod
    def recover_cells_and_kzg_proofs(
        cls, cell_indices: Sequence[int], cells: Sequence[bytes]
    ) -> Operation:
        return cls("recover_cells_and_kzg_proofs", (cell_indices, cells))

    @classmethod
    def verify_cell_kzg_proof_batch(
        cls,
        commitments: Sequence[bytes],
        cell_indices: Sequence[int],
        cells: Sequence[bytes],
        proofs: Sequence[bytes],
    ) -> Operation:
        return cls("verify_cell_kzg_proof_batch", (commitments, cell_indices, cells, proofs))
