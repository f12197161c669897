"""Explicit wiring: a dependency that cannot be imported stops the gateway at once, and
which jobs exist does not depend on which modules happen to be imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter: only what it imports is loaded."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize(
    ("broken", "importer"),
    [
        ("gateway.cli.admin", "gateway.cli.main"),  # was: a CLI without its admin commands
        ("auth.bootstrap", "gateway.cli.main"),  # was: an init that creates no first admin
    ],
)
def test_a_broken_dependency_fails_loudly(broken: str, importer: str) -> None:
    """Given a module the CLI needs that cannot be imported, when the CLI is loaded, then
    it fails naming that module, rather than running without it."""
    result = _python(f"import sys; sys.modules[{broken!r}] = None; import {importer}")
    assert result.returncode == 1, result.stderr
    assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr
    assert broken in result.stderr


def test_every_job_is_known_without_importing_its_module_first() -> None:
    """Given a process that loads only the jobs module (as ``jobs run`` did before it
    imported the security module for its side effect), then every job is there."""
    result = _python("import json; from gateway.jobs import JOBS; print(json.dumps(list(JOBS)))")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["checkpoint", "retention", "rotate-keys", "access-review"]
