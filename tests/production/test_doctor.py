"""``kzg-gateway doctor`` as an operator runs it: a real process on a data directory set up
by ``init``, one JSON object per check, exit 1 when a check fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from auth.crypto import MasterKey
from tests.conftest import PgDatabase, free_port

CHECKS = ["config", "database", "schema", "master_key", "tls", "disk", "memory", "engine"]


def _run(data_dir: Path, env: dict[str, str], *command: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *command, "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode, result.stdout


def _doctor(data_dir: Path, env: dict[str, str]) -> tuple[int, dict[str, dict[str, Any]]]:
    code, out = _run(data_dir, env, "doctor")
    checks = [json.loads(line) for line in out.splitlines()]
    assert [c["check"] for c in checks] == CHECKS, out
    return code, {c["check"]: c for c in checks}


def test_doctor_passes_on_an_initialised_instance_and_names_each_failure(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KZG_GATEWAY_")}
    env["KZG_GATEWAY_ENGINE__NAME"] = "ckzg"
    data_dir = tmp_path / "data"
    code, _ = _run(data_dir, env, "init", "--json")
    assert code == 0

    code, checks = _doctor(data_dir, env)
    assert code == 0, checks
    assert {c["status"] for c in checks.values()} == {"ok"}, checks
    assert checks["tls"]["days_left"] > 30 and checks["disk"]["free_mib"] > 0
    assert checks["engine"]["load_seconds"].keys() == {"ckzg"}

    # Another master key than the one the database records.
    other = {**env, "KZG_GATEWAY_MASTER_KEY": MasterKey.generate().hex()}
    code, checks = _doctor(data_dir, other)
    assert code == 1 and checks["master_key"]["status"] == "fail", checks
    assert checks["database"]["status"] == "ok"

    # The certificate gone.
    (data_dir / "tls" / "server.pem").rename(data_dir / "tls" / "moved.pem")
    code, checks = _doctor(data_dir, env)
    assert code == 1 and checks["tls"]["status"] == "fail"
    assert "server.pem is missing" in checks["tls"]["detail"]

    # A database that does not answer: reported, not a traceback, and the schema skipped.
    down = {
        **env,
        "KZG_GATEWAY_DATABASE_URL": f"postgresql+asyncpg://nobody:x@127.0.0.1:{free_port()}/none",
    }
    code, checks = _doctor(data_dir, down)
    assert code == 1
    assert checks["database"]["status"] == "fail" and checks["schema"]["status"] == "fail"
    assert checks["schema"]["detail"] == "skipped: the database does not answer"
    assert checks["config"]["status"] == "ok"


def test_doctor_on_postgresql(tmp_path: Path, pg_database: PgDatabase) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KZG_GATEWAY_")}
    env |= {
        "KZG_GATEWAY_ENGINE__NAME": "ckzg",
        "KZG_GATEWAY_DATABASE_URL": pg_database.app_url,
        "KZG_GATEWAY_DATABASE_OWNER_URL": pg_database.owner_url,
        "KZG_GATEWAY_DATABASE_APP_ROLE": pg_database.app_role,
    }
    data_dir = tmp_path / "data"
    code, checks = _doctor(data_dir, env)
    # Before init: no schema, no master key, no certificate; each named, none a traceback.
    assert code == 1 and checks["database"]["status"] == "ok"
    assert (
        checks["schema"]["status"] == "fail"
        and "schema is behind this release" in checks["schema"]["detail"]
    )
    assert checks["master_key"]["status"] == "fail"
    assert checks["tls"]["status"] == "fail"
    assert _run(data_dir, env, "init", "--json")[0] == 0
    code, checks = _doctor(data_dir, env)
    assert code == 0, checks
    assert checks["config"]["detail"].endswith("(postgresql)")
    assert checks["disk"]["detail"] == "PostgreSQL: no local data to store"


def test_memory_check_reads_the_cgroup_limit(tmp_path: Path) -> None:
    from gateway.cli.doctor import _cgroup_available_mib

    (tmp_path / "memory.max").write_text(f"{2 * 2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**30 + 2**29}\n")
    assert _cgroup_available_mib(tmp_path) == 512
    (tmp_path / "memory.max").write_text("max\n")
    assert _cgroup_available_mib(tmp_path) is None
    assert _cgroup_available_mib(tmp_path / "absent") is None
