"""The examples of docs/client.md (and of the README's "Using the gateway from Python"
section) run as written: each Python block runs in a fresh interpreter against a real
gateway, with the settings the guide says it reads from the environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client.conftest import LiveGateway

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "client.md"
README = REPO / "README.md"
README_SECTION = "## Using the gateway from Python"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def _guide_blocks() -> list[str]:
    return BLOCK.findall(GUIDE.read_text(encoding="utf-8"))


def _readme_blocks() -> list[str]:
    """The Python blocks of the README's SDK section (up to the next section)."""
    text = README.read_text(encoding="utf-8")
    start = text.find(README_SECTION)
    if start < 0:
        return []
    end = text.find("\n## ", start + len(README_SECTION))
    return BLOCK.findall(text[start : end if end >= 0 else len(text)])


def _blocks() -> list[str]:
    return _guide_blocks() + _readme_blocks()


def test_the_guide_shows_what_users_need() -> None:
    """The guide keeps its examples of sync, async, batch and receipts (a test that
    passes because the examples were deleted would prove nothing)."""
    text = "\n".join(_guide_blocks())
    for needed in (
        "GatewayClient(",
        "AsyncGatewayClient(",
        ".batch(",
        ".save(",
        "Receipt.load(",
        "verify_receipt(",
        "username=",
    ):
        assert needed in text, f"docs/client.md has no example using {needed}"


@pytest.fixture(scope="module")
def environment(live_gateway: LiveGateway) -> dict[str, str]:
    person = live_gateway.create_user("docs-reader", ["client"])
    return {
        **os.environ,
        "GATEWAY_URL": live_gateway.url,
        "GATEWAY_CA_FILE": str(live_gateway.ca_file),
        "GATEWAY_API_KEY": live_gateway.api_key(),
        "GATEWAY_LOG_KEY": live_gateway.vkeys[-1],
        "GATEWAY_USERNAME": "docs-reader",
        "GATEWAY_PASSWORD": person["password"],
        "GATEWAY_TOTP_SECRET": person["totp_secret"],
    }


@pytest.mark.parametrize("index", range(len(_blocks())), ids=lambda i: f"block{i + 1}")
def test_each_example_runs_as_written(
    index: int, environment: dict[str, str], tmp_path: Path
) -> None:
    code = _blocks()[index]
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"example {index + 1} failed:\n{code}\n{done.stderr}"
    assert done.stdout.strip(), "an example that prints nothing shows the reader nothing"
