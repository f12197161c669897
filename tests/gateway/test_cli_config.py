"""``kzg-gateway init`` (idempotent, --json, audited), ``jobs run`` (attributed to the OS
account), serve's refusal on a stale schema, the configuration with its environment
overrides, the policy directory, and errors that name the setting at fault."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from gateway.cli.main import main
from gateway.config import Config, apply_env, load_config
from gateway.db import alembic_config
from tests.audit import reference_tlog
from tests.conftest import OS_ACTOR
from tests.gateway.conftest import CHEAP_ARGON2
from tests.gateway.helpers import ORIGIN

REPO = Path(__file__).resolve().parents[2]


def _init(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["init", "--data-dir", str(data_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _initialised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, dict]:
    """``init`` of ``tmp_path/gw`` with its own master key file and cheap argon2: the data
    directory and what init printed."""
    monkeypatch.delenv("KZG_GATEWAY_MASTER_KEY", raising=False)
    monkeypatch.setenv("KZG_GATEWAY_AUTH__PASSWORDS__TIME_COST", "1")
    data_dir = tmp_path / "gw"
    return data_dir, _init(data_dir, capsys)


def test_init_is_idempotent_and_prints_the_admin_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, first = _initialised(tmp_path, capsys, monkeypatch)
    assert first["url"] == "https://127.0.0.1:8443"
    assert Path(first["ca_cert"]) == (data_dir / "tls" / "ca.pem").resolve()
    assert first["admin"]["username"] == "admin"
    assert first["admin"]["password"] and first["admin"]["totp_secret"]
    for private in ("master.key", "tls/ca.key", "tls/server.key", "gateway.db"):
        assert stat.S_IMODE((data_dir / private).stat().st_mode) == 0o600
    ca_before = (data_dir / "tls" / "ca.pem").read_bytes()

    second = _init(data_dir, capsys)
    assert second["admin"] is None
    assert (data_dir / "tls" / "ca.pem").read_bytes() == ca_before
    assert first["admin"]["password"] not in (data_dir / "gateway.db").read_bytes().decode(
        "latin-1"
    )


def test_jobs_run_checkpoint_signs_the_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KZG_GATEWAY_MASTER_KEY", raising=False)
    data_dir = tmp_path / "gw"
    _init(data_dir, capsys)
    assert main(["jobs", "run", "checkpoint", "--data-dir", str(data_dir)]) == 0
    first = json.loads(capsys.readouterr().out)
    assert set(first) == {"size", "root", "key_id"}
    assert first["key_id"].startswith("log-") and first["size"] >= 1
    # Each run appends its own record, whose commit signs a later head.
    assert main(["jobs", "run", "checkpoint", "--data-dir", str(data_dir)]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["size"] > first["size"] and second["key_id"] == first["key_id"]
    # Both heads are stored, signed by the log key the run named.
    with contextlib.closing(sqlite3.connect(data_dir / "gateway.db")) as db:
        [vkey] = [
            r[0]
            for r in db.execute("SELECT vkey FROM log_keys WHERE key_id = ?", (first["key_id"],))
        ]
        for run in (first, second):
            (note,) = db.execute(
                "SELECT note FROM audit_tree_heads WHERE size = ?", (run["size"],)
            ).fetchone()
            origin, size, root = reference_tlog.open_checkpoint(note, [vkey])
            assert (origin, size, base64.b64encode(root).decode()) == (
                ORIGIN,
                run["size"],
                run["root"],
            )
    assert main(["audit", "verify", "--data-dir", str(data_dir)]) == 0
    assert main(["jobs", "run", "no-such-job", "--data-dir", str(data_dir)]) == 2


def test_serve_refuses_an_uninitialised_data_dir(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--data-dir",
            str(tmp_path / "empty"),
            "--port",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "KZG_GATEWAY_ENGINE__NAME": "ckzg"},
    )
    assert result.returncode != 0
    assert "init" in result.stderr


def test_env_overrides_sections_and_top_level_keys(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        'database_url = "sqlite:///x.db"\n[server]\nport = 9000\nhost = "0.0.0.0"\n'
    )
    config = load_config(
        tmp_path / "config.toml",
        environ={
            "KZG_GATEWAY_SERVER__PORT": "9443",
            "KZG_GATEWAY_POOL__WORKERS": "3",
            "KZG_GATEWAY_DATABASE_URL": "postgresql://u@db/kzg",
            "KZG_GATEWAY_MASTER_KEY": "00" * 32,
            "KZG_GATEWAY_ENGINE__NAME": "ckzg",
        },
    )
    assert config.port == 9443 and config.host == "0.0.0.0"
    assert config.section("pool") == {"workers": 3}
    assert config.section("engine") == {"name": "ckzg"}
    assert config.database_url == "postgresql+asyncpg://u@db/kzg"
    assert "master_key" not in config.data
    assert config.data_dir == Path(".kzg-gateway")


def test_defaults_are_the_embedded_sqlite_database(tmp_path: Path) -> None:
    config = Config({}, tmp_path)
    assert config.database_url == f"sqlite+aiosqlite:///{(tmp_path / 'gateway.db').resolve()}"
    assert config.url == "https://127.0.0.1:8443"
    merged = apply_env({"auth": CHEAP_ARGON2}, {"KZG_GATEWAY_AUTH__PASSWORDS__TIME_COST": "2"})
    assert merged["auth"]["passwords"] == {**CHEAP_ARGON2["passwords"], "time_cost": 2}
    assert CHEAP_ARGON2["passwords"]["time_cost"] == 1


def _log(data_dir: Path) -> list[tuple[str, str, str, dict]]:
    """(action, actor, role, detail) of every record of the data dir's log, in order."""
    with contextlib.closing(sqlite3.connect(data_dir / "gateway.db")) as db:
        rows = db.execute(
            "SELECT action, actor, role, detail FROM audit_events ORDER BY seq"
        ).fetchall()
    return [(action, actor, role, json.loads(detail)) for action, actor, role, detail in rows]


def _pretend_to_be_someone_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a caller's environment may claim; the audit names the process's real user."""
    for name in ("USER", "LOGNAME", "USERNAME"):
        monkeypatch.setenv(name, "mallory")


def test_init_audits_its_acts_as_the_os_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _pretend_to_be_someone_else(monkeypatch)
    data_dir, first = _initialised(tmp_path, capsys, monkeypatch)
    log = _log(data_dir)
    assert [(action, actor, role) for action, actor, role, _ in log] == [
        ("cli:init_schema", OS_ACTOR, "operator"),
        ("cli:init_log_key", OS_ACTOR, "operator"),
        ("cli:init_jwt_key", OS_ACTOR, "operator"),
        ("cli:init_first_admin", OS_ACTOR, "operator"),
    ]
    schema, log_key, jwt_key, admin = (detail for *_, detail in log)
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    assert schema == {"from": [], "to": sorted(heads)}
    assert log_key["key_id"].startswith("log-") and jwt_key["kid"]
    assert admin == {"username": "admin", "roles": ["admin"]}
    # The admin's secrets never reach the log.
    raw = json.dumps(log)
    assert first["admin"]["password"] not in raw and first["admin"]["totp_secret"] not in raw
    # Again: nothing new is created, the schema check is recorded.
    _init(data_dir, capsys)
    again = _log(data_dir)[4:]
    assert [(a, actor) for a, actor, *_ in again] == [("cli:init_schema", OS_ACTOR)]
    assert again[0][3]["from"] == again[0][3]["to"] == schema["to"]


def test_jobs_and_admin_commands_by_hand_are_audited_as_the_os_account(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, _ = _initialised(tmp_path, capsys, monkeypatch)
    _pretend_to_be_someone_else(monkeypatch)
    before = len(_log(data_dir))
    for job in ("checkpoint", "retention", "rotate-keys", "access-review"):
        assert main(["jobs", "run", job, "--data-dir", str(data_dir)]) == 0, job
    assert main(["admin", "api-keys", "list", "--data-dir", str(data_dir)]) == 0
    capsys.readouterr()
    runs = [(action, actor, role) for action, actor, role, _ in _log(data_dir)[before:]]
    assert runs == [
        ("job:checkpoint", OS_ACTOR, "operator"),
        ("job:retention", OS_ACTOR, "operator"),
        ("job:rotate-keys", OS_ACTOR, "operator"),
        ("job:access-review", OS_ACTOR, "operator"),
        ("cli:admin_api_keys_list", OS_ACTOR, "operator"),
    ]
    # After every run the tree head is signed: the latest checkpoint covers the whole log.
    with contextlib.closing(sqlite3.connect(data_dir / "gateway.db")) as db:
        (size,) = db.execute("SELECT size FROM audit_log_head").fetchone()
        (signed,) = db.execute("SELECT max(size) FROM audit_tree_heads").fetchone()
    assert signed == size == before + len(runs)


def _policy_dir(tmp_path: Path, keep_years: int | None = None, drop: str | None = None) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree(REPO / "policies", directory)
    if keep_years is not None:
        (directory / "retention.toml").write_text(f"[audit]\nkeep_years = {keep_years}\n")
    if drop is not None:
        (directory / drop).unlink()
    return directory


def test_retention_policy_is_found_through_the_policy_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KZG_GATEWAY_POLICY_DIR", str(_policy_dir(tmp_path, keep_years=9)))
    # A working directory without policies/, as in the image.
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data_dir, _ = _initialised(tmp_path, capsys, monkeypatch)
    with contextlib.closing(sqlite3.connect(data_dir / "gateway.db")) as db:
        assert db.execute("SELECT keep_years FROM audit_retention").fetchone() == (9,)
    assert main(["jobs", "run", "retention", "--data-dir", str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["keep_years"] == 9


@pytest.mark.parametrize("policy", ["rbac.toml", "security.toml", "retention.toml"])
def test_a_missing_policy_file_stops_every_command_naming_it(
    policy: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KZG_GATEWAY_MASTER_KEY", raising=False)
    directory = _policy_dir(tmp_path, drop=policy)
    monkeypatch.setenv("KZG_GATEWAY_POLICY_DIR", str(directory))
    data_dir = str(tmp_path / "gw")
    for command in (
        ["init"],
        ["serve", "--port", "0"],
        ["jobs", "run", "checkpoint"],
        ["admin", "api-keys", "list"],
    ):
        assert main([*command, "--data-dir", data_dir]) == 2, command
        err = capsys.readouterr().err
        assert f"policy file {directory / policy} is missing" in err, (command, err)
    assert not (tmp_path / "gw").exists(), "nothing was set up"


def test_a_postgresql_deployment_never_falls_back_to_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KZG_GATEWAY_DATABASE_URL", raising=False)
    # No PostgreSQL is reached: every command stops at the configuration.
    monkeypatch.setenv("KZG_GATEWAY_DATABASE_OWNER_URL", "postgresql://kzg_owner:x@db.invalid/kzg")
    monkeypatch.setenv("KZG_GATEWAY_MASTER_KEY", "00" * 32)
    data_dir = tmp_path / "gw"
    data_dir.mkdir()
    for command in (
        ["jobs", "run", "checkpoint"],
        ["admin", "api-keys", "list"],
        ["serve", "--port", "0"],
        ["audit", "verify"],
        ["audit", "export"],
    ):
        assert main([*command, "--data-dir", str(data_dir)]) != 0, command
        err = capsys.readouterr().err
        assert "database_url is not set (KZG_GATEWAY_DATABASE_URL)" in err, (command, err)
        assert "Traceback" not in err
    # init seeds through the owner URL, but only with the role the servers run as.
    assert main(["init", "--data-dir", str(data_dir)]) == 1
    err = capsys.readouterr().err
    assert "database_app_role is not set (KZG_GATEWAY_DATABASE_APP_ROLE)" in err, err
    assert list(data_dir.iterdir()) == [], "no SQLite file, no key, nothing"


def _run(
    tmp_path: Path, command: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """``kzg-gateway COMMAND --data-dir tmp_path/gw`` as a real process, in ``env`` alone."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *command, "--data-dir", str(tmp_path / "gw")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_errors_name_the_missing_setting_in_one_line(tmp_path: Path) -> None:
    """A real process, as an operator runs it: one line on stderr, no traceback."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "KZG_GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
    }
    for command in (["serve", "--port", "0"], ["jobs", "run", "checkpoint"]):
        result = _run(tmp_path, command, env)
        assert result.returncode != 0, command
        assert "KZG_GATEWAY_MASTER_KEY" in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_an_unreachable_database_is_named_by_its_setting(tmp_path: Path) -> None:
    """Nothing listens on port 1: each command names the setting that points there."""
    nowhere = "postgresql://kzg:x@127.0.0.1:1/kzg"
    base = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "KZG_GATEWAY_MASTER_KEY": "00" * 32}
    cases = [
        (
            ["init"],
            {"KZG_GATEWAY_DATABASE_OWNER_URL": nowhere, "KZG_GATEWAY_DATABASE_APP_ROLE": "kzg"},
            "database_owner_url",
        ),
        (["serve", "--port", "0"], {"KZG_GATEWAY_DATABASE_URL": nowhere}, "database_url"),
        (["jobs", "run", "checkpoint"], {"KZG_GATEWAY_DATABASE_URL": nowhere}, "database_url"),
    ]
    for command, env, setting in cases:
        result = _run(tmp_path, command, {**base, **env})
        assert result.returncode == 1, (command, result.stderr)
        assert f"cannot reach the database ({setting})" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1


def test_serve_names_the_tls_file_it_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir, _ = _initialised(tmp_path, capsys, monkeypatch)
    serve = ["serve", "--data-dir", str(data_dir), "--port", "0"]
    monkeypatch.setenv("KZG_GATEWAY_TLS__CERT_FILE", str(tmp_path / "absent.pem"))
    monkeypatch.setenv("KZG_GATEWAY_TLS__KEY_FILE", str(data_dir / "tls" / "server.key"))
    assert main(serve) == 1
    err = capsys.readouterr().err
    assert f"[tls] cert_file {tmp_path / 'absent.pem'} does not exist" in err, err
    # An instance whose data directory never saw init has no development certificate.
    monkeypatch.delenv("KZG_GATEWAY_TLS__CERT_FILE")
    monkeypatch.delenv("KZG_GATEWAY_TLS__KEY_FILE")
    shutil.rmtree(data_dir / "tls")
    assert main(serve) == 1
    assert "no TLS certificate: set [tls] cert_file and key_file" in capsys.readouterr().err
