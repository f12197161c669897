"""Dual-engine assurance (``[engine] cross_check``): every result is computed by both
engines and answered only when they agree. On the official vectors they agree through
the pool; an engine made to return a wrong commitment gets 500 engine_disagreement, no
result, an audit record with the digest of each engine's answer, and a metric."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from gateway.appkeys import KZG_POOL
from gateway.config import ConfigError
from gateway.pool import EngineDisagreement, EnginePool, PoolSettings
from kzg import KZGError
from tests.gateway.conftest import StartGateway
from tests.gateway.helpers import (
    body_digest,
    check_receipt,
    hold_worker,
    hx,
    input_sha256,
    make_blob,
    reference_engine,
    stored_entry,
    vkeys_of,
)
from tests.kzg.vectors import BadHex, Case, cases, decode

# The engine arguments of each function, in call order, as the vectors name them.
ARGUMENTS = {
    "blob_to_kzg_commitment": ("blob",),
    "compute_kzg_proof": ("blob", "z"),
    "compute_blob_kzg_proof": ("blob", "commitment"),
    "verify_kzg_proof": ("commitment", "z", "y", "proof"),
    "verify_blob_kzg_proof": ("blob", "commitment", "proof"),
    "compute_cells_and_kzg_proofs": ("blob",),
    "verify_cell_kzg_proof_batch": ("commitments", "cell_indices", "cells", "proofs"),
}
# Every case of the cheap functions; a sample of the costly ones (the blspy engine takes
# ~0.5 s per commitment or proof and ~2.6 s per cell extension), valid and invalid alike.
SAMPLE_EVERY = {
    "blob_to_kzg_commitment": 1,
    "compute_kzg_proof": 5,
    "compute_blob_kzg_proof": 3,
    "verify_kzg_proof": 1,
    "verify_blob_kzg_proof": 1,
    "compute_cells_and_kzg_proofs": 3,
    "verify_cell_kzg_proof_batch": 2,
}


def _sample(function: str) -> list[tuple[Case, list[Any]]]:
    """The sampled cases of ``function`` with their engine arguments (cases whose hex is
    malformed cannot be sent as bytes and are left out)."""
    chosen = []
    for case in cases(function)[:: SAMPLE_EVERY[function]]:
        try:
            args = [decode(case.input[name]) for name in ARGUMENTS[function]]
        except BadHex:
            continue
        chosen.append((case, args))
    return chosen


def _as_lists(value: Any) -> Any:
    return [_as_lists(v) for v in value] if isinstance(value, list | tuple) else value


async def test_both_engines_agree_on_the_official_vectors(spec_tests_dir: object) -> None:
    pool = EnginePool(PoolSettings(engine="blspy", cross_check="ckzg", workers=2))
    await pool.start()
    checked: dict[str, int] = {}
    try:
        # Every call runs on both engines: one that answers with its engine's name differs.
        [probe] = await pool.call_many([(hold_worker, (0,))])
        assert isinstance(probe.error, EngineDisagreement)
        assert probe.error.outcomes == {"blspy": (True, "blspy"), "ckzg": (True, "ckzg")}
        for function in ARGUMENTS:
            sample = _sample(function)
            assert sample, f"no vectors for {function}"
            for start in range(0, len(sample), pool.free_slots):
                chunk = sample[start : start + pool.free_slots]
                done = await pool.call_many([(function, args) for _, args in chunk])
                for (case, _), call in zip(chunk, done, strict=True):
                    if case.must_fail:
                        # Both refused: a refusal by one engine alone is a disagreement.
                        assert isinstance(call.error, KZGError), (case.name, call.error)
                    else:
                        assert call.error is None, (case.name, call.error)
                        assert _as_lists(call.value) == decode(case.output), case.name
            checked[function] = len(sample)
    finally:
        await pool.stop()
    assert checked["blob_to_kzg_commitment"] >= 10 and checked["verify_kzg_proof"] >= 100


def test_the_cross_check_must_be_another_engine() -> None:
    with pytest.raises(ConfigError, match=r"\[engine\] cross_check must name an engine other"):
        PoolSettings(engine="ckzg", cross_check="ckzg")
    with pytest.raises(ConfigError, match="'blspy'"):
        PoolSettings(engine="ckzg", cross_check="c-kzg")
    assert PoolSettings(engine="ckzg").engine_names == ("ckzg",)
    assert PoolSettings(engine="blspy", cross_check="ckzg").engine_names == ("blspy", "ckzg")


async def test_a_gateway_configured_with_the_same_engine_twice_does_not_start(
    start_gateway: StartGateway,
) -> None:
    with pytest.raises(ConfigError, match="cross_check"):
        await start_gateway(engine={"name": "ckzg", "cross_check": "ckzg"})


def _displaced(blob: bytes) -> bytes:
    """The blob with its first field element set to zero."""
    return bytes(32) + blob[32:]


def commit_wrongly(engine: Any) -> int:
    """Runs in a worker, on each of its engines: from then on its blspy engine commits to
    another blob than it was given (a valid point, the wrong answer); everything else is
    the engine itself."""
    if engine.name == "blspy":
        right = engine.blob_to_kzg_commitment
        engine.blob_to_kzg_commitment = lambda blob: right(_displaced(blob))
    return os.getpid()


def _commitment_answer(commitment: bytes) -> dict[str, str]:
    """The body blob-to-commitment answers, built from the contract."""
    versioned = b"\x01" + hashlib.sha256(commitment).digest()[1:]
    return {"commitment": hx(commitment), "versioned_hash": hx(versioned)}


def _disagreements(metrics_page: str) -> dict[str, float]:
    found = {}
    for line in metrics_page.splitlines():
        if line.startswith("kzg_engine_disagreements_total{"):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('operation="')[1].split('"')[0]] = float(value)
    return found


async def test_a_wrong_commitment_is_never_answered(
    start_gateway: StartGateway,
) -> None:
    # Given workers whose blspy engine commits wrongly (each idle worker takes one call) ...
    gw = await start_gateway(engine={"name": "blspy", "cross_check": "ckzg"})
    pool = gw.app[KZG_POOL]
    installed = await pool.call_many([(commit_wrongly, ())] * pool.size)
    assert len({done.value for done in installed}) == pool.size
    reference = reference_engine("ckzg")
    blob = make_blob(101)
    right = _commitment_answer(reference.blob_to_kzg_commitment(blob))
    wrong = _commitment_answer(reference.blob_to_kzg_commitment(_displaced(blob)))
    assert right != wrong

    # ... a commitment is refused with engine_disagreement and nothing of the result.
    response, answer = await gw.post("/v1/kzg/blob-to-commitment", {"blob": hx(blob)})
    assert response.status == 500, answer
    assert set(answer) == {"error"}
    assert answer["error"]["code"] == "engine_disagreement"
    assert "blob_to_kzg_commitment" in answer["error"]["message"]
    assert right["commitment"] not in str(answer) and wrong["commitment"] not in str(answer)
    # The audit record holds the digest of what each engine would have answered.
    [record] = [stored_entry(r) for r in await gw.audit_records(response.headers["X-Request-ID"])]
    assert (record["http_status"], record["outcome"]) == (500, "error")
    assert record["result_digest"] is None
    assert record["input_digests"] == {"blob": input_sha256(blob)}
    assert record["detail"]["engine_disagreement"] == {
        "blspy": body_digest(wrong),
        "ckzg": body_digest(right),
    }
    assert record["detail"]["error"]["code"] == "engine_disagreement"

    # Cells carry the commitment too: refused as well.
    response, answer = await gw.post("/v1/kzg/compute-cells-and-proofs", {"blob": hx(blob)})
    assert (response.status, answer["error"]["code"]) == (500, "engine_disagreement")
    assert "cells" not in answer

    # In a batch, one disagreement fails the whole batch: no result leaves.
    proof, y = reference.compute_kzg_proof(blob, bytes(32))
    verify = {"commitment": right["commitment"], "z": hx(bytes(32)), "y": hx(y), "proof": hx(proof)}
    operations = [
        {"operation": "verify_kzg_proof", **verify},
        {"operation": "blob_to_kzg_commitment", "blob": hx(blob)},
    ]
    response, answer = await gw.post("/v1/kzg/batch", {"operations": operations})
    assert (response.status, set(answer)) == (500, {"error"}), answer
    assert answer["error"]["code"] == "engine_disagreement"
    [record] = [stored_entry(r) for r in await gw.audit_records(response.headers["X-Request-ID"])]
    digests = {"blspy": body_digest(wrong), "ckzg": body_digest(right)}
    assert record["detail"]["engine_disagreement"] == digests
    assert record["detail"]["operations"] == [
        # Computed, but not answered: an entry's result digests are of what was answered.
        {"operation": "verify_kzg_proof"},
        {
            "operation": "blob_to_kzg_commitment",
            "error": "engine_disagreement",
            "engine_disagreement": digests,
        },
    ]

    # Where the engines agree, the answer is as usual: a result, or both refuse the input.
    response, answer = await gw.post("/v1/kzg/verify-proof", verify)
    assert response.status == 200 and answer["valid"] is True
    _, listing = await gw.request("GET", "/v1/log/keys", role=None)
    check_receipt(answer, response.headers["X-Request-ID"], vkeys_of(listing))
    response, answer = await gw.post("/v1/kzg/blob-to-commitment", {"blob": hx(b"\xff" * 131072)})
    assert (response.status, answer["error"]["code"]) == (400, "invalid_blob")

    # Every disagreement counts, by operation; the others are exported at zero.
    response, page = await gw.request("GET", "/metrics", role="monitor")
    counted = _disagreements(page.decode())
    assert counted["blob_to_kzg_commitment"] == 2.0
    assert counted["compute_cells_and_kzg_proofs"] == 1.0
    assert counted["verify_kzg_proof"] == 0.0
