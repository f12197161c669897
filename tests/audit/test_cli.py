"""``kzg-gateway audit verify|export`` without a running server."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from audit.checkpoints import issue_checkpoint
from audit.writer import AuditWriter
from gateway.cli_audit import (
    DATABASE_URL_ENV,
    DEFAULT_DATABASE_FILE,
    EXIT_INVALID,
    EXIT_UNREADABLE,
    EXIT_VALID,
    data_dir_database_url,
    register,
)
from tests.audit.conftest import AuditStore, make_engine, migrate_audit
from tests.audit.helpers import BlsSigner, make_event, tamper

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def _run(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="kzg-gateway")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out = io.StringIO()
    return args.func(args, out=out), out.getvalue()


def _sync_url(url: str) -> str:
    """The URL as an operator types it, without the async driver."""
    return url.replace("+aiosqlite", "").replace("+asyncpg", "")


@pytest.fixture
async def signed_chain(audit_store: AuditStore) -> BlsSigner:
    signer = BlsSigner()
    engine = make_engine(audit_store.app_url)
    writer = AuditWriter(engine)
    await writer.start()
    for n in range(6):
        await writer.append(make_event(n))
    await issue_checkpoint(engine, signer, NOW)
    await writer.append(make_event(6))
    await writer.stop()
    await engine.dispose()
    return signer


def _key_arg(signer: BlsSigner) -> str:
    return f"{signer.key_id}={signer.public_key.hex()}"


async def test_verify_database_then_export_file(
    audit_store: AuditStore, signed_chain: BlsSigner, tmp_path: Path
) -> None:
    url = _sync_url(audit_store.app_url)
    code, out = await _in_thread(
        "audit", "verify", "--db-url", url, "--key", _key_arg(signed_chain)
    )
    assert code == EXIT_VALID, out
    assert "valid: 7 records checked, head seq 7" in out

    export = tmp_path / "audit.jsonl"
    code, _ = await _in_thread("audit", "export", "--db-url", url, "--output", str(export))
    assert code == EXIT_VALID
    lines = export.read_text().splitlines()
    assert json.loads(lines[-1])["seq"] == 7

    code, out = await _in_thread(
        "audit", "verify", "--export", str(export), "--key", _key_arg(signed_chain), "--json"
    )
    assert code == EXIT_VALID
    assert json.loads(out)["head"]["seq"] == 7


async def test_verify_names_the_first_bad_seq(
    audit_store: AuditStore, signed_chain: BlsSigner, tmp_path: Path
) -> None:
    await tamper(audit_store, "UPDATE audit_events SET actor = 'mallory' WHERE seq = 3")
    url = _sync_url(audit_store.app_url)

    code, out = await _in_thread(
        "audit", "verify", "--db-url", url, "--key", _key_arg(signed_chain)
    )

    assert code == EXIT_INVALID
    assert "first bad seq 3" in out
    export = tmp_path / "audit.jsonl"
    await _in_thread("audit", "export", "--db-url", url, "--output", str(export))
    code, out = await _in_thread("audit", "verify", "--export", str(export), "--json")
    assert code == EXIT_INVALID and json.loads(out)["first_bad_seq"] == 3


async def test_held_checkpoint_must_be_extended(
    audit_store: AuditStore, signed_chain: BlsSigner, tmp_path: Path
) -> None:
    engine = make_engine(audit_store.app_url)
    checkpoint = await issue_checkpoint(engine, signed_chain, NOW)
    await engine.dispose()
    assert checkpoint is not None
    held = tmp_path / "checkpoint.json"
    held.write_text(json.dumps(checkpoint.to_dict()))
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**checkpoint.to_dict(), "hash": "00" * 32}))
    url = _sync_url(audit_store.app_url)
    key = _key_arg(signed_chain)

    ok, _ = await _in_thread(
        "audit", "verify", "--db-url", url, "--key", key, "--checkpoint", str(held)
    )
    bad, out = await _in_thread(
        "audit", "verify", "--db-url", url, "--key", key, "--checkpoint", str(forged)
    )
    assert (ok, bad) == (EXIT_VALID, EXIT_INVALID)
    assert f"first bad seq {checkpoint.seq}" in out


def test_unreadable_sources_exit_2(tmp_path: Path) -> None:
    assert (
        _run("audit", "verify", "--export", str(tmp_path / "missing.jsonl"))[0] == EXIT_UNREADABLE
    )
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    assert _run("audit", "verify", "--export", str(garbage))[0] == EXIT_UNREADABLE
    assert _run("audit", "verify", "--db-url", "nonsense")[0] == EXIT_UNREADABLE


async def _in_thread(*argv: str) -> tuple[int, str]:
    """The commands run their own event loop, as they do from a shell."""
    return await asyncio.to_thread(_run, *argv)


async def test_data_dir_finds_the_embedded_sqlite_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    assert _run("audit", "verify", "--data-dir", str(data_dir))[0] == EXIT_UNREADABLE

    url = f"sqlite+aiosqlite:///{data_dir / DEFAULT_DATABASE_FILE}"
    await migrate_audit(url)
    engine = make_engine(url)
    writer = AuditWriter(engine)
    await writer.start()
    await writer.append(make_event(1))
    await writer.stop()
    await engine.dispose()

    code, out = await _in_thread("audit", "verify", "--data-dir", str(data_dir))
    assert code == EXIT_VALID and "head seq 1" in out


def test_data_dir_follows_the_configured_database_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    (tmp_path / "config.toml").write_text('database_url = "postgresql://db.internal/kzg"\n')
    assert data_dir_database_url(tmp_path) == "postgresql+asyncpg://db.internal/kzg"
    monkeypatch.setenv(DATABASE_URL_ENV, "sqlite:////srv/kzg/other.db")
    assert data_dir_database_url(tmp_path) == "sqlite+aiosqlite:////srv/kzg/other.db"
