"""``kzg-gateway init`` (idempotent, --json), ``jobs run``, serve's refusal on a stale
schema, and the configuration with its environment overrides."""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import Config, apply_env, load_config
from tests.audit import reference_tlog
from tests.gateway.conftest import CHEAP_ARGON2
from tests.gateway.helpers import ORIGIN

REPO = Path(__file__).resolve().parents[2]


def _init(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["init", "--data-dir", str(data_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_init_is_idempotent_and_prints_the_admin_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KZG_GATEWAY_MASTER_KEY", raising=False)
    monkeypatch.setenv("KZG_GATEWAY_AUTH__PASSWORDS__TIME_COST", "1")
    data_dir = tmp_path / "gw"
    first = _init(data_dir, capsys)
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
