"""Receipts: verified offline with nothing but the pinned log keys; saved and loaded as
``.tlog-proof`` files (and as JSON for the CLI); and refused, before any result is
returned, when tampered with, when they record another request, when the keys are not
the log's, or when the log shows this client a history that forks from what it saw."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from audit.chain import canonical_json
from audit.merkle import leaf_hash
from audit.note import NoteSigner
from audit.tlog import Checkpoint, TlogProof
from gateway.client import (
    CommitmentResult,
    ConsistencyError,
    GatewayClient,
    Receipt,
    ReceiptError,
    VerifyResult,
    verify_receipt,
)
from kzg import Engine
from tests.audit import reference_tlog
from tests.client.conftest import Gateways, Interceptor, LiveGateway, make_blob, rewrite_json

ORIGIN = "kzg-gateway.localhost/audit"
BLOB = make_blob(11)


def foreign_vkey(name: str = ORIGIN) -> str:
    """A well-formed verifier key of the log's name that is not the log's."""
    return NoteSigner.generate(name).vkey


def _receipt_of(
    entry: dict[str, Any] | str, signer: NoteSigner, origin: str | None = None
) -> Receipt:
    """A one-entry log signed by ``signer``: for entries no real gateway would log."""
    text = entry if isinstance(entry, str) else canonical_json(entry)
    root = leaf_hash(text.encode())
    note = signer.sign(Checkpoint(origin or signer.name, 1, root).text())
    return Receipt(text, TlogProof(0, (), note).text())


@pytest.fixture
def answered(gateway: LiveGateway) -> CommitmentResult:
    return gateway.client().blob_to_kzg_commitment(BLOB)


def test_a_receipt_verifies_offline_with_the_pinned_keys(
    answered: CommitmentResult, gateway: LiveGateway
) -> None:
    """Given a result, its receipt verifies with nothing but the log's keys, and the
    independent reference verifier of the tests agrees."""
    verified = verify_receipt(
        answered.receipt.to_dict(),
        gateway.vkeys,
        ORIGIN,
        answer=answered.answer,
        request_id=answered.request_id,
    )
    assert verified.action == "blob_to_kzg_commitment"
    assert verified.request_id == answered.request_id
    assert verified.checkpoint.origin == ORIGIN and verified.signers == (ORIGIN,)
    assert verified.entry["input_digests"] == {"blob": hashlib.sha256(BLOB).hexdigest()}
    reference = reference_tlog.verify_receipt(answered.receipt.to_dict(), gateway.vkeys, ORIGIN)
    assert reference["entry"] == verified.entry and reference["size"] == verified.checkpoint.size


def test_tampered_receipts_do_not_verify(answered: CommitmentResult, gateway: LiveGateway) -> None:
    entry, proof = answered.receipt.entry, answered.receipt.proof
    edited_entry = entry.replace('"outcome":"success"', '"outcome":"successful"')
    lines = proof.split("\n")
    lines[1] = f"index {int(lines[1].split()[1]) + 1}"
    forged_index = "\n".join(lines)
    note_start = proof.index("\n\n") + 2
    forged_root = proof[:note_start] + proof[note_start:].replace(
        proof[note_start:].split("\n")[2], base64.b64encode(bytes(32)).decode()
    )
    for receipt, why in [
        (Receipt(edited_entry, proof), "does not verify"),
        (Receipt(entry, forged_index), "does not verify"),
        (Receipt(entry, forged_root), "does not verify"),
    ]:
        with pytest.raises(ReceiptError, match=why):
            verify_receipt(receipt, gateway.vkeys)


def test_a_receipt_is_bound_to_its_answer_and_request(
    answered: CommitmentResult, gateway: LiveGateway
) -> None:
    other = {**answered.answer, "commitment": "0xc0" + "00" * 47}
    with pytest.raises(ReceiptError, match="result_digest"):
        verify_receipt(answered.receipt, gateway.vkeys, answer=other)
    with pytest.raises(ReceiptError, match="not 'someone-else'"):
        verify_receipt(answered.receipt, gateway.vkeys, request_id="someone-else")


def test_keys_and_origin_other_than_the_logs_are_refused(
    answered: CommitmentResult, gateway: LiveGateway
) -> None:
    with pytest.raises(ReceiptError, match="no signature by a known key"):
        verify_receipt(answered.receipt, [foreign_vkey()])
    with pytest.raises(ReceiptError, match="origin"):
        verify_receipt(answered.receipt, gateway.vkeys, origin="audit.example.com/other")
    with pytest.raises(ValueError, match="log key"):
        verify_receipt(answered.receipt, ["not a key"])
    with pytest.raises(TypeError, match="list of verifier keys"):
        verify_receipt(answered.receipt, gateway.vkeys[0])  # type: ignore[arg-type]


def test_entries_a_verifier_must_not_accept_even_when_signed() -> None:
    """A log key signing a non-canonical entry, an entry at the wrong seq, or a
    checkpoint whose origin is not its name: each is refused."""
    signer = NoteSigner.generate(ORIGIN)
    good = {"request_id": "r1", "seq": 1, "action": "verify_kzg_proof"}
    assert verify_receipt(_receipt_of(good, signer), [signer.vkey]).seq == 1
    with pytest.raises(ReceiptError, match="canonical"):
        verify_receipt(_receipt_of(json.dumps(good), signer), [signer.vkey])
    with pytest.raises(ReceiptError, match="seq 2"):
        verify_receipt(_receipt_of({**good, "seq": 2}, signer), [signer.vkey])
    # A key of another name signing for this origin: the log is identified by its key.
    other = NoteSigner.generate("someone.example/log")
    with pytest.raises(ReceiptError, match="not the name of a key"):
        verify_receipt(_receipt_of(good, other, origin=ORIGIN), [other.vkey])
    assert verify_receipt(_receipt_of(good, other, ORIGIN), [other.vkey], ORIGIN).seq == 1


def test_receipts_save_as_tlog_proof_files_and_load_back(
    answered: CommitmentResult, gateway: LiveGateway, tmp_path: Path
) -> None:
    """``save`` writes one self-contained tlog-proof (the entry in its extra line);
    ``load`` gives the receipt back exactly, and it still verifies."""
    path = answered.receipt.save(tmp_path / "commitment.tlog-proof")
    text = path.read_text()
    assert text.startswith("c2sp.org/tlog-proof@v1\nextra ")
    extra = text.split("\n")[1].removeprefix("extra ")
    assert base64.b64decode(extra).decode() == answered.receipt.entry
    loaded = Receipt.load(path)
    assert loaded == answered.receipt
    assert verify_receipt(loaded, gateway.vkeys).request_id == answered.request_id

    as_json = answered.receipt.save_json(tmp_path / "commitment.receipt.json")
    assert Receipt.load(as_json) == answered.receipt
    whole = answered.save_answer(tmp_path / "commitment.answer.json")
    assert Receipt.load(whole) == answered.receipt

    bare = tmp_path / "bare.tlog-proof"
    bare.write_text(answered.receipt.proof)
    with pytest.raises(ReceiptError, match="no entry"):
        Receipt.load(bare)


def _cli_verify(path: Path, vkeys: list[str]) -> subprocess.CompletedProcess[str]:
    keys = [arg for vkey in vkeys for arg in ("--key", vkey)]
    return subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify-receipt", str(path), *keys],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_saved_receipts_and_answers_verify_with_the_cli(
    answered: CommitmentResult, gateway: LiveGateway, tmp_path: Path
) -> None:
    """The auditor's ``kzg-gateway audit verify-receipt`` accepts what the SDK saves as
    JSON: the receipt, and the whole answer (whose result digest it checks too)."""
    receipt = _cli_verify(answered.receipt.save_json(tmp_path / "r.json"), gateway.vkeys)
    assert receipt.returncode == 0, receipt.stdout + receipt.stderr
    assert answered.request_id in receipt.stdout
    whole = _cli_verify(answered.save_answer(tmp_path / "a.json"), gateway.vkeys)
    assert whole.returncode == 0 and "matches the entry's result_digest" in whole.stdout
    wrong = _cli_verify(tmp_path / "r.json", [foreign_vkey()])
    assert wrong.returncode == 1


# ---- the client refuses before returning --------------------------------------------


def test_the_client_needs_pinned_keys_unless_told_not_to_verify(gateway: LiveGateway) -> None:
    with pytest.raises(ValueError, match="log_keys is required"):
        GatewayClient(base_url=gateway.url, api_key="k", ca_file=gateway.ca_file)
    with pytest.raises(ValueError, match="https"):
        GatewayClient(base_url="http://127.0.0.1:1", api_key="k", log_keys=gateway.vkeys)
    unverified = gateway.client(log_keys=None, verify_receipts=False)
    result = unverified.verify_kzg_proof(*_identity_proof())
    assert result.valid is True and result.verified is None and result.receipt.entry


def test_wrong_pinned_keys_raise_before_any_result(gateway: LiveGateway) -> None:
    client = gateway.client(log_keys=[foreign_vkey()])
    with pytest.raises(ReceiptError) as refused:
        client.blob_to_kzg_commitment(BLOB)
    assert refused.value.request_id and "no signature by a known key" in refused.value.message
    with pytest.raises(ReceiptError, match="origin"):
        gateway.client(origin="audit.example.com/kzg").blob_to_kzg_commitment(BLOB)


def test_an_altered_result_raises(interceptor: Interceptor, gateway: LiveGateway) -> None:
    """Given a man in the middle that changes the commitment in the answer, the client
    raises ReceiptError (the entry logged another result) with the request id."""

    def change(answer: dict[str, Any]) -> None:
        answer["commitment"] = "0xc0" + "00" * 47

    interceptor.on_answer = rewrite_json(change)
    client = gateway.client(base_url=interceptor.url)
    with pytest.raises(ReceiptError, match="result_digest") as refused:
        client.blob_to_kzg_commitment(BLOB)
    assert refused.value.request_id and gateway.audit_records(refused.value.request_id)


def test_a_tampered_receipt_raises(interceptor: Interceptor, gateway: LiveGateway) -> None:
    def change(answer: dict[str, Any]) -> None:
        receipt = answer["receipt"]
        receipt["entry"] = receipt["entry"].replace('"role":"client"', '"role":"admin"')

    interceptor.on_answer = rewrite_json(change)
    with pytest.raises(ReceiptError, match="does not verify"):
        gateway.client(base_url=interceptor.url).blob_to_kzg_commitment(BLOB)


def test_a_receipt_for_another_request_raises(
    interceptor: Interceptor, gateway: LiveGateway
) -> None:
    """Given a man in the middle that answers with an earlier (genuine) answer and
    receipt, the client sees that the entry is not this request's."""
    earlier: dict[str, Any] = {}

    def replay(answer: dict[str, Any]) -> None:
        if earlier:
            answer.clear()
            answer.update(earlier)
        else:
            earlier.update(answer)

    interceptor.on_answer = rewrite_json(replay)
    client = gateway.client(base_url=interceptor.url)
    first = client.blob_to_kzg_commitment(BLOB)
    with pytest.raises(ReceiptError, match=f"is for request '{first.request_id}'") as refused:
        client.blob_to_kzg_commitment(BLOB)
    assert refused.value.request_id != first.request_id


def test_a_request_altered_on_the_way_raises(
    interceptor: Interceptor, gateway: LiveGateway, ckzg_engine: Engine
) -> None:
    """Given a man in the middle that swaps the blob the client sent, the gateway answers
    (and logs) for the other blob; the client sees the input digests differ."""
    other = make_blob(12)
    interceptor.on_request = lambda path, body: other if len(body) == len(other) else body
    with pytest.raises(ReceiptError, match="input_digests"):
        gateway.client(base_url=interceptor.url).blob_to_kzg_commitment(BLOB)
    interceptor.on_request = None
    result = gateway.client(base_url=interceptor.url).blob_to_kzg_commitment(BLOB)
    assert result.commitment == ckzg_engine.blob_to_kzg_commitment(BLOB)


# ---- consistency --------------------------------------------------------------------


def test_checkpoints_are_checked_for_consistency(gateway: LiveGateway) -> None:
    """The client proves each new checkpoint extends the last it saw; a later client
    can start from a checkpoint kept from before."""
    client = gateway.client()
    first = client.verify_kzg_proof(*_identity_proof())
    second = client.verify_kzg_proof(*_identity_proof())
    assert first.verified and second.verified
    assert second.verified.checkpoint.size > first.verified.checkpoint.size
    kept = client.latest_checkpoint
    assert kept is not None and kept.startswith(ORIGIN + "\n")

    later = gateway.client(trusted_checkpoint=kept)
    head = later.fetch_checkpoint()
    assert head.size >= second.verified.checkpoint.size
    assert later.latest_checkpoint is not None


def _identity_proof() -> tuple[bytes, bytes, bytes, bytes]:
    """The zero polynomial's proof at z = 0: commitment and proof are the point at
    infinity, y = 0."""
    infinity = bytes([0xC0]) + bytes(47)
    return infinity, bytes(32), bytes(32), infinity


def test_a_forked_log_is_detected(gateways: Gateways, server_thread: Any, tmp_path: Path) -> None:
    """Given two gateways that share a log's history and key but then diverge (a log
    showing different histories to different people), a client that saw one of them
    refuses the other's receipts with ConsistencyError, however it is shown them."""
    first = gateways.start("a")
    key = first.api_key()
    gateways.stop(first)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    honest, fork = gateways.start("a"), gateways.start("b")
    assert honest.vkeys == fork.vkeys

    proxy = Interceptor(server_thread, honest).start()
    try:
        client = honest.client(base_url=proxy.url, api_key=key)
        assert client.verify_kzg_proof(*_identity_proof()).valid
        seen = client.latest_checkpoint
        # The fork grows past what the client saw, with other entries.
        witness = fork.client(api_key=key)
        for _ in range(3):
            witness.verify_kzg_proof(*_identity_proof())

        proxy.upstream = fork
        with pytest.raises(ConsistencyError) as refused:
            client.verify_kzg_proof(*_identity_proof())
        assert refused.value.request_id
        # A new client that kept the checkpoint refuses the fork as well.
        keeper = fork.client(api_key=key, trusted_checkpoint=seen)
        with pytest.raises(ConsistencyError):
            keeper.fetch_checkpoint()
        # The honest log still extends what was seen.
        proxy.upstream = honest
        assert isinstance(client.verify_kzg_proof(*_identity_proof()), VerifyResult)
    finally:
        proxy.stop()
