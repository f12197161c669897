"""``kzg-gateway admin`` on a real data directory: people, keys, master-key rotation, and
an audit record for every command."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import select

from audit.models import audit_events
from auth.crypto import MasterKey, load_master_key
from auth.policy import load_policies
from auth.service import AuthService
from gateway.cli import main
from gateway.db import make_engine
from gateway.receipts import ReceiptSigner


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip().startswith("{") else {}


def test_admin_commands_and_master_key_rotation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KZG_GATEWAY_MASTER_KEY", raising=False)
    data = str(tmp_path / "d")
    assert main(["init", "--data-dir", data, "--json"]) == 0
    admin = json.loads(capsys.readouterr().out)["admin"]
    code, user = _run(
        capsys, "admin", "users", "create", "bob", "--role", "auditor", "--data-dir", data
    )
    assert code == 0 and user["username"] == "bob"
    code, key = _run(
        capsys,
        "admin",
        "api-keys",
        "create",
        "--name",
        "ci",
        "--role",
        "client",
        "--data-dir",
        data,
    )
    assert code == 0 and key["api_key"].startswith("kzg_")
    code, listed = _run(capsys, "admin", "api-keys", "list", "--data-dir", data)
    assert key["api_key"] not in json.dumps(listed) and listed["api_keys"][0]["id"] == key["id"]
    assert (
        main(["admin", "api-keys", "create", "--name", "x", "--role", "admin", "--data-dir", data])
        == 1
    )
    capsys.readouterr()

    old_key = (tmp_path / "d" / "master.key").read_text()
    code, rotated = _run(capsys, "admin", "master-key", "rotate", "--data-dir", data)
    assert code == 0 and rotated["rewrapped"] >= 4
    assert (tmp_path / "d" / "master.key").read_text() != old_key
    assert (tmp_path / "d" / "master.key").stat().st_mode & 0o077 == 0

    asyncio.run(_sealed_secrets_open(tmp_path / "d", admin))

    # init, two creates, the refused create, the list and the rotation: each audited.
    assert main(["audit", "verify", "--data-dir", data]) == 0
    assert asyncio.run(_cli_actions(tmp_path / "d")) == [
        "cli:admin_users_create",
        "cli:admin_api_keys_create",
        "cli:admin_api_keys_list",
        "cli:admin_api_keys_create",
        "cli:admin_master_key_rotate",
    ]


async def _sealed_secrets_open(data_dir: Path, admin: dict) -> None:
    """Everything sealed opens under the new key: a login (TOTP secret, JWT key) and the
    receipt signer."""
    master_key = load_master_key(data_dir)
    engine = make_engine(f"sqlite+aiosqlite:///{data_dir / 'gateway.db'}")
    rbac, policy = load_policies()
    service = AuthService(engine, master_key, rbac, policy)
    try:
        totp = pyotp.TOTP(admin["totp_secret"]).now()
        result = await service.login("admin", admin["password"], totp)
        assert (await service.authenticate_token(result.access_token)).name == "admin"
        assert await ReceiptSigner(engine, master_key).refresh() is True
    finally:
        await engine.dispose()


async def _cli_actions(data_dir: Path) -> list[str]:
    engine = make_engine(f"sqlite+aiosqlite:///{data_dir / 'gateway.db'}")
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(audit_events.c.action, audit_events.c.outcome).order_by(audit_events.c.seq)
            )
            actions = [(r.action, r.outcome) for r in rows if r.action.startswith("cli:")]
    finally:
        await engine.dispose()
    assert ("cli:admin_api_keys_create", "invalid") in actions
    return [a for a, _ in actions]


def test_a_command_that_fails_is_audited_as_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under a master key other than the one the database records, rotation is refused
    # with a MasterKeyMismatch: the audit record must say so, not "success".
    monkeypatch.delenv("KZG_GATEWAY_MASTER_KEY", raising=False)
    data = tmp_path / "d"
    assert main(["init", "--data-dir", str(data), "--json"]) == 0
    capsys.readouterr()
    (data / "master.key").write_text(MasterKey.generate().hex())
    assert main(["admin", "master-key", "rotate", "--data-dir", str(data)]) != 0
    capsys.readouterr()

    async def last_event() -> dict:
        engine = make_engine(f"sqlite+aiosqlite:///{data / 'gateway.db'}")
        try:
            async with engine.connect() as conn:
                query = select(audit_events).order_by(audit_events.c.seq.desc()).limit(1)
                return dict((await conn.execute(query)).mappings().one())
        finally:
            await engine.dispose()

    event = asyncio.run(last_event())
    assert event["action"] == "cli:admin_master_key_rotate"
    assert event["outcome"] == "error"
    assert json.loads(event["detail"])["error"] == "MasterKeyMismatch"
