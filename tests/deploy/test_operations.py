"""The operator's view of a running gateway: scripts/health-check.sh against a real HTTPS
server, and every metric the alert rules use is one the gateway serves."""

from __future__ import annotations

import asyncio
import re
import shutil
from pathlib import Path

import yaml

from gateway.security import install
from tests.auth.conftest import CHEAP_ARGON2
from tests.conftest import REPO, missing
from tests.gateway.conftest import StartGateway, start_gateway  # noqa: F401

SCRIPT = REPO / "scripts" / "health-check.sh"


async def _health_check(*args: str) -> tuple[int, str]:
    if shutil.which("curl") is None:
        missing("curl (Debian package curl)")
    process = await asyncio.create_subprocess_exec(
        "bash", str(SCRIPT), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await process.communicate()
    return process.returncode or 0, out.decode()


async def test_health_check_passes_on_a_healthy_gateway(
    start_gateway: StartGateway,  # noqa: F811
    tmp_path: Path,
) -> None:
    gw = await start_gateway(security=install, auth=CHEAP_ARGON2)
    token = tmp_path / "metrics-token"
    token.write_text(await gw.api_key("monitor") + "\n")
    base = ("--url", gw.url, "--cacert", str(gw.ca_file))
    code, out = await _health_check(*base, "--token-file", str(token))
    assert code == 0, out
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["ok", "healthz"],
        ["ok", "readyz"],
        ["ok", "metrics"],
    ]
    # /metrics needs the monitor's credential: without it the check fails on 401.
    code, out = await _health_check(*base)
    assert code == 1, out
    assert "FAIL metrics (HTTP 401" in out


async def test_health_check_fails_when_nothing_answers(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate")
    code, out = await _health_check(
        "--url", "https://127.0.0.1:9", "--cacert", str(ca), "--timeout", "2"
    )
    assert code == 1, out
    assert out.count("FAIL") == 3


async def test_alert_rules_use_metrics_the_gateway_serves(start_gateway: StartGateway) -> None:  # noqa: F811
    gw = await start_gateway(security=install, auth=CHEAP_ARGON2)
    response, body = await gw.request("GET", "/metrics", role="monitor")
    assert response.status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    families = set(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.MULTILINE))
    served = set()
    for name, kind in families:
        served.add(name)
        if kind == "histogram":
            served |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter":
            served.add(name if name.endswith("_total") else f"{name}_total")
    with (REPO / "deploy" / "prometheus" / "alerts.yaml").open() as handle:
        rules = [r for g in yaml.safe_load(handle)["groups"] for r in g["rules"]]
    used = {m for rule in rules for m in re.findall(r"\bkzg_\w+", rule["expr"])}
    assert used, "the rules reference the gateway's metrics"
    assert used <= served, f"alert rules use metrics the gateway does not serve: {used - served}"
    expiry = re.search(r"^kzg_tls_certificate_not_after_seconds (\S+)$", text, re.MULTILINE)
    assert expiry and float(expiry.group(1)) > 0
    # The key-age alert compares the log key (and the JWT key) with their rotation ages.
    kinds = set(re.findall(r'^kzg_signing_key_age_seconds\{kind="(\w+)"\}', text, re.MULTILINE))
    assert kinds == {"jwt", "log"}
    max_kinds = re.findall(r'^kzg_signing_key_max_age_seconds\{kind="(\w+)"\}', text, re.MULTILINE)
    assert set(max_kinds) == {"jwt", "log"}
