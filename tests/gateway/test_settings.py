"""The typed sections of the configuration: every key the operations guide documents is
accepted with its documented value, and an unknown key is refused naming the key and
the file (or the override) it came from, by ``load_config`` and by ``serve``."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ConfigError, load_config
from gateway.limits import ServerLimits
from gateway.settings import TYPED_SECTIONS, ServerSettings, TlsSettings
from tests.conftest import REPO

# The shipped policies, so that the sample's /etc/kzg/policies need not exist.
ENV = {"KZG_GATEWAY_POLICY_DIR": str(REPO / "policies")}


def _documented_sample() -> dict[str, Any]:
    """The configuration block of docs/operations.md, with the keys it documents in
    comments after ``# and in [server]:`` added to ``[server]``."""
    text = (REPO / "docs" / "operations.md").read_text()
    block = re.search(r"```toml\n(.*?\[server\].*?)```", text, re.S)
    assert block, "docs/operations.md has no configuration block"
    body = block.group(1)
    data = tomllib.loads(body)
    tail = body.split("# and in [server]:", 1)[1]
    extra = tomllib.loads("\n".join(line.lstrip("# ") for line in tail.splitlines()))
    assert extra, "the commented [server] keys were not found"
    data["server"].update(extra)
    return data


def _write(path: Path, data: dict[str, Any]) -> Path:
    lines = [f"{k} = {_toml(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, section in data.items():
        if isinstance(section, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in section.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def test_every_documented_key_is_accepted_with_its_value(tmp_path: Path) -> None:
    sample = _documented_sample()
    config = load_config(_write(tmp_path / "config.toml", sample), environ=ENV)
    for name in TYPED_SECTIONS:
        documented = sample[name]
        typed = getattr(config, name)
        for key, value in documented.items():
            if name == "jobs" and key != "enabled":
                job = key.removesuffix("_interval_seconds").replace("_", "-")
                assert typed.intervals[job] == value, key
            elif name == "auth":
                assert [str(network) for network in getattr(typed, key)] == value, key
            else:
                assert getattr(typed, key) == value, (name, key)
    # The sample marks these as the defaults: the typed defaults agree.
    assert (config.server.host, config.server.port) == (ServerSettings.host, ServerSettings.port)


def test_defaults_are_unchanged() -> None:
    config = Config({})
    server = config.server
    assert (server.host, server.port, server.drain_seconds) == ("127.0.0.1", 8443, 0.0)
    assert server.log_key_refresh_seconds == 30.0
    assert (server.max_batch_blobs, server.max_batch_cells, server.max_batch_operations) == (
        64,
        1024,
        16,
    )
    assert (server.readiness_interval_seconds, server.min_free_disk_mib) == (2.0, 32)
    assert ServerLimits.from_config(config) == ServerLimits()
    assert all(getattr(server, f.name) == f.default for f in fields(ServerLimits))
    assert (config.engine.name, config.engine.cross_check) == ("blspy", "")
    pool = config.pool
    assert (pool.workers, pool.max_queue, pool.start_method, pool.retry_after_seconds) == (
        0,
        0,
        "fork",
        1,
    )
    assert config.jobs.enabled is True and dict(config.jobs.intervals) == {}
    assert config.metrics.public is False
    assert config.tls == TlsSettings("", "", "", "", "required")
    assert (config.auth.allow_cidrs, config.auth.deny_cidrs) == ((), ())


@pytest.mark.parametrize("section", sorted(TYPED_SECTIONS))
def test_an_unknown_key_is_refused_naming_key_and_file(section: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "config.toml", {section: {"no_such_key": 1}})
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ=ENV)
    assert f"unknown [{section}] key 'no_such_key'" in str(raised.value)
    assert str(path) in str(raised.value)
    # The same key set by an override is named by its variable.
    variable = f"KZG_GATEWAY_{section.upper()}__NO_SUCH_KEY"
    with pytest.raises(ConfigError, match=re.escape(f"(in {variable})")):
        load_config(_write(path, {}), environ={**ENV, variable: "1"})


def test_an_unknown_audit_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.toml", {"audit": {"orgin": "x"}})
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ=ENV)
    assert str(raised.value) == f"unknown [audit] key 'orgin' (in {path})"


def test_a_value_of_the_wrong_kind_is_refused_naming_its_origin(tmp_path: Path) -> None:
    path = _write(tmp_path / "config.toml", {"metrics": {"public": "yes"}})
    with pytest.raises(
        ConfigError, match=r"\[metrics\] public must be true or false.*config\.toml"
    ):
        load_config(path, environ=ENV)
    with pytest.raises(ConfigError, match=r"\[server\] port must be an integer.*SERVER__PORT"):
        load_config(None, tmp_path / "none", environ={**ENV, "KZG_GATEWAY_SERVER__PORT": "https"})


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"auth": {"allow_cidrs": ["10.0.0.0/33"]}}, "[auth] allow_cidrs: '10.0.0.0/33' does"),
        ({"auth": {"deny_cidrs": "10.0.0.0/8"}}, "[auth] deny_cidrs must be a list of CIDR"),
        ({"tls": {"client_cert": "require"}}, "[tls] client_cert must be one of required, "),
        ({"tls": {"client_cert": "none"}}, "must be one of required, optional, got 'none'"),
        ({"server": 8443}, "[server] must be a table"),
        ({"data_dir": {"path": "/srv"}}, "data_dir must be a value, not a table"),
        ({"servr": {"port": 1}}, "unknown section 'servr'"),
        ({"database_ulr": "sqlite:///x"}, "unknown top-level key 'database_ulr'"),
    ],
)
def test_bad_values_unknown_sections_and_top_level_keys_name_the_file(
    section: dict[str, Any], message: str, tmp_path: Path
) -> None:
    path = _write(tmp_path / "config.toml", section)
    with pytest.raises(ConfigError) as raised:
        load_config(path, environ=ENV)
    assert message in str(raised.value) and f"(in {path})" in str(raised.value)


def test_the_environment_names_known_sections_and_leaves_other_variables_alone(
    tmp_path: Path,
) -> None:
    variable = "KZG_GATEWAY_SERVR__PORT"
    with pytest.raises(ConfigError, match=re.escape(f"unknown section 'servr' (in {variable})")):
        load_config(None, tmp_path, environ={**ENV, variable: "8443"})
    # The scripts' and the tests' variables share the prefix but are not keys of the server,
    # whatever their value parses as.
    others = {
        "KZG_GATEWAY_URL": "https://gw:8443",
        "KZG_GATEWAY_CACERT": "/etc/ca.pem",
        "KZG_GATEWAY_TOKEN_FILE": "/run/token",
        "KZG_GATEWAY_CACHE_DIR": "/var/cache/kzg",
        "KZG_GATEWAY_TEST_DATABASE_URL": "postgresql://x/y",
        "KZG_GATEWAY_EXTRA": "{ a = 1 }",
    }
    config = load_config(None, tmp_path, environ={**ENV, **others, "KZG_GATEWAY_SERVER__PORT": "9"})
    assert config.server.port == 9


@pytest.mark.parametrize(
    ("section", "variable", "message"),
    [
        ({"server": {"max_batch_blob": 64}}, {}, "unknown [server] key 'max_batch_blob'"),
        (
            {},
            {"KZG_GATEWAY_AUTH__TOKENS__TLL_SECONDS": "3"},
            "unknown [tokens] key 'tll_seconds' (in ",
        ),
    ],
)
def test_serve_exits_2_naming_the_unknown_key_and_file(
    section: dict[str, Any], variable: dict[str, str], message: str, tmp_path: Path
) -> None:
    """A real process: one line naming the key and file, no traceback, nothing started."""
    path = _write(tmp_path / "config.toml", section)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **ENV, **variable},
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert str(path if section else REPO / "policies" / "security.toml") in result.stderr


def test_jobs_settings_know_exactly_the_jobs_there_are() -> None:
    """``[jobs] <name>_interval_seconds`` is accepted for each job of ``JOBS`` and no other
    (settings.py cannot import the jobs, which import the configuration)."""
    from gateway.jobs import JOBS
    from gateway.settings import JOB_NAMES

    assert sorted(JOB_NAMES) == sorted(JOBS)
