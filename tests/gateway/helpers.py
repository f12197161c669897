"""Inputs for the KZG routes and receipt checks, shared by the gateway tests.

Receipts are checked with ``tests/audit/reference_tlog.py`` (which shares nothing with the
product), and the digests a receipt's entry names are recomputed here from the texts of
the API contract, not with the gateway's own functions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.pool import warm_engine
from tests.audit import reference_tlog

BLOB_BYTES = 131072
# The documented default of [audit] origin: the name of the log key and every checkpoint.
ORIGIN = "kzg-gateway.localhost/audit"
# The identity point proves p(0) = 0 for the zero polynomial: a verify-proof body that is
# valid and costs the engine next to nothing.
IDENTITY_PROOF = {
    "commitment": "0xc0" + "00" * 47,
    "z": "0x" + "00" * 32,
    "y": "0x" + "00" * 32,
    "proof": "0xc0" + "00" * 47,
}


def make_blob(seed: int) -> bytes:
    """A valid blob: 4096 canonical field elements (top byte zero)."""
    rng = random.Random(seed)
    return b"".join(b"\x00" + rng.randbytes(31) for _ in range(4096))


def hx(value: bytes) -> str:
    return "0x" + value.hex()


def reference_engine(name: str = "ckzg") -> Any:
    """The engine in this process, to compare the gateway's answers with."""
    return warm_engine(name)


def canonical(value: Any) -> str:
    """Canonical JSON as the API contract defines it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def body_digest(answer: dict[str, Any]) -> str:
    """What an entry's ``result_digest`` must be for an answer: SHA-256 (hex) of the
    canonical JSON of the body without its receipt."""
    body = {k: v for k, v in answer.items() if k != "receipt"}
    return hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()


def input_sha256(value: bytes | list[bytes] | list[int]) -> str:
    """SHA-256 (hex) of one input: bytes as they are, a list of byte strings
    concatenated, a list of indices as 8-byte big-endian integers."""
    if isinstance(value, bytes):
        return hashlib.sha256(value).hexdigest()
    raw = b"".join(v.to_bytes(8, "big") if isinstance(v, int) else v for v in value)
    return hashlib.sha256(raw).hexdigest()


def raw_inputs(body: dict[str, Any]) -> dict[str, Any]:
    """The inputs a JSON request body carries, decoded: hex to bytes, indices as ints."""

    def decode(value: Any) -> Any:
        if isinstance(value, str):
            return bytes.fromhex(value.removeprefix("0x"))
        return [decode(v) if isinstance(v, str) else v for v in value]

    return {name: decode(value) for name, value in body.items()}


def input_digests(body: dict[str, Any]) -> dict[str, str]:
    """What an entry's ``input_digests`` must be for a JSON request body."""
    return {name: input_sha256(value) for name, value in raw_inputs(body).items()}


def vkeys_of(listing: dict[str, Any]) -> list[str]:
    """The verifier keys of a ``GET /v1/log/keys`` answer, each checked for shape."""
    keys = listing["keys"]
    assert keys, "the log publishes at least one key"
    for key in keys:
        assert set(key) == {"key_id", "vkey", "status", "not_before", "not_after"}, key
        assert key["status"] in ("current", "retired")
        name, _, _ = reference_tlog.parse_vkey(key["vkey"])
        assert name == ORIGIN
    assert [k["status"] for k in keys].count("current") == 1
    return [k["vkey"] for k in keys]


def check_receipt(
    answer: dict[str, Any],
    request_id: str,
    vkeys: list[str],
    inputs: dict[str, str] | None = None,
    origin: str = ORIGIN,
) -> dict[str, Any]:
    """Verify an answer's receipt with the reference verifier and check that its entry
    names this answer: its request id, its body's digest and (when given) its inputs'.
    Returns the verifier's result ({index, size, root, origin, entry})."""
    receipt = answer["receipt"]
    assert set(receipt) == {"entry", "proof"}, receipt
    result = reference_tlog.verify_receipt(receipt, vkeys, origin)
    entry = result["entry"]
    assert receipt["entry"] == canonical(entry), "the entry is not canonical JSON"
    assert entry["seq"] == result["index"] + 1
    assert entry["request_id"] == request_id
    assert entry["result_digest"] == body_digest(answer)
    assert entry["outcome"] == "success" and entry["http_status"] == 200
    if inputs is not None:
        assert entry["input_digests"] == inputs
    return result


def stored_entry(record: dict[str, Any]) -> dict[str, Any]:
    """An audit row as the entry it was logged as (nested objects are stored as JSON)."""
    return {k: json.loads(v) if k in ("input_digests", "detail") else v for k, v in record.items()}


def foreign_vkey(name: str = ORIGIN) -> str:
    """A well-formed verifier key of the right name that is not the log's."""
    public = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_data = b"\x01" + public
    key_id = hashlib.sha256(name.encode() + b"\n" + key_data).digest()[:4]
    return f"{name}+{key_id.hex()}+{base64.b64encode(key_data).decode()}"


def hold_worker(engine: Any, seconds: float) -> str:
    """Runs in a pool worker: keeps it busy."""
    import time

    time.sleep(seconds)
    return engine.name


def kill_worker(engine: Any) -> None:
    """Runs in a pool worker: dies as a crashing native library would."""
    import os

    os._exit(3)
