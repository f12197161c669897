"""The nine KZG routes: parse and validate, run the engine in the worker pool, answer
with the result and its receipt (the audit entry and its inclusion proof). Route names are the engine function names."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.appkeys import KZG_POOL, METRICS
from gateway.context import REQUEST_CONTEXT
from gateway.errors import ApiError, bad_request
from gateway.limits import read_body
from gateway.openapi import HEX, RouteDoc, document_route
from gateway.pool import PoolClosed, PoolSaturated, WorkerCrashed
from gateway.receipts import ReceiptResponse, input_digest
from kzg import KZGError

BYTES_PER_BLOB = 131072
BYTES_PER_CELL = 2048
BYTES48, BYTES32 = 48, 32
CELLS_PER_EXT_BLOB = 128
OCTET_STREAM = "application/octet-stream"
JSON = "application/json"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Field:
    """One input: ``kind`` is "bytes", "bytes_list" or "index_list"."""

    name: str
    size: int = 0
    kind: str = "bytes"
    max_items: int = 0

    def schema(self) -> dict[str, Any]:
        if self.kind == "index_list":
            item: dict[str, Any] = {
                "type": "integer",
                "minimum": 0,
                "maximum": CELLS_PER_EXT_BLOB - 1,
            }
        else:
            item = {**HEX, "minLength": 2 + 2 * self.size, "maxLength": 2 + 2 * self.size}
        if self.kind == "bytes":
            return item
        return {"type": "array", "items": item, "maxItems": self.max_items}


@dataclass(frozen=True)
class Operation:
    name: str
    path: str
    summary: str
    inputs: tuple[Field, ...]
    output: Callable[[Any], dict[str, Any]]
    output_schema: dict[str, Any]
    body_limit: int
    raw_blob: bool = False


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


_PROOF = {"proof": HEX}
_VALID = {"valid": {"type": "boolean"}}
_CELLS = {"cells": {"type": "array", "items": HEX}, "proofs": {"type": "array", "items": HEX}}


def _valid(result: bool) -> dict[str, Any]:
    return {"valid": bool(result)}


def _cells(result: tuple[list[bytes], list[bytes]]) -> dict[str, Any]:
    cells, proofs = result
    return {"cells": [_hex(c) for c in cells], "proofs": [_hex(p) for p in proofs]}


def operations(max_batch: int = 64, max_cells: int = 1024) -> tuple[Operation, ...]:
    """The KZG operations of the HTTP API with their inputs and body limits."""
    blob = Field("blob", BYTES_PER_BLOB)
    commitment, proof = Field("commitment", BYTES48), Field("proof", BYTES48)
    z, y = Field("z", BYTES32), Field("y", BYTES32)
    one_blob = 320 * 1024
    return (
        Operation("blob_to_kzg_commitment", "/v1/kzg/blob-to-commitment", "Commit to a blob",
                  (blob,), lambda r: {"commitment": _hex(r)}, {"commitment": HEX}, one_blob, raw_blob=True),
        Operation("compute_kzg_proof", "/v1/kzg/compute-proof", "Prove a blob's evaluation at z",
                  (blob, z), lambda r: {"proof": _hex(r[0]), "y": _hex(r[1])}, {**_PROOF, "y": HEX}, one_blob),
        Operation("compute_blob_kzg_proof", "/v1/kzg/compute-blob-proof", "Prove a blob against its commitment",
                  (blob, commitment), lambda r: {"proof": _hex(r)}, _PROOF, one_blob),
        Operation("verify_kzg_proof", "/v1/kzg/verify-proof", "Verify an evaluation proof",
                  (commitment, z, y, proof), _valid, _VALID, 4 * 1024),
        Operation("verify_blob_kzg_proof", "/v1/kzg/verify-blob-proof", "Verify a blob proof",
                  (blob, commitment, proof), _valid, _VALID, one_blob),
        Operation("verify_blob_kzg_proof_batch", "/v1/kzg/verify-blob-proof-batch", "Verify blob proofs in one batch",
                  (Field("blobs", BYTES_PER_BLOB, "bytes_list", max_batch),
                   Field("commitments", BYTES48, "bytes_list", max_batch),
                   Field("proofs", BYTES48, "bytes_list", max_batch)),
                  _valid, _VALID, max_batch * (2 * BYTES_PER_BLOB + 256) + 4096),
        Operation("compute_cells_and_kzg_proofs", "/v1/kzg/compute-cells-and-proofs", "Extend a blob into cells with proofs",
                  (blob,), _cells, _CELLS, one_blob, raw_blob=True),
        Operation("recover_cells_and_kzg_proofs", "/v1/kzg/recover-cells-and-proofs", "Recover all cells and proofs from half",
                  (Field("cell_indices", 0, "index_list", CELLS_PER_EXT_BLOB),
                   Field("cells", BYTES_PER_CELL, "bytes_list", CELLS_PER_EXT_BLOB)),
                  _cells, _CELLS, CELLS_PER_EXT_BLOB * (2 * BYTES_PER_CELL + 16) + 4096),
        Operation("verify_cell_kzg_proof_batch", "/v1/kzg/verify-cell-proof-batch", "Verify cell proofs in one batch",
                  (Field("commitments", BYTES48, "bytes_list", max_cells),
                   Field("cell_indices", 0, "index_list", max_cells),
                   Field("cells", BYTES_PER_CELL, "bytes_list", max_cells),
                   Field("proofs", BYTES48, "bytes_list", max_cells)),
                  _valid, _VALID, max_cells * (2 * BYTES_PER_CELL + 2 * 2 * BYTES48 + 32) + 4096),
    )  # fmt: skip


_HEX_DIGITS = re.compile(r"[0-9a-fA-F]*")


def _parse_hex(value: Any, where: str, size: int) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise bad_request(
            f"invalid_{where.split('[')[0]}", f"{where} must be a 0x-prefixed hex string"
        )
    if len(value) != 2 + 2 * size:
        raise bad_request(
            f"invalid_{where.split('[')[0]}",
            f"{where} must be {size} bytes ({2 + 2 * size} characters with 0x), got {len(value)} characters",
        )
    # bytes.fromhex would skip whitespace; only hex digits are accepted.
    if not _HEX_DIGITS.fullmatch(value, 2):
        raise bad_request(f"invalid_{where.split('[')[0]}", f"{where} is not valid hex")
    return bytes.fromhex(value[2:])


def _parse_field(field: Field, value: Any) -> Any:
    if field.kind == "bytes":
        return _parse_hex(value, field.name, field.size)
    code = f"invalid_{field.name}"
    if not isinstance(value, list):
        raise bad_request(code, f"{field.name} must be a list")
    if len(value) > field.max_items:
        raise bad_request(
            code, f"{field.name} has {len(value)} items, at most {field.max_items} allowed"
        )
    if field.kind == "bytes_list":
        return [_parse_hex(item, f"{field.name}[{i}]", field.size) for i, item in enumerate(value)]
    for i, item in enumerate(value):
        if type(item) is not int or not 0 <= item < CELLS_PER_EXT_BLOB:
            raise bad_request(
                code, f"{field.name}[{i}] must be an integer in [0, {CELLS_PER_EXT_BLOB})"
            )
    return list(value)


def parse_json_inputs(op: Operation, body: bytes) -> list[Any]:
    """Return the engine arguments from a JSON body, or raise a 400 naming the field."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("invalid_json", "the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise bad_request("invalid_json", "the body must be a JSON object")
    names = [f.name for f in op.inputs]
    unknown = sorted(set(document) - set(names))
    if unknown:
        raise bad_request("unknown_field", f"{unknown[0]} is not a field of {op.name}")
    missing = [n for n in names if n not in document]
    if missing:
        raise bad_request("missing_field", f"{missing[0]} is required")
    return [_parse_field(f, document[f.name]) for f in op.inputs]


async def parse_inputs(request: web.Request, op: Operation) -> list[Any]:
    content_type = request.content_type
    if op.raw_blob and content_type == OCTET_STREAM:
        body = await read_body(request, BYTES_PER_BLOB)
        if len(body) != BYTES_PER_BLOB:
            raise bad_request(
                "invalid_blob", f"blob must be {BYTES_PER_BLOB} bytes, got {len(body)}"
            )
        return [body]
    if content_type != JSON:
        accepted = f"{JSON} or {OCTET_STREAM}" if op.raw_blob else JSON
        raise ApiError(415, "unsupported_media_type", f"Content-Type must be {accepted}")
    return parse_json_inputs(op, await read_body(request, op.body_limit))


def _handler(op: Operation) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        args = await parse_inputs(request, op)
        digests = {f.name: input_digest(a) for f, a in zip(op.inputs, args, strict=True)}
        ctx.input_digests = digests
        result = await run_operation(request.app, op.name, args)
        return ReceiptResponse(ctx, op.output(result))

    handle.__name__ = op.name
    return handle


# The engine names the offending argument first ("blobs[3]: ..."); its arguments carry
# the request's field names, so the code names the field as the validators' codes do.
_ENGINE_ARGUMENT = re.compile(r"^([a-z_]+)(?:\[\d+\])?: ")
_REQUEST_FIELDS = frozenset(f.name for op in operations() for f in op.inputs)


def _code_for(exc: KZGError) -> str:
    named = _ENGINE_ARGUMENT.match(str(exc))
    if named and named.group(1) in _REQUEST_FIELDS:
        return f"invalid_{named.group(1)}"
    return "invalid_input"


async def run_operation(app: web.Application, name: str, args: list[Any]) -> Any:
    """Run one engine call in the pool; map every failure to its API error."""
    metrics = app[METRICS]
    pool = app[KZG_POOL]
    started = time.perf_counter()
    outcome = "error"
    try:
        result = await pool.call(name, *args)
        outcome = "success"
        return result
    except KZGError as exc:
        outcome = "invalid"
        raise bad_request(_code_for(exc), str(exc)) from None
    except PoolSaturated:
        outcome = "shed"
        retry = str(pool.settings.retry_after_seconds)
        raise ApiError(
            503, "overloaded", "the KZG workers are saturated; retry later", {"Retry-After": retry}
        ) from None
    except NotImplementedError as exc:
        raise ApiError(501, "not_implemented", str(exc)) from None
    except (WorkerCrashed, PoolClosed) as exc:
        raise ApiError(503, "engine_unavailable", str(exc), {"Retry-After": "1"}) from None
    finally:
        metrics.operations.labels(name, outcome).inc()
        metrics.duration.labels(name).observe(time.perf_counter() - started)
        metrics.queue_depth.set(pool.queue_depth)


def add_routes(app: web.Application, ops: tuple[Operation, ...]) -> None:
    """Register the KZG routes (and their documentation)."""
    for op in ops:
        app.router.add_post(op.path, _handler(op), name=op.name)
        document_route(
            op.name,
            RouteDoc(
                summary=op.summary,
                tags=("kzg",),
                request_schema={
                    "type": "object",
                    "additionalProperties": False,
                    "required": [f.name for f in op.inputs],
                    "properties": {f.name: f.schema() for f in op.inputs},
                },
                octet_stream=op.raw_blob,
                response_schema={
                    "type": "object",
                    "required": [*op.output_schema, "receipt"],
                    "properties": {
                        **op.output_schema,
                        "receipt": {"$ref": "#/components/schemas/Receipt"},
                    },
                },
            ),
        )
