"""``kzg-gateway admin`` on a real data directory: people, keys, master-key rotation, and
an audit record for every command."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pyotp
import pytest
from sqlalchemy import select

from audit.models import audit_events
from auth.crypto import MasterKey, load_master_key
from auth.models import jwt_keys
from auth.policy import load_policies
from auth.service import AuthService
from gateway.cli.main import main
from gateway.db import make_engine
from gateway.receipts import LogKeySigner, list_log_keys
from tests.audit import reference_tlog
from tests.gateway.helpers import ORIGIN


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
    # An admin never learns a person's secrets: an enrolment token, nothing else.
    assert code == 0 and user["username"] == "bob" and user["roles"] == ["auditor"]
    assert set(user) == {"id", "username", "roles", "enrollment_token", "expires_at"}
    code, reset = _run(capsys, "admin", "users", "reset", "bob", "--data-dir", data)
    assert code == 0 and reset["enrollment_token"] != user["enrollment_token"]
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
    # The admin's TOTP secret, the JWT key and the log key (bob has not enrolled: no
    # secret yet); no BLS receipt key exists.
    assert code == 0 and rotated["rewrapped"] == 3
    assert (tmp_path / "d" / "master.key").read_text() != old_key
    assert (tmp_path / "d" / "master.key").stat().st_mode & 0o077 == 0
    # The old key is kept, dated and 0600: backups sealed under it need it.
    retired = Path(rotated["retired_master_key_file"])
    assert retired.parent == tmp_path / "d" and retired.name.startswith("master.key.2")
    assert retired.read_text() == old_key and retired.stat().st_mode & 0o777 == 0o600

    asyncio.run(_sealed_secrets_open(tmp_path / "d", admin))

    kid = asyncio.run(_current_jwt_kid(tmp_path / "d"))
    code, revoked = _run(capsys, "admin", "jwt-keys", "revoke", kid, "--data-dir", data)
    assert code == 0 and revoked["status"] == "revoked" and revoked["current"] != kid

    # Each command audited; the changes with their record, in one transaction.
    assert main(["audit", "verify", "--data-dir", data]) == 0
    assert asyncio.run(_cli_actions(tmp_path / "d")) == [
        "cli:init_schema",
        "cli:init_log_key",
        "cli:init_jwt_key",
        "cli:init_first_admin",
        "cli:admin_users_create",
        "cli:admin_users_reset",
        "cli:admin_api_keys_create",
        "cli:admin_api_keys_list",
        "cli:admin_api_keys_create",
        "cli:admin_master_key_rotate",
        "cli:admin_jwt_keys_revoke",
    ]


async def _current_jwt_kid(data_dir: Path) -> str:
    engine = make_engine(f"sqlite+aiosqlite:///{data_dir / 'gateway.db'}")
    try:
        async with engine.connect() as conn:
            query = select(jwt_keys.c.kid).where(jwt_keys.c.status == "current")
            return str((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def _sealed_secrets_open(data_dir: Path, admin: dict) -> None:
    """Everything sealed opens under the new key: a login (TOTP secret, JWT key) and the
    log key, whose signatures verify with the published verifier key."""
    master_key = load_master_key(data_dir)
    engine = make_engine(f"sqlite+aiosqlite:///{data_dir / 'gateway.db'}")
    rbac, policy = load_policies()
    service = AuthService(engine, master_key, rbac, policy)
    try:
        totp = pyotp.TOTP(admin["totp_secret"]).now()
        result = await service.login("admin", admin["password"], totp)
        assert (await service.authenticate_token(result.access_token)).name == "admin"
        signer = LogKeySigner(engine, master_key, ORIGIN)
        assert await signer.refresh() is True
        [published] = await list_log_keys(engine)
        assert (published.key_id, published.vkey) == (signer.key_id, signer.vkey)
        note = signer.sign_note(f"{ORIGIN}\n1\n{'A' * 43}=\n")
        assert reference_tlog.open_checkpoint(note, [published.vkey])[:2] == (ORIGIN, 1)
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


def _events(data: Path) -> list[dict]:
    async def read() -> list[dict]:
        engine = make_engine(f"sqlite+aiosqlite:///{data / 'gateway.db'}")
        try:
            async with engine.connect() as conn:
                rows = await conn.execute(select(audit_events).order_by(audit_events.c.seq))
                return [dict(row) for row in rows.mappings()]
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _initialised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A data directory after ``init``, its master key in the key file only."""
    monkeypatch.delenv("KZG_GATEWAY_MASTER_KEY", raising=False)
    data = tmp_path / "d"
    assert main(["init", "--data-dir", str(data), "--json"]) == 0
    capsys.readouterr()
    return data


def test_a_command_that_fails_is_audited_as_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rotation fails half-way (the new key file cannot be staged: a directory is in its
    # place): the audit record must say so, not "success", and nothing is re-sealed.
    data = _initialised(tmp_path, capsys, monkeypatch)
    key_before = (data / "master.key").read_text()
    (data / "master.new").mkdir()  # where the new key is staged
    assert main(["admin", "master-key", "rotate", "--data-dir", str(data)]) != 0
    capsys.readouterr()
    assert (data / "master.key").read_text() == key_before

    event = _events(data)[-1]
    assert event["action"] == "cli:admin_master_key_rotate"
    assert event["outcome"] == "error"
    assert json.loads(event["detail"])["error"] == "IsADirectoryError"


def test_a_command_under_another_master_key_is_refused_before_it_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under a master key other than the one the database records, the log key does not
    # open: nothing could be audited (every record needs a signed tree head), so the
    # command is refused before it runs, says why, and changes nothing.
    data = _initialised(tmp_path, capsys, monkeypatch)
    before = _events(data)
    other = MasterKey.generate().hex()
    (data / "master.key").write_text(other)
    for argv in (
        ["admin", "master-key", "rotate"],
        ["admin", "users", "create", "eve", "--role", "admin"],
    ):
        assert main([*argv, "--data-dir", str(data)]) == 2
        captured = capsys.readouterr()
        assert "log-key" in captured.err and "master key" in captured.err
        assert captured.out == ""
    assert (data / "master.key").read_text() == other
    assert not (data / "master.new").exists()
    assert _events(data) == before


def test_a_master_key_rotation_whose_audit_record_fails_reseals_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The audit store refuses the CLI's records (fault injected by a trigger): the
    # rotation's re-sealing and its record share one transaction, so neither is stored;
    # the command exits 2 saying why, and the key in use stays the key on record.
    data = _initialised(tmp_path, capsys, monkeypatch)
    key_before = (data / "master.key").read_text()
    database = sqlite3.connect(data / "gateway.db")
    try:
        sealed_before = database.execute("SELECT sealed_private_key FROM jwt_keys").fetchall()
        database.execute(
            "CREATE TRIGGER test_refuse_cli BEFORE INSERT ON audit_events "
            "WHEN NEW.action LIKE 'cli:%' BEGIN SELECT RAISE(ABORT, 'injected'); END"
        )
        database.commit()
        assert main(["admin", "master-key", "rotate", "--data-dir", str(data)]) == 2
        assert "audit" in capsys.readouterr().err
        assert (data / "master.key").read_text() == key_before
        assert database.execute("SELECT sealed_private_key FROM jwt_keys").fetchall() == (
            sealed_before
        )
        (check,) = database.execute("SELECT check_value FROM master_key_check").fetchone()
        assert check == MasterKey.from_text(key_before).check_value()
    finally:
        database.close()
