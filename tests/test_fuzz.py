"""Hostile input, generated: decoders and parsers answer with their own precise error or
a well-formed value, never anything else (hypothesis, fixed seed budget per run)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from audit.merkle import BatchTree, CompactRange, leaf_hash
from audit.note import NoteError, NoteSigner
from audit.tlog import Checkpoint, TlogProof, verify_inclusion_proof
from auth import tokens
from auth.credentials import parse_api_key
from gateway.errors import ApiError
from gateway.routes.kzg import BatchRefusal, operations, parse_batch, parse_json_inputs
from kzg import KZGError
from kzg.validate import blob_to_polynomial, cell_to_evals, field_from_bytes, g1_from_bytes
from tests.audit import reference_tlog

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OPS = {op.name: op for op in operations()}


def _near(size: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(min_size=size, max_size=size),
        st.binary(max_size=2 * size),
        st.just(bytes([0xFF]) * size),
    )


@FUZZ
@given(_near(48))
def test_g1_decoding(data: bytes) -> None:
    try:
        point = g1_from_bytes(data, "proof")
    except KZGError as exc:
        assert (exc.argument, exc.index) == ("proof", None)
        assert str(exc) == f"proof: {exc.reason}"
    else:
        assert bytes(point) == data


@FUZZ
@given(_near(32))
def test_field_decoding(data: bytes) -> None:
    try:
        value = field_from_bytes(data, "z")
    except KZGError as exc:
        assert (exc.argument, exc.index) == ("z", None)
        assert str(exc) == f"z: {exc.reason}"
    else:
        assert value.to_bytes(32, "big") == data


def _patched(size: int) -> st.SearchStrategy[bytes]:
    """A zero buffer of ``size`` with one random 32-byte element written in."""
    return st.tuples(st.integers(0, size // 32 - 1), st.binary(min_size=32, max_size=32)).map(
        lambda t: bytes(32 * t[0]) + t[1] + bytes(size - 32 * t[0] - 32)
    )


@FUZZ
@given(_patched(131072) | st.binary(max_size=200))
def test_blob_decoding(data: bytes) -> None:
    try:
        values = blob_to_polynomial(data, "blob")
    except KZGError as exc:
        assert (exc.argument, exc.index) == ("blob", None)
        assert str(exc) == f"blob: {exc.reason}"
    else:
        assert b"".join(v.to_bytes(32, "big") for v in values) == data


@FUZZ
@given(_patched(2048) | st.binary(max_size=4096))
def test_cell_decoding(data: bytes) -> None:
    try:
        values = cell_to_evals(data, "cells", 3)
    except KZGError as exc:
        assert (exc.argument, exc.index) == ("cells", 3)
        assert str(exc) == f"cells[3]: {exc.reason}"
    else:
        assert len(values) == 64


@settings(max_examples=150, deadline=None)
@given(_near(48), _near(32), _near(32), _near(48))
def test_engines_agree_on_arbitrary_verify_inputs(
    blspy_engine: Any, ckzg_engine: Any, c: bytes, z: bytes, y: bytes, p: bytes
) -> None:
    answers = []
    for engine in (blspy_engine, ckzg_engine):
        try:
            answers.append(engine.verify_kzg_proof(c, z, y, p))
        except KZGError:
            answers.append("refused")
    assert answers[0] == answers[1]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=120),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
HEXISH = st.from_regex(r"\A0x[0-9a-fA-F \n]{0,130}\Z") | st.text(max_size=100)


@FUZZ
@given(
    st.sampled_from(sorted(OPS)),
    st.dictionaries(
        st.sampled_from(["blob", "z", "y", "commitment", "proof", "cell_indices", "cells", "x"]),
        JSON | HEXISH,
        max_size=5,
    ),
)
def test_request_bodies(name: str, document: dict[str, Any]) -> None:
    op = OPS[name]
    try:
        values = parse_json_inputs(op, json.dumps(document).encode())
    except ApiError as exc:
        assert exc.status == 400 and exc.message
        return
    for field, value in zip(op.inputs, values, strict=True):
        if field.kind == "bytes":
            assert isinstance(value, bytes) and len(value) == field.size
        elif field.kind == "bytes_list":
            assert all(isinstance(v, bytes) and len(v) == field.size for v in value)


@FUZZ
@given(
    st.lists(
        JSON
        | st.fixed_dictionaries(
            {"operation": st.sampled_from(sorted(OPS)) | st.text(max_size=12)},
            optional={
                name: JSON | HEXISH
                for name in ("blob", "z", "y", "commitment", "proof", "cell_indices", "cells")
            },
        ),
        max_size=6,
    )
)
def test_batch_bodies(items: list[Any]) -> None:
    """A list of operations is a batch (when 1 to 4 long); each item is parsed or refused
    on its own, with a 400 naming its place."""
    try:
        parsed = parse_batch(json.dumps({"operations": items}).encode(), OPS, 4)
    except ApiError as exc:
        assert exc.status == 400 and not 1 <= len(items) <= 4
        return
    assert len(parsed) == len(items)
    for i, item in enumerate(parsed):
        if isinstance(item, BatchRefusal):
            assert item.error.status == 400
            assert item.error.message.startswith(f"operations[{i}]")
        else:
            assert len(item.args) == len(item.op.inputs)


@FUZZ
@given(st.binary(max_size=300))
def test_raw_bodies_are_refused_precisely(body: bytes) -> None:
    with pytest.raises(ApiError) as refused:
        parse_json_inputs(OPS["verify_kzg_proof"], body)
    assert refused.value.status == 400


@FUZZ
@given(st.text(max_size=120) | st.from_regex(r"\Akzg_[0-9a-f]{16}_[A-Za-z0-9_-]{43}\Z"))
def test_api_key_parser(text: str) -> None:
    parts = parse_api_key(text)
    if parts is not None:
        assert text == f"kzg_{parts.key_id}_{parts.secret}"


@FUZZ
@given(
    st.text(max_size=300)
    | st.from_regex(r"\A[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,60}\Z")
)
def test_jwt_header_parser(token: str) -> None:
    try:
        kid = tokens.unverified_kid(token)
    except tokens.TokenError:
        return
    assert isinstance(kid, str)


# A receipt as the gateway builds one (entry, inclusion proof, signed checkpoint), over a
# small tree of entries shaped like the log's, made once with a fresh log key.
RECEIPT_ORIGIN = "kzg-gateway.localhost/audit"
_LOG_KEY = NoteSigner.generate(RECEIPT_ORIGIN)
_ENTRIES = [
    json.dumps({"seq": n + 1, "request_id": f"{n:032x}", "result_digest": f"{n:064x}"},
               sort_keys=True, separators=(",", ":"))
    for n in range(11)
]  # fmt: skip
_TREE = BatchTree(CompactRange(), [leaf_hash(e.encode()) for e in _ENTRIES])
_CHECKPOINT = _LOG_KEY.sign(Checkpoint(RECEIPT_ORIGIN, _TREE.size, _TREE.root()).text())
RECEIPTS = [
    {"entry": e, "proof": TlogProof(i, tuple(_TREE.inclusion_proof(i)), _CHECKPOINT).text()}
    for i, e in enumerate(_ENTRIES)
]
EDIT_CHARS = st.sampled_from(list('0189aAzZ+/=: \n\u2014{}"x'))


def _verdicts(receipt: dict[str, str]) -> tuple[bool, bool]:
    """Whether the product's verifier and the reference verifier accept ``receipt``."""
    try:
        verify_inclusion_proof(
            receipt["entry"].encode(), receipt["proof"], [_LOG_KEY.verifier()], RECEIPT_ORIGIN
        )
        product = True
    except NoteError:  # its only refusal (InclusionError is one)
        product = False
    try:
        reference_tlog.verify_receipt(receipt, [_LOG_KEY.vkey], RECEIPT_ORIGIN)
        reference = True
    except AssertionError:
        reference = False
    return product, reference


def test_receipts_of_the_fuzzed_tree_verify() -> None:
    assert all(_verdicts(r) == (True, True) for r in RECEIPTS)


@FUZZ
@given(
    st.sampled_from(RECEIPTS),
    st.sampled_from(["entry", "proof"]),
    st.integers(0, 10_000),
    st.sampled_from(["replace", "insert", "delete"]),
    EDIT_CHARS,
)
def test_any_edit_of_a_receipt_is_refused_by_both_verifiers(
    receipt: dict[str, str], part: str, at: int, edit: str, char: str
) -> None:
    text = receipt[part]
    at %= len(text) + (edit == "insert")
    if edit == "replace":
        edited = text[:at] + char + text[at + 1 :]
    elif edit == "insert":
        edited = text[:at] + char + text[at:]
    else:
        edited = text[:at] + text[at + 1 :]
    assume(edited != text)
    assert _verdicts({**receipt, part: edited}) == (False, False)


@FUZZ
@given(st.sampled_from(RECEIPTS), st.integers(1, 4000))
def test_a_truncated_proof_is_refused_by_both_verifiers(receipt: dict[str, str], cut: int) -> None:
    proof = receipt["proof"]
    assume(cut < len(proof))
    assert _verdicts({**receipt, "proof": proof[:-cut]}) == (False, False)


@FUZZ
@given(st.text(max_size=400), st.text(max_size=200))
def test_arbitrary_receipt_texts_are_refused_precisely(proof: str, entry: str) -> None:
    assert _verdicts({"entry": entry, "proof": proof}) == (False, False)
