"""Inputs for the KZG routes and receipt checks, shared by the gateway tests."""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from blspy import AugSchemeMPL, G1Element, G2Element

from gateway.pool import warm_engine
from gateway.receipts import input_digest, output_digest

BLOB_BYTES = 131072


def make_blob(seed: int) -> bytes:
    """A valid blob: 4096 canonical field elements (top byte zero)."""
    rng = random.Random(seed)
    return b"".join(b"\x00" + rng.randbytes(31) for _ in range(4096))


def hx(value: bytes) -> str:
    return "0x" + value.hex()


def reference_engine(name: str = "ckzg") -> Any:
    """The engine in this process, to compare the gateway's answers with."""
    return warm_engine(name)


def verify_receipt(
    receipt: dict[str, Any], keys: list[dict[str, Any]], operation: str, request_id: str
) -> dict[str, Any]:
    """Check a receipt with blspy against the published keys; return its message."""
    assert receipt["scheme"] == "bls12381-aug"
    assert receipt["signature"].startswith("0x")
    assert all(k["public_key"].startswith("0x") for k in keys)
    published = {k["key_id"]: k["public_key"] for k in keys}
    public_key = G1Element.from_bytes(
        bytes.fromhex(published[receipt["key_id"]].removeprefix("0x"))
    )
    signature = G2Element.from_bytes(bytes.fromhex(receipt["signature"].removeprefix("0x")))
    assert AugSchemeMPL.verify(public_key, receipt["message"].encode("utf-8"), signature)
    message = json.loads(receipt["message"])
    assert receipt["message"] == json.dumps(message, sort_keys=True, separators=(",", ":"))
    assert message["operation"] == operation
    assert message["request_id"] == request_id
    return message


def receipt_output(body: dict[str, Any]) -> dict[str, Any]:
    """What a receipt's ``output`` must be for a response body."""
    result = {k: v for k, v in body.items() if k != "receipt"}
    if "cells" in result:
        cells = [bytes.fromhex(c[2:]) for c in result["cells"]]
        proofs = [bytes.fromhex(p[2:]) for p in result["proofs"]]
        return {"cells_sha256": input_digest(cells), "proofs_sha256": input_digest(proofs)}
    return result


__all__ = ["hashlib", "input_digest", "output_digest"]


def hold_worker(engine: Any, seconds: float) -> str:
    """Runs in a pool worker: keeps it busy."""
    import time

    time.sleep(seconds)
    return engine.name


def kill_worker(engine: Any) -> None:
    """Runs in a pool worker: dies as a crashing native library would."""
    import os

    os._exit(3)
