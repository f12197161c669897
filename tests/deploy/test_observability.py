"""The on-call artefacts check out: every Grafana query and alert refers to a metric a
real gateway serves (scraped here), the queries parse as PromQL (promtool), every alert
links a runbook section that exists, the runbook covers what on-call needs, and the
Prometheus scrape job sends the credential /metrics requires."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.security import install
from tests.auth.conftest import CHEAP_ARGON2
from tests.conftest import REPO
from tests.deploy.test_manifests import _manifests, _promtool, _rules
from tests.gateway.conftest import StartGateway, start_gateway  # noqa: F401
from tests.gateway.helpers import hx, make_blob
from tests.test_docs_links import anchors as runbook_anchors

DASHBOARD = REPO / "deploy" / "grafana" / "kzg-gateway.json"
RUNBOOK = REPO / "docs" / "runbook.md"
METRIC = re.compile(r"\b((?:kzg|process)_\w+)")


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _queries() -> list[str]:
    dashboard = _dashboard()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    variables = [
        v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"
    ]
    return exprs + variables


def _served(text: str) -> set[str]:
    """Every series name the exposition offers (histograms and counters expanded)."""
    served = set()
    for name, kind in re.findall(r"^# TYPE (\w+) (\w+)$", text, re.MULTILINE):
        served.add(name)
        if kind == "histogram":
            served |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        if kind == "counter" and not name.endswith("_total"):
            served.add(f"{name}_total")
    return served


@pytest.fixture
async def served(start_gateway: StartGateway) -> set[str]:  # noqa: F811
    gw = await start_gateway(security=install, auth=CHEAP_ARGON2)
    response, _ = await gw.post("/v1/kzg/blob-to-commitment", {"blob": hx(make_blob(3))})
    assert response.status == 200
    response, text = await gw.request("GET", "/metrics", role="monitor")
    assert response.status == 200
    return _served(text.decode())


async def test_dashboard_and_alerts_use_only_metrics_the_gateway_serves(served: set[str]) -> None:
    for query in _queries():
        used = set(METRIC.findall(query))
        assert used, f"a query that reads no gateway metric: {query}"
        assert used <= served, f"{query}: not served: {used - served}"
    alerting = {m for rule in _rules().values() for m in METRIC.findall(rule["expr"])}
    assert alerting <= served, f"alert rules use metrics not served: {alerting - served}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # Each query as a recording rule, Grafana's variables replaced by what they expand to.
    rules = [
        {
            "record": f"dashboard:query_{n}",
            "expr": query.replace("$__rate_interval", "2m").replace("$instance", ".*"),
        }
        for n, query in enumerate(_queries())
        if not query.startswith("label_values(")
    ]
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [_promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_what_on_call_needs() -> None:
    dashboard = _dashboard()
    text = " ".join(_queries())
    for needed in (
        "kzg_http_requests_total",  # throughput and errors
        'status=~"5.."',
        "kzg_operation_duration_seconds_bucket",  # latency per operation
        "by (le, operation)",
        "kzg_pool_queue_depth",
        'outcome="shed"',
        "kzg_audit_commit_seconds_bucket",
        "kzg_audit_batch_size",
        "kzg_audit_tree_size",
        "kzg_audit_checkpoint_timestamp_seconds",
        "kzg_audit_breaker_state",
        "kzg_tls_certificate_not_after_seconds",
        "process_resident_memory_bytes",
        "kzg_workers_resident_memory_bytes",
        "process_cpu_seconds_total",
        "kzg_workers_cpu_seconds_total",
        "kzg_data_dir_free_bytes",
    ):
        assert needed in text, needed
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    assert dashboard["uid"] and "${datasource}" in json.dumps(panels)


def test_every_alert_links_a_runbook_section_that_exists() -> None:
    markdown = RUNBOOK.read_text()
    anchors = runbook_anchors(RUNBOOK)
    for name, rule in _rules().items():
        url = rule["annotations"].get("runbook_url")
        assert url, f"{name} has no runbook_url"
        page, _, anchor = url.partition("#")
        assert page == "docs/runbook.md" and (REPO / page).is_file(), url
        assert anchor == name.lower() and anchor in anchors, f"{name}: no section #{anchor}"
    # Links inside the runbook land on sections too.
    for link in re.findall(r"\]\(#([\w-]+)\)", markdown):
        assert link in anchors, link
    # Each alert's section says what it means, how to diagnose it and how to recover.
    sections = re.split(r"^### ", markdown, flags=re.MULTILINE)[1:]
    for section in sections:
        assert "**Meaning.**" in section, section[:60]
        assert "**Diagnose" in section and "Recover" in section, section[:60]


def test_runbook_covers_the_outages_on_call_meets() -> None:
    rules = _rules()
    for alert in (
        "KzgAuditWriteFailures",  # audit store down
        "KzgAuditBreakerOpen",
        "KzgAuditCommitSlow",
        "KzgPoolSaturated",
        "KzgMemoryHigh",  # OOM
        "KzgMemoryGrowth",
        "KzgCpuSaturated",
        "KzgMasterKeyMismatch",
        "KzgAuditVerificationFailed",
        "KzgTlsCertificateExpiresSoon",
        "KzgSigningKeyPastRotationAge",
    ):
        assert alert in rules, alert
    breaker = rules["KzgAuditBreakerOpen"]
    assert "kzg_audit_breaker_state" in breaker["expr"] and breaker["labels"]["severity"] == "page"
    assert "kzg-gateway doctor" in RUNBOOK.read_text()


def test_prometheus_scrapes_with_a_bearer_token_file() -> None:
    with (REPO / "deploy" / "prometheus" / "scrape.yaml").open() as handle:
        (job,) = yaml.safe_load(handle)["scrape_configs"]
    # The job the KzgGatewayDown rule watches.
    assert f'up{{job="{job["job_name"]}"}}' in _rules()["KzgGatewayDown"]["expr"]
    assert job["scheme"] == "https" and job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].startswith("/")
    assert "credentials" not in job["authorization"], "never the token inline"
    assert job["tls_config"]["ca_file"] and job["tls_config"]["min_version"] == "TLS13"
    # The pods carry no annotation inviting an unauthenticated scrape.
    template = _manifests()["Deployment"]["spec"]["template"]["metadata"]
    assert not any(k.startswith("prometheus.io/") for k in template.get("annotations", {}))
    kept = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert {r["regex"] for r in kept} >= {"kzg-gateway", "https"}
