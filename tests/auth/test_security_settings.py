"""The typed security policy: the shipped ``security.toml`` reads into typed tables with
the values it documents, overrides of ``[auth]`` apply, and an unknown table or key, a
missing key or a value of the wrong kind is refused naming it and the file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from auth.policy import POLICY_DIR, PolicyError, SecurityPolicy

SHIPPED = POLICY_DIR / "security.toml"


def test_the_shipped_policy_reads_into_typed_tables() -> None:
    policy = SecurityPolicy.load(SHIPPED)
    data = tomllib.loads(SHIPPED.read_text())
    assert policy.passwords.time_cost == data["passwords"]["time_cost"]
    assert policy.tokens.issuer == data["tokens"]["issuer"]
    assert policy.tokens.ttl_seconds == data["tokens"]["ttl_seconds"]
    assert policy.api_keys.cache_seconds == data["api_keys"]["cache_seconds"]
    assert (
        policy.engine_share["client"].max_in_flight
        == data["engine_share"]["client"]["max_in_flight"]
    )
    assert policy.ratelimit_sharing.sync_seconds == data["ratelimit_sharing"]["sync_seconds"]
    # A role without a bucket gets the client's.
    client = data["ratelimit"]["client"]
    assert policy.rate("no-such-role") == (client["rate"], client["burst"])


def test_overrides_apply_and_defaults_fill_older_files(tmp_path: Path) -> None:
    policy = SecurityPolicy.load(SHIPPED, {"tokens": {"ttl_seconds": 3}})
    assert policy.tokens.ttl_seconds == 3
    text = SHIPPED.read_text()
    older = re.sub(r"\[ratelimit_sharing\][^\[]*", "", text)
    older = re.sub(r"hashing_(threads|queue) = \d+\n", "", older)
    path = tmp_path / "security.toml"
    path.write_text(older)
    policy = SecurityPolicy.load(path)
    assert (policy.ratelimit_sharing.sync_seconds, policy.ratelimit_sharing.horizon_seconds) == (
        0.5,
        300.0,
    )
    assert (policy.passwords.hashing_threads, policy.passwords.hashing_queue) == (2, 8)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tokens": {"tll_seconds": 3}}, r"unknown \[tokens\] key 'tll_seconds'"),
        ({"passwords": {"memory_kb": 1}}, r"unknown \[passwords\] key 'memory_kb'"),
        (
            {"ratelimit": {"client": {"rate": 1, "brust": 2}}},
            r"unknown \[ratelimit.client\] key 'brust'",
        ),
        ({"login_throttles": {"free_failures": 1}}, r"unknown table \[login_throttles\]"),
        ({"tokens": {"ttl_seconds": "900"}}, r"\[tokens\] ttl_seconds must be an integer"),
        (
            {"engine_share": {"client": {"max_in_flight": 0}}},
            r"\[engine_share.client\] max_in_flight",
        ),
        ({"ratelimit_sharing": {"sync_seconds": 400}}, r"sync_seconds < horizon_seconds"),
    ],
)
def test_a_bad_key_or_value_is_refused_naming_it_and_the_file(
    override: dict[str, Any], message: str, tmp_path: Path
) -> None:
    with pytest.raises(PolicyError, match=message) as raised:
        SecurityPolicy.load(SHIPPED, override)
    assert str(SHIPPED) in str(raised.value) and "[auth] overrides" in str(raised.value)


def test_an_unknown_key_in_the_file_names_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "security.toml"
    path.write_text(SHIPPED.read_text().replace("[tokens]\n", "[tokens]\ntll_seconds = 3\n"))
    with pytest.raises(PolicyError) as raised:
        SecurityPolicy.load(path)
    assert str(raised.value) == f"unknown [tokens] key 'tll_seconds' (in {path})"


def test_a_missing_key_is_named() -> None:
    data = tomllib.loads(SHIPPED.read_text())
    del data["tokens"]["issuer"]
    with pytest.raises(PolicyError, match=r"missing \[tokens\] key 'issuer' \(in x\.toml\)"):
        SecurityPolicy.from_mapping(data, "x.toml")
