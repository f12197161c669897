"""The deployment artefacts say what an operator relies on: checked field by field."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from typing import Any

import pytest
import yaml

from audit.settings import AuditSettings
from gateway.config import load_config
from tests.conftest import REPO, missing

DEPLOY = REPO / "deploy"


def _manifests() -> dict[str, dict[str, Any]]:
    with (DEPLOY / "kubernetes" / "gateway.yaml").open() as handle:
        docs = [doc for doc in yaml.safe_load_all(handle) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    return _manifests()


def _container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_every_object_is_present(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {
        "ConfigMap",
        "Job",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    }


def test_pod_runs_unprivileged(manifests: dict[str, dict[str, Any]]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["automountServiceAccountToken"] is False
    context = _container(manifests)["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["runAsNonRoot"] is True


def test_probes_use_the_health_routes_over_https(manifests: dict[str, dict[str, Any]]) -> None:
    container = _container(manifests)
    port_names = {port["name"] for port in container["ports"]}
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert (get["path"], get["scheme"]) == (path, "HTTPS"), probe
        assert get["port"] in port_names, probe
    # A rolling restart must take a pod out of the Service before its drain ends.
    grace = manifests["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < grace


def test_resources_are_bounded(manifests: dict[str, dict[str, Any]]) -> None:
    resources = _container(manifests)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind


def test_secrets_come_from_secret_objects(manifests: dict[str, dict[str, Any]]) -> None:
    env = {item["name"]: item for item in _container(manifests)["env"]}
    for name in ("KZG_GATEWAY_MASTER_KEY", "KZG_GATEWAY_DATABASE_URL"):
        assert "value" not in env[name], f"{name} must not be inline"
        assert env[name]["valueFrom"]["secretKeyRef"]["name"]


def test_writable_paths_are_volumes(manifests: dict[str, dict[str, Any]]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    volumes = {volume["name"] for volume in pod["volumes"]}
    mounts = _container(manifests)["volumeMounts"]
    assert {mount["name"] for mount in mounts} <= volumes
    writable = {mount["mountPath"] for mount in mounts if not mount.get("readOnly")}
    assert "/tmp" in writable


def test_service_pdb_and_hpa_select_the_deployment(manifests: dict[str, dict[str, Any]]) -> None:
    deployment = manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert manifests["Service"]["spec"]["selector"].items() <= labels.items()
    assert (
        manifests["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items()
        <= labels.items()
    )
    target = manifests["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    container_ports = {port["name"] for port in _container(manifests)["ports"]}
    assert {port["targetPort"] for port in manifests["Service"]["spec"]["ports"]} <= container_ports
    hpa = manifests["HorizontalPodAutoscaler"]["spec"]
    pdb = manifests["PodDisruptionBudget"]["spec"]
    assert hpa["minReplicas"] > pdb["minAvailable"], "a voluntary eviction must stay possible"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _config_toml(manifests: dict[str, dict[str, Any]]) -> str:
    return manifests["ConfigMap"]["data"]["config.toml"]


def _pod_config_path(pod: dict[str, Any], container: dict[str, Any]) -> str:
    """The config file a pod's container reads: its --config, on a ConfigMap volume."""
    args = container["args"]
    path = args[args.index("--config") + 1]
    configmaps = {v["name"]: v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    [mount] = [m for m in container["volumeMounts"] if m["name"] in configmaps]
    assert path.startswith(mount["mountPath"] + "/")
    return configmaps[mount["name"]]


def test_pods_and_the_migration_job_read_the_shipped_config_map(
    manifests: dict[str, dict[str, Any]], tmp_path: Any
) -> None:
    name = manifests["ConfigMap"]["metadata"]["name"]
    deployment_pod = manifests["Deployment"]["spec"]["template"]["spec"]
    job_pod = manifests["Job"]["spec"]["template"]["spec"]
    for pod in (deployment_pod, job_pod):
        (container,) = pod["containers"]
        assert _pod_config_path(pod, container) == name
        # Every command run in the pod reads the file the container was started with.
        env = {item["name"]: item.get("value") for item in container["env"]}
        args = container["args"]
        assert env["KZG_GATEWAY_CONFIG"] == args[args.index("--config") + 1]
    # The file is a configuration the gateway accepts (policies as the image ships them).
    (tmp_path / "config.toml").write_text(_config_toml(manifests))
    config = load_config(
        tmp_path / "config.toml", environ={"KZG_GATEWAY_POLICY_DIR": str(REPO / "policies")}
    )
    assert config.database_app_role == "kzg_app"
    assert config.database_auditor_role == "kzg_auditor"
    assert config.tls.cert_file.startswith("/etc/kzg-gateway/tls/")
    assert config.audit.origin
    assert "database_url" not in config.data, "the runtime URL comes from a Secret"


def test_migration_job_runs_init_as_the_owner(manifests: dict[str, dict[str, Any]]) -> None:
    job = manifests["Job"]["spec"]
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "init"
    assert pod["restartPolicy"] == "Never"
    assert container["image"] == _container(manifests)["image"], "the release it migrates for"
    env = {item["name"]: item for item in container["env"]}
    owner = env["KZG_GATEWAY_DATABASE_OWNER_URL"]["valueFrom"]["secretKeyRef"]
    assert owner["name"] == "kzg-gateway-owner"
    assert "KZG_GATEWAY_DATABASE_URL" not in env, "init seeds through the owner URL"
    assert "value" not in env["KZG_GATEWAY_MASTER_KEY"]
    # Only the Job holds the owner's credentials; the servers run as the app role.
    served = {item["name"] for item in _container(manifests)["env"]}
    assert "KZG_GATEWAY_DATABASE_OWNER_URL" not in served
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # init writes into its data directory: a volume on a read-only root filesystem.
    data_dir = env["KZG_GATEWAY_DATA_DIR"]["value"]
    assert data_dir in {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}


def test_drain_outlasts_the_readiness_probe(manifests: dict[str, dict[str, Any]]) -> None:
    server = tomllib.loads(_config_toml(manifests))["server"]
    readiness = _container(manifests)["readinessProbe"]
    # The pod is marked unready (and leaves the Service) before its listener closes...
    assert server["drain_seconds"] > readiness["periodSeconds"] * readiness["failureThreshold"]
    # ...and it finishes its requests before Kubernetes kills it.
    grace = manifests["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert server["drain_seconds"] + server["shutdown_timeout_seconds"] < grace


def test_image_reads_every_policy_from_its_policy_dir() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    policy_dir = re.search(r"KZG_GATEWAY_POLICY_DIR=(\S+)", text)
    assert policy_dir, "the image names its policy directory"
    assert re.search(rf"cp -r policies {re.escape(policy_dir.group(1))}\b", text)
    for name in ("rbac.toml", "security.toml", "retention.toml"):
        assert (REPO / "policies" / name).is_file(), name


def _final_stage(dockerfile: str) -> list[str]:
    stages = re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)
    return [line.strip() for line in stages[-1].splitlines() if line.strip()]


def test_image_runs_as_non_root_without_a_shell() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    final = _final_stage(text)
    assert "distroless" in final[0], "the runtime base carries no shell"
    assert not [line for line in final if line.startswith("RUN")], (
        "nothing runs at build of the runtime stage"
    )
    user = next(line.split()[1] for line in final if line.startswith("USER"))
    assert user.split(":")[0] not in ("0", "root")
    entrypoint = next(line for line in final if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT").strip())[0].startswith("/"), "exec form"


def test_image_copies_every_package() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    with (REPO / "pyproject.toml").open("rb") as handle:
        include = tomllib.load(handle)["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in include:
        package = pattern.rstrip("*")
        assert re.search(rf"^COPY {package} \./{package}$", text, re.MULTILINE), package
        assert (REPO / package / "__init__.py").is_file(), package


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool (Debian package prometheus)")
    return str(path)


def test_alert_rules_are_valid_prometheus_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_on_their_conditions() -> None:
    result = subprocess.run(
        [_promtool(), "test", "rules", "alerts.test.yaml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_what_operations_need() -> None:
    with (DEPLOY / "prometheus" / "alerts.yaml").open() as handle:
        rules = [rule for group in yaml.safe_load(handle)["groups"] for rule in group["rules"]]
    exprs = " ".join(rule["expr"] for rule in rules)
    for metric in (
        "kzg_operations_total",
        "kzg_operation_duration_seconds_bucket",
        "kzg_audit_queue_depth",
        "kzg_audit_commit_failures_total",
        "kzg_tls_certificate_not_after_seconds",
        "kzg_signing_key_age_seconds",
        "kzg_connections_refused_total",
        "kzg_audit_checkpoint_timestamp_seconds",
        "kzg_audit_signing_failures_total",
    ):
        assert metric in exprs, metric
    assert all(rule["labels"]["severity"] in ("page", "warn") for rule in rules)


def _rules() -> dict[str, dict[str, Any]]:
    with (DEPLOY / "prometheus" / "alerts.yaml").open() as handle:
        groups = yaml.safe_load(handle)["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    by_name = {rule["alert"]: rule for rule in rules}
    assert len(by_name) == len(rules), "alert names are unique"
    return by_name


def test_audit_log_alerts_page_on_a_stale_checkpoint_and_signing_failures() -> None:
    rules = _rules()
    stale = rules["KzgAuditCheckpointStale"]
    # Stale means no instance signed: the newest time over all of them, against twice the
    # interval at which even a quiet log gets a signed tree head.
    expr = " ".join(stale["expr"].split())
    assert "max(kzg_audit_checkpoint_timestamp_seconds)" in expr
    threshold = re.fullmatch(r"time\(\) - max\(\w+\) > 2 \* (\d+)", expr)
    assert threshold, expr
    assert float(threshold.group(1)) == AuditSettings().checkpoint_interval_seconds
    signing = rules["KzgAuditSigningFailures"]
    assert "kzg_audit_signing_failures_total" in signing["expr"]
    assert signing["expr"].strip().endswith("> 0")
    assert "for" not in signing, "one refused batch is enough"
    for rule in (stale, signing):
        assert rule["labels"]["severity"] == "page"
    # Receipts are signed by no key of their own any more: the key ages are jwt and log.
    key_age = rules["KzgSigningKeyPastRotationAge"]
    assert "by (kind)" in key_age["expr"]
    text = yaml.safe_dump(list(rules.values()))
    assert "receipt" not in text
