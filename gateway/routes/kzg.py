"""The KZG routes: parse and validate, run the engine in the worker pool, answer with the
result and its receipt (the audit entry and its inclusion proof). Route names are the
engine function names; ``kzg_batch`` runs several of them in parallel as one request.

Answers that carry a commitment also carry its EIP-4844 ``versioned_hash``. Under
``[engine] cross_check`` every result was computed by both engines, and a disagreement
answers 500 ``engine_disagreement`` with nothing of the result, audited with the digest
of what each engine would have answered.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.appkeys import CONFIG, KZG_POOL, METRICS
from gateway.config import ConfigError
from gateway.context import REQUEST_CONTEXT, RequestContext
from gateway.errors import ApiError, bad_request
from gateway.limits import JsonTooDeep, parse_json, read_body
from gateway.openapi import HEX, RouteDoc, document_route
from gateway.pool import (
    ENGINE_SHARE,
    EngineDisagreement,
    Outcome,
    PoolClosed,
    PoolSaturated,
    ShareExceeded,
    WorkerCrashed,
)
from gateway.receipts import ReceiptResponse, input_digest, result_digest
from kzg import Engine, KZGError
from kzg.eip4844 import kzg_to_versioned_hash

BYTES_PER_BLOB = 131072
BYTES_PER_CELL = 2048
BYTES48, BYTES32 = 48, 32
CELLS_PER_EXT_BLOB = 128
OCTET_STREAM = "application/octet-stream"
JSON = "application/json"
MiB = 1024 * 1024
BATCH_PATH = "/v1/kzg/batch"


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
    """``function`` is what a worker runs: the engine method of the operation's name, or
    a module-level ``function(engine, *inputs)``."""

    name: str
    path: str
    summary: str
    inputs: tuple[Field, ...]
    output: Callable[[Any], dict[str, Any]]
    output_schema: dict[str, Any]
    body_limit: int
    raw_blob: bool = False
    function: str | Callable[..., Any] = ""

    @property
    def call(self) -> str | Callable[..., Any]:
        return self.function or self.name


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


_PROOF = {"proof": HEX}
_VALID = {"valid": {"type": "boolean"}}
_CELLS = {"cells": {"type": "array", "items": HEX}, "proofs": {"type": "array", "items": HEX}}
_COMMITMENT = {
    "commitment": HEX,
    "versioned_hash": {**HEX, "description": "EIP-4844 kzg_to_versioned_hash(commitment)"},
}


def _valid(result: bool) -> dict[str, Any]:
    return {"valid": bool(result)}


def _commitment(commitment: bytes) -> dict[str, Any]:
    return {
        "commitment": _hex(commitment),
        "versioned_hash": _hex(kzg_to_versioned_hash(commitment)),
    }


def _cells(result: tuple[list[bytes], list[bytes]]) -> dict[str, Any]:
    cells, proofs = result
    return {"cells": [_hex(c) for c in cells], "proofs": [_hex(p) for p in proofs]}


def _cells_with_commitment(result: tuple[list[bytes], list[bytes], bytes]) -> dict[str, Any]:
    cells, proofs, commitment = result
    return {**_cells((cells, proofs)), **_commitment(commitment)}


def cells_and_commitment(engine: Engine, blob: bytes) -> tuple[list[bytes], list[bytes], bytes]:
    """Runs in a worker: a blob's cells and proofs and its commitment, in one job."""
    cells, proofs = engine.compute_cells_and_kzg_proofs(blob)
    return cells, proofs, engine.blob_to_kzg_commitment(blob)


def operations(max_batch: int = 64, max_cells: int = 1024) -> tuple[Operation, ...]:
    """The KZG operations of the HTTP API with their inputs and body limits."""
    blob = Field("blob", BYTES_PER_BLOB)
    commitment, proof = Field("commitment", BYTES48), Field("proof", BYTES48)
    z, y = Field("z", BYTES32), Field("y", BYTES32)
    one_blob = 320 * 1024
    return (
        Operation("blob_to_kzg_commitment", "/v1/kzg/blob-to-commitment", "Commit to a blob",
                  (blob,), _commitment, _COMMITMENT, one_blob, raw_blob=True),
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
                  (blob,), _cells_with_commitment, {**_CELLS, **_COMMITMENT}, one_blob, raw_blob=True,
                  function=cells_and_commitment),
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


def _parse_hex(value: Any, where: str, size: int, code: str) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise bad_request(code, f"{where} must be a 0x-prefixed hex string")
    if len(value) != 2 + 2 * size:
        raise bad_request(
            code,
            f"{where} must be {size} bytes ({2 + 2 * size} characters with 0x), got {len(value)} characters",
        )
    # bytes.fromhex would skip whitespace; only hex digits are accepted.
    if not _HEX_DIGITS.fullmatch(value, 2):
        raise bad_request(code, f"{where} is not valid hex")
    return bytes.fromhex(value[2:])


def _parse_field(field: Field, value: Any, prefix: str = "") -> Any:
    """``prefix`` places the field in a larger document (``operations[2].``) for messages;
    the code names the field alone, as on the single routes."""
    where, code = prefix + field.name, f"invalid_{field.name}"
    if field.kind == "bytes":
        return _parse_hex(value, where, field.size, code)
    if not isinstance(value, list):
        raise bad_request(code, f"{where} must be a list")
    if len(value) > field.max_items:
        raise bad_request(
            code, f"{where} has {len(value)} items, at most {field.max_items} allowed"
        )
    if field.kind == "bytes_list":
        return [_parse_hex(item, f"{where}[{i}]", field.size, code) for i, item in enumerate(value)]
    for i, item in enumerate(value):
        if type(item) is not int or not 0 <= item < CELLS_PER_EXT_BLOB:
            raise bad_request(code, f"{where}[{i}] must be an integer in [0, {CELLS_PER_EXT_BLOB})")
    return list(value)


def _parse_document(op: Operation, document: Mapping[str, Any], prefix: str = "") -> list[Any]:
    names = [f.name for f in op.inputs]
    unknown = sorted(set(document) - set(names))
    if unknown:
        raise bad_request("unknown_field", f"{prefix}{unknown[0]} is not a field of {op.name}")
    missing = [n for n in names if n not in document]
    if missing:
        raise bad_request("missing_field", f"{prefix}{missing[0]} is required")
    return [_parse_field(f, document[f.name], prefix) for f in op.inputs]


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        document = parse_json(body)
    except JsonTooDeep as exc:
        raise bad_request("invalid_json", f"the body {exc}") from None
    except ValueError:
        raise bad_request("invalid_json", "the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise bad_request("invalid_json", "the body must be a JSON object")
    return document


def parse_json_inputs(op: Operation, body: bytes) -> list[Any]:
    """Return the engine arguments from a JSON body, or raise a 400 naming the field."""
    return _parse_document(op, _json_object(body))


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


@dataclass(frozen=True)
class BatchCall:
    """An operation of a batch, parsed to its engine arguments."""

    op: Operation
    args: list[Any]


@dataclass(frozen=True)
class BatchRefusal:
    """An operation of a batch refused before it ran (``operation`` is None when its
    operation is not known)."""

    operation: str | None
    error: ApiError


def _parse_batch_item(
    item: Any, where: str, ops: Mapping[str, Operation]
) -> BatchCall | BatchRefusal:
    if not isinstance(item, dict):
        return BatchRefusal(
            None, bad_request("invalid_operation", f"{where} must be a JSON object")
        )
    name = item.get("operation")
    op = ops.get(name) if isinstance(name, str) else None
    if op is None:
        if "operation" not in item:
            error = bad_request("missing_field", f"{where}.operation is required")
        else:
            error = bad_request(
                "unknown_operation", f"{where}.operation must be one of {', '.join(ops)}"
            )
        return BatchRefusal(None, error)
    inputs = {k: v for k, v in item.items() if k != "operation"}
    try:
        return BatchCall(op, _parse_document(op, inputs, f"{where}."))
    except ApiError as exc:
        return BatchRefusal(op.name, exc)


def parse_batch(
    body: bytes, ops: Mapping[str, Operation], max_operations: int
) -> list[BatchCall | BatchRefusal]:
    """Every operation of a batch body, parsed; a body that is no batch raises its 400."""
    document = _json_object(body)
    unknown = sorted(set(document) - {"operations"})
    if unknown:
        raise bad_request("unknown_field", f"{unknown[0]} is not a field of a batch")
    if "operations" not in document:
        raise bad_request("missing_field", "operations is required")
    items = document["operations"]
    if not isinstance(items, list) or not items:
        raise bad_request("invalid_operations", "operations must be a non-empty list")
    if len(items) > max_operations:
        raise bad_request(
            "invalid_operations",
            f"operations has {len(items)} items, at most {max_operations} allowed",
        )
    return [_parse_batch_item(item, f"operations[{i}]", ops) for i, item in enumerate(items)]


# The engine's arguments carry the request's field names, so an error naming one gets
# the code the request validators give that field.
_REQUEST_FIELDS = frozenset(f.name for op in operations() for f in op.inputs)


def _code_for(exc: KZGError) -> str:
    if exc.argument in _REQUEST_FIELDS:
        return f"invalid_{exc.argument}"
    return "invalid_input"


def _item_message(where: str, exc: KZGError) -> str:
    """The engine's message placed in the batch: "operations[2].blob: ..." when it names
    a field, "operations[2]: ..." otherwise."""
    if exc.argument in _REQUEST_FIELDS:
        return f"{where}.{exc}"
    return f"{where}: {exc}"


def _answer_of(op: Operation, outcome: Outcome) -> dict[str, Any]:
    """What the client would have been answered with one engine's outcome."""
    ok, value = outcome
    if ok:
        return op.output(value)
    code = _code_for(value) if isinstance(value, KZGError) else "internal_error"
    return {"error": {"code": code, "message": str(value)}}


def _record_disagreement(
    ctx: RequestContext, op: Operation, exc: EngineDisagreement, entry: dict[str, Any] | None
) -> None:
    """Audit the digest of what each engine would have answered: the answers themselves
    never leave, but whoever re-runs the inputs can tell which engine was right."""
    digests = {name: result_digest(_answer_of(op, o)) for name, o in exc.outcomes.items()}
    ctx.detail.setdefault("engine_disagreement", digests)
    if entry is not None:
        entry.update(error="engine_disagreement", engine_disagreement=digests)


def _failure(failures: list[tuple[Operation, Exception]]) -> Exception:
    """The error of a whole request one of whose calls failed by the service's fault."""
    for op, error in failures:
        if isinstance(error, EngineDisagreement):
            return ApiError(
                500,
                "engine_disagreement",
                f"the KZG engines disagree on {op.name}; no result is answered",
            )
    _, error = failures[0]
    if isinstance(error, WorkerCrashed | PoolClosed):
        return ApiError(503, "engine_unavailable", str(error), {"Retry-After": "1"})
    if isinstance(error, NotImplementedError):
        return ApiError(501, "not_implemented", str(error))
    return error


async def run_operations(
    request: web.Request,
    calls: list[tuple[Operation, list[Any]]],
    entries: list[dict[str, Any]] | None = None,
) -> list[Any]:
    """Run the calls in parallel in the worker pool; return, in order, each result or the
    KZGError that refused its input. What is the service's fault fails the whole request
    and no result leaves: a saturated pool (503, before anything runs), a lost worker
    (503), engines that disagree (500); past the caller's share of the engine it is 429,
    before anything runs. ``entries`` are the calls' audit details."""
    if not calls:
        return []
    app, ctx = request.app, request[REQUEST_CONTEXT]
    pool, metrics = app[KZG_POOL], app[METRICS]
    try:
        done = await pool.call_many(
            [(op.call, args) for op, args in calls], request.get(ENGINE_SHARE)
        )
    except (ShareExceeded, PoolSaturated) as exc:
        for op, _ in calls:
            metrics.operations.labels(op.name, "shed").inc()
        retry = {"Retry-After": str(pool.settings.retry_after_seconds)}
        if isinstance(exc, ShareExceeded):
            raise ApiError(429, "engine_share_exceeded", str(exc), retry) from None
        raise ApiError(
            503, "overloaded", "the KZG workers are saturated; retry later", retry
        ) from None
    except PoolClosed as exc:
        raise ApiError(503, "engine_unavailable", str(exc), {"Retry-After": "1"}) from None
    finally:
        metrics.queue_depth.set(pool.queue_depth)
    results: list[Any] = []
    failures: list[tuple[Operation, Exception]] = []
    for index, ((op, _), call) in enumerate(zip(calls, done, strict=True)):
        error = call.error
        refused = isinstance(error, KZGError)
        outcome = "success" if error is None else "invalid" if refused else "error"
        metrics.operations.labels(op.name, outcome).inc()
        metrics.duration.labels(op.name).observe(call.seconds)
        if isinstance(error, EngineDisagreement):
            metrics.engine_disagreements.labels(op.name).inc()
            _record_disagreement(ctx, op, error, entries[index] if entries else None)
        if error is None or refused:
            results.append(call.value if error is None else error)
        else:
            failures.append((op, error))
    if failures:
        raise _failure(failures)
    return results


async def run_operation(request: web.Request, op: Operation, args: list[Any]) -> Any:
    """Run one operation in the pool; map every failure to its API error."""
    [result] = await run_operations(request, [(op, args)])
    if isinstance(result, KZGError):
        raise bad_request(_code_for(result), str(result))
    return result


def _handler(op: Operation) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        args = await parse_inputs(request, op)
        digests = {f.name: input_digest(a) for f, a in zip(op.inputs, args, strict=True)}
        ctx.input_digests = digests
        result = await run_operation(request, op, args)
        return ReceiptResponse(ctx, op.output(result))

    handle.__name__ = op.name
    return handle


def _batch_answer(where: str, item: BatchCall | BatchRefusal, result: Any) -> dict[str, Any]:
    """One element of a batch's results: as the single route answers, or an error."""
    if isinstance(item, BatchRefusal):
        return {"error": {"code": item.error.code, "message": item.error.message}}
    if isinstance(result, KZGError):
        return {"error": {"code": _code_for(result), "message": _item_message(where, result)}}
    return item.op.output(result)


def _batch_handler(
    ops: Mapping[str, Operation], max_operations: int, body_limit: int
) -> Callable[[web.Request], Any]:
    async def kzg_batch(request: web.Request) -> web.StreamResponse:
        ctx = request[REQUEST_CONTEXT]
        if request.content_type != JSON:
            raise ApiError(415, "unsupported_media_type", f"Content-Type must be {JSON}")
        items = parse_batch(await read_body(request, body_limit), ops, max_operations)
        # The audit detail lists every operation with its result digest or error code.
        entries: list[dict[str, Any]] = [
            {"operation": item.op.name if isinstance(item, BatchCall) else item.operation}
            for item in items
        ]
        ctx.detail["operations"] = entries
        calls = {i: item for i, item in enumerate(items) if isinstance(item, BatchCall)}
        ctx.input_digests = {
            f"operations[{i}].{field.name}": input_digest(arg)
            for i, call in calls.items()
            for field, arg in zip(call.op.inputs, call.args, strict=True)
        }
        computed = await run_operations(
            request, [(c.op, c.args) for c in calls.values()], [entries[i] for i in calls]
        )
        outputs = dict(zip(calls, computed, strict=True))
        results = []
        for i, (item, entry) in enumerate(zip(items, entries, strict=True)):
            answer = _batch_answer(f"operations[{i}]", item, outputs.get(i))
            if "error" in answer:
                entry["error"] = answer["error"]["code"]
            else:
                entry["result_digest"] = result_digest(answer)
            results.append(answer)
        return ReceiptResponse(ctx, {"results": results})

    return kzg_batch


def batch_body_limit(ops: tuple[Operation, ...], max_operations: int) -> int:
    """The largest batch body: one of each operation at its own limit, and never more
    than ``max_operations`` of the largest (the body is read before it is parsed)."""
    return min(sum(op.body_limit for op in ops), max_operations * max(op.body_limit for op in ops))


def _max_batch_operations(app: web.Application) -> int:
    value = app[CONFIG].server.max_batch_operations
    if value < 1:
        raise ConfigError(f"[server] max_batch_operations must be at least 1, got {value}")
    return value


def _response_schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": [*properties, "receipt"],
        "properties": {**properties, "receipt": {"$ref": "#/components/schemas/Receipt"}},
    }


def _inputs_schema(op: Operation, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [*extra, *(f.name for f in op.inputs)],
        "properties": {**extra, **{f.name: f.schema() for f in op.inputs}},
    }


_ITEM_ERROR = {
    "type": "object",
    "additionalProperties": False,
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        }
    },
}


def _document_batch(app: web.Application, ops: tuple[Operation, ...], max_operations: int) -> None:
    results = [
        {"type": "object", "required": list(op.output_schema), "properties": op.output_schema}
        for op in ops
    ]
    document_route(
        app,
        "kzg_batch",
        RouteDoc(
            summary="Run several KZG operations in parallel: one request, one audit entry, "
            "one receipt; a bad operation gets its own error and the others their results",
            tags=("kzg",),
            request_schema={
                "type": "object",
                "additionalProperties": False,
                "required": ["operations"],
                "properties": {
                    "operations": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": max_operations,
                        "items": {
                            "oneOf": [
                                _inputs_schema(op, operation={"const": op.name}) for op in ops
                            ]
                        },
                    }
                },
            },
            response_schema=_response_schema(
                {
                    "results": {
                        "type": "array",
                        "description": "in the order of operations: each result as its "
                        "single route answers it (without receipt), or an error",
                        "items": {"anyOf": [*results, _ITEM_ERROR]},
                    }
                }
            ),
        ),
    )


def add_routes(app: web.Application, ops: tuple[Operation, ...]) -> None:
    """Register the KZG routes and the batch route (and their documentation)."""
    for op in ops:
        app.router.add_post(op.path, _handler(op), name=op.name)
        # Exported at zero from the start, so that the first disagreement is an increase.
        app[METRICS].engine_disagreements.labels(op.name)
        document_route(
            app,
            op.name,
            RouteDoc(
                summary=op.summary,
                tags=("kzg",),
                request_schema=_inputs_schema(op),
                octet_stream=op.raw_blob,
                response_schema=_response_schema(op.output_schema),
            ),
        )
    max_operations = _max_batch_operations(app)
    by_name = {op.name: op for op in ops}
    handler = _batch_handler(by_name, max_operations, batch_body_limit(ops, max_operations))
    app.router.add_post(BATCH_PATH, handler, name="kzg_batch")
    _document_batch(app, ops, max_operations)
