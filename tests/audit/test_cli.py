"""``kzg-gateway audit verify|export|verify-receipt`` without a running server."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from audit.chain import canonical_json
from audit.signing import NoteLogSigner
from audit.tlog import Checkpoint
from audit.writer import AppendResult, AuditWriter
from gateway.cli.audit import (
    DATABASE_URL_ENV,
    EXIT_INVALID,
    EXIT_UNREADABLE,
    EXIT_VALID,
    data_dir_database_url,
    register,
)
from gateway.db import DEFAULT_DATABASE_FILE
from gateway.receipts import result_digest
from tests.audit.conftest import TEST_ORIGIN, AuditStore, make_engine, migrate_audit
from tests.audit.helpers import BlsSigner, make_event, tamper
from tests.audit.test_verify import store_log_keys

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _run(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="kzg-gateway")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    return args.func(args, out=out), out.getvalue()


async def _in_thread(*argv: str) -> tuple[int, str]:
    """The commands run their own event loop, as they do from a shell."""
    return await asyncio.to_thread(_run, *argv)


def _sync_url(url: str) -> str:
    """The URL as an operator types it, without the async driver."""
    return url.replace("+aiosqlite", "").replace("+asyncpg", "")


async def _append(url: str, log_signer: NoteLogSigner, numbers: range) -> list[AppendResult]:
    engine = make_engine(url)
    writer = AuditWriter(engine, log_signer)
    await writer.start()
    try:
        return [await writer.append(make_event(n)) for n in numbers]
    finally:
        await writer.stop()
        await engine.dispose()


@pytest.fixture
async def seven(audit_store: AuditStore, log_signer: NoteLogSigner) -> list[AppendResult]:
    return await _append(audit_store.app_url, log_signer, range(1, 8))


async def test_verify_database_then_export_file(
    audit_store: AuditStore, log_signer: NoteLogSigner, seven: list[AppendResult], tmp_path: Path
) -> None:
    url = _sync_url(audit_store.app_url)
    code, out = await _in_thread("audit", "verify", "--db-url", url, "--key", log_signer.vkey)
    assert code == EXIT_VALID, out
    assert "audit log valid (full" in out and "7 entries checked, tree size 7" in out
    assert "against the pinned keys" in out

    export = tmp_path / "audit.jsonl"
    code, _ = await _in_thread("audit", "export", "--db-url", url, "--output", str(export))
    assert code == EXIT_VALID
    last = json.loads(export.read_text().splitlines()[-1])
    assert isinstance(last.pop("issued_at"), str)
    assert last == {"type": "checkpoint", "size": 7, "note": seven[-1].batch.checkpoint}

    code, out = await _in_thread(
        "audit", "verify", "--export", str(export), "--key", log_signer.vkey, "--json"
    )
    assert code == EXIT_VALID
    report = json.loads(out)
    assert report["head"]["size"] == 7 and report["keys_source"] == "pinned"

    # A key of another log: the signature of the latest tree head fails.
    other = NoteLogSigner.generate(TEST_ORIGIN).vkey
    code, out = await _in_thread("audit", "verify", "--export", str(export), "--key", other)
    assert code == EXIT_INVALID and "first bad seq 7" in out


async def test_verify_names_the_first_bad_seq(
    audit_store: AuditStore, log_signer: NoteLogSigner, seven: list[AppendResult], tmp_path: Path
) -> None:
    await tamper(audit_store, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 3")
    url = _sync_url(audit_store.app_url)

    code, out = await _in_thread("audit", "verify", "--db-url", url, "--key", log_signer.vkey)

    assert code == EXIT_INVALID
    assert "audit log INVALID: first bad seq 3" in out
    export = tmp_path / "audit.jsonl"
    await _in_thread("audit", "export", "--db-url", url, "--output", str(export))
    code, out = await _in_thread(
        "audit", "verify", "--export", str(export), "--key", log_signer.vkey, "--json"
    )
    # An export holds no leaf hashes: the tampered entry breaks the signed root.
    assert code == EXIT_INVALID and json.loads(out)["first_bad_seq"] == 1

    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text("".join(export.read_text().splitlines(keepends=True)[:-3]))
    code, out = await _in_thread(
        "audit", "verify", "--export", str(truncated), "--key", log_signer.vkey
    )
    assert code == EXIT_INVALID and "truncated" in out


async def test_held_checkpoint_must_be_extended(
    audit_store: AuditStore,
    log_signer: NoteLogSigner,
    seven: list[AppendResult],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    held = tmp_path / "checkpoint.note"
    held.write_text(seven[4].batch.checkpoint)  # size 5
    forged = tmp_path / "forged.note"
    forged.write_text(log_signer.sign_note(Checkpoint(TEST_ORIGIN, 5, b"\x00" * 32).text()))
    legacy = tmp_path / "checkpoint.json"
    legacy.write_text(json.dumps({"seq": 5, "hash": "00" * 32}))
    url = _sync_url(audit_store.app_url)
    key = log_signer.vkey

    ok, out = await _in_thread(
        "audit", "verify", "--db-url", url, "--key", key, "--checkpoint", str(held)
    )
    assert ok == EXIT_VALID and "(consistency:" in out
    bad, out = await _in_thread(
        "audit", "verify", "--db-url", url, "--key", key, "--checkpoint", str(forged)
    )
    assert bad == EXIT_INVALID and "first bad seq 5" in out
    refused, _ = await _in_thread(
        "audit", "verify", "--db-url", url, "--key", key, "--checkpoint", str(legacy)
    )
    assert refused == EXIT_UNREADABLE
    assert "JSON checkpoint of the first release" in capsys.readouterr().err


async def test_sample_and_keys_read_from_the_database(
    audit_store: AuditStore,
    log_signer: NoteLogSigner,
    seven: list[AppendResult],
    tmp_path: Path,
) -> None:
    url = _sync_url(audit_store.app_url)
    code, out = await _in_thread("audit", "verify", "--db-url", url, "--sample", "3", "--json")
    # No --key and no log_keys table: nothing to check the signatures with.
    assert code == EXIT_INVALID and "no log key" in json.loads(out)["reason"]

    await store_log_keys(audit_store, [log_signer.vkey])
    code, out = await _in_thread("audit", "verify", "--db-url", url, "--sample", "3")
    assert code == EXIT_VALID, out
    assert "(sample:" in out and "3 of 3 sampled entries checked" in out
    assert "keys read from the database" in out
    code, out = await _in_thread("audit", "verify", "--db-url", url, "--keep-years", "7", "--json")
    assert code == EXIT_VALID and json.loads(out)["retention_floor"] is not None

    export = tmp_path / "audit.jsonl"
    await _in_thread("audit", "export", "--db-url", url, "--output", str(export))
    assert _run("audit", "verify", "--export", str(export), "--sample", "3")[0] == EXIT_UNREADABLE


def test_unreadable_sources_exit_2(tmp_path: Path) -> None:
    assert (
        _run("audit", "verify", "--export", str(tmp_path / "missing.jsonl"))[0] == EXIT_UNREADABLE
    )
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    assert _run("audit", "verify", "--export", str(garbage))[0] == EXIT_UNREADABLE
    old = tmp_path / "v1.jsonl"
    old.write_text('{"type":"header","format":"kzg-gateway-audit-export","version":1}\n')
    assert _run("audit", "verify", "--export", str(old))[0] == EXIT_UNREADABLE
    assert _run("audit", "verify", "--db-url", "nonsense")[0] == EXIT_UNREADABLE
    legacy_key = "receipt-1=" + "ab" * 48
    assert _run("audit", "verify", "--export", str(old), "--key", legacy_key)[0] == EXIT_UNREADABLE


async def test_data_dir_finds_the_embedded_sqlite_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_signer: NoteLogSigner
) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    assert _run("audit", "verify", "--data-dir", str(data_dir))[0] == EXIT_UNREADABLE

    url = f"sqlite+aiosqlite:///{data_dir / DEFAULT_DATABASE_FILE}"
    await migrate_audit(url)
    await _append(url, log_signer, range(1, 2))

    code, out = await _in_thread(
        "audit", "verify", "--data-dir", str(data_dir), "--key", log_signer.vkey
    )
    assert code == EXIT_VALID and "tree size 1" in out


def test_data_dir_follows_the_configured_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    (tmp_path / "config.toml").write_text('database_url = "postgresql://db.internal/kzg"\n')
    assert data_dir_database_url(tmp_path) == "postgresql+asyncpg://db.internal/kzg"
    monkeypatch.setenv(DATABASE_URL_ENV, "sqlite:////srv/kzg/other.db")
    assert data_dir_database_url(tmp_path) == "sqlite+aiosqlite:////srv/kzg/other.db"


# -- verify-receipt ----------------------------------------------------------------------


@pytest.fixture
async def sqlite_log(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'receipts.db'}"
    await migrate_audit(url)
    return url


async def test_verify_receipt_round_trip(
    sqlite_log: str, log_signer: NoteLogSigner, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = await _append(sqlite_log, log_signer, range(1, 4))
    r = results[1]
    receipt = tmp_path / "receipt.json"
    receipt.write_text(json.dumps({"entry": r.entry, "proof": r.inclusion_proof()}))

    code, out = _run("audit", "verify-receipt", str(receipt), "--key", log_signer.vkey)
    assert code == EXIT_VALID, out
    assert "receipt valid: request_id req-2, seq 2 (index 1)" in out
    assert "checkpoint of size 2" in out

    altered = tmp_path / "altered.json"
    entry = r.entry.replace('"success"', '"denied"')
    altered.write_text(json.dumps({"entry": entry, "proof": r.inclusion_proof()}))
    code, out = _run("audit", "verify-receipt", str(altered), "--key", log_signer.vkey)
    assert code == EXIT_INVALID and "receipt INVALID" in out

    other = NoteLogSigner.generate(TEST_ORIGIN).vkey
    code, out = _run("audit", "verify-receipt", str(receipt), "--key", other)
    assert code == EXIT_INVALID and "receipt INVALID" in out
    assert _run("audit", "verify-receipt", str(receipt))[0] == EXIT_UNREADABLE
    assert "--key" in capsys.readouterr().err


async def test_verify_receipt_of_a_whole_answer(
    sqlite_log: str, log_signer: NoteLogSigner, tmp_path: Path
) -> None:
    answer = {"proof": "0x" + "c0" + "00" * 47}
    engine = make_engine(sqlite_log)
    writer = AuditWriter(engine, log_signer)
    await writer.start()
    try:
        await writer.append(make_event(1))
        r = await writer.append(make_event(2, result_digest=result_digest(answer)))
        await writer.append(make_event(3))
    finally:
        await writer.stop()
        await engine.dispose()
    body = {**answer, "receipt": {"entry": r.entry, "proof": r.inclusion_proof()}}
    saved = tmp_path / "answer.json"
    saved.write_text(json.dumps(body))

    code, out = _run("audit", "verify-receipt", str(saved), "--key", log_signer.vkey)
    assert code == EXIT_VALID, out
    assert "request_id req-2, seq 2 (index 1)" in out and "answer matches" in out

    saved.write_text(json.dumps({**body, "proof": "0x" + "c0" + "11" * 47}))
    code, out = _run("audit", "verify-receipt", str(saved), "--key", log_signer.vkey)
    assert code == EXIT_INVALID and "result_digest" in out


def test_verify_receipt_of_the_first_release(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bls = BlsSigner()
    output = {"valid": True}
    message = canonical_json(
        {
            "operation": "verify_kzg_proof",
            "request_id": "req-9",
            "audit_seq": 9,
            "issued_at": "2026-01-02T03:04:05.000000Z",
            "input_sha256": {"blob": "00" * 32},
            "output": output,
        }
    )
    receipt = {
        "key_id": bls.key_id,
        "scheme": "bls12381-aug",
        "message": message,
        "signature": "0x" + bls.sign(message.encode()).hex(),
    }
    saved = tmp_path / "answer.json"
    saved.write_text(json.dumps({**output, "receipt": receipt}))
    keys = tmp_path / "receipt-keys.json"
    keys.write_text(
        json.dumps({"keys": [{"key_id": bls.key_id, "public_key": "0x" + bls.public_key.hex()}]})
    )

    code, out = _run("audit", "verify-receipt", str(saved), "--receipt-keys", str(keys))
    assert code == EXIT_VALID, out
    assert "request_id req-9, audit seq 9" in out and "not the answer" not in out
    pair = f"{bls.key_id}={bls.public_key.hex()}"
    assert _run("audit", "verify-receipt", str(saved), "--receipt-key", pair)[0] == EXIT_VALID

    wrong = f"{bls.key_id}={BlsSigner().public_key.hex()}"
    code, out = _run("audit", "verify-receipt", str(saved), "--receipt-key", wrong)
    assert code == EXIT_INVALID and "does not verify" in out
    assert _run("audit", "verify-receipt", str(saved))[0] == EXIT_UNREADABLE
    assert "--receipt-key" in capsys.readouterr().err


async def test_verify_with_keys_that_check_nothing_fails(
    audit_store: AuditStore, log_signer: NoteLogSigner
) -> None:
    """An empty log checks no signature: a junk pinned key must not pass for a proof."""
    url = _sync_url(audit_store.app_url)
    junk = NoteLogSigner.generate(TEST_ORIGIN).vkey
    for key in (junk, log_signer.vkey):
        code, out = await _in_thread("audit", "verify", "--db-url", url, "--key", key)
        assert code == EXIT_INVALID, out
        assert "no signature was checked" in out and "checked against" not in out
    code, out = await _in_thread("audit", "verify", "--db-url", url, "--key", junk, "--json")
    assert code == EXIT_INVALID and json.loads(out)["signatures"] == 0

    await _append(audit_store.app_url, log_signer, range(1, 3))
    code, out = await _in_thread("audit", "verify", "--db-url", url, "--key", junk)
    assert code == EXIT_INVALID and "first bad seq 2" in out
    code, out = await _in_thread("audit", "verify", "--db-url", url, "--key", log_signer.vkey)
    assert code == EXIT_VALID and "against the pinned keys" in out


async def test_verify_counts_only_entries_before_the_first_bad_seq(
    audit_store: AuditStore, log_signer: NoteLogSigner
) -> None:
    """A damaged stored subtree is named at its first record while the walk goes on: the
    count of entries verified before it cannot exceed what lies before it."""
    engine = make_engine(audit_store.app_url)
    writer = AuditWriter(engine, log_signer)
    await writer.start()
    try:
        await asyncio.gather(*(writer.append(make_event(n)) for n in range(300)))
    finally:
        await writer.stop()
        await engine.dispose()
    await tamper(
        audit_store,
        ("UPDATE audit_tree SET hash = :h WHERE level = 8 AND idx = 0", {"h": b"\x07" * 32}),
    )
    url = _sync_url(audit_store.app_url)
    code, out = await _in_thread("audit", "verify", "--db-url", url, "--key", log_signer.vkey)
    assert code == EXIT_INVALID
    assert "first bad seq 1:" in out and "(0 entries verified before it)" in out, out
