"""Gateway configuration: a TOML file plus ``KZG_GATEWAY_*`` environment overrides.

``KZG_GATEWAY_<SECTION>__<KEY>`` sets ``[section] key`` (deeper tables nest the same
way: ``KZG_GATEWAY_AUTH__PASSWORDS__TIME_COST``); ``KZG_GATEWAY_<KEY>`` sets a
top-level key (``KZG_GATEWAY_DATABASE_URL`` → ``database_url``). Values are read as TOML
literals when they parse as one (``8443``, ``true``, ``["a"]``), else as plain strings.
The master key is never copied into the configuration: ``auth.crypto`` reads it itself.

Every command (``init``, ``serve``, ``jobs``, ``admin``, ``audit --data-dir``) reads the
configuration through ``load_config``, so they all see the same database and policies.
"""

from __future__ import annotations

import copy
import os
import pwd
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from audit.settings import AuditSettings
from auth.crypto import MASTER_KEY_ENV
from auth.policy import policy_dir
from gateway.db import DEFAULT_DATABASE_FILE, async_url
from gateway.settings import (
    TYPED_SECTIONS,
    AuthSettings,
    ConfigError,
    EngineSettings,
    JobsSettings,
    MetricsSettings,
    PoolSection,
    ServerSettings,
    SettingsError,
    TlsSettings,
)

ENV_PREFIX = "KZG_GATEWAY_"
CONFIG_FILE = "config.toml"
DEFAULT_DATA_DIR = Path(".kzg-gateway")
SECTIONS = ("server", "tls", "engine", "pool", "audit", "auth", "jobs", "metrics")
# The top-level keys (``KZG_GATEWAY_<KEY>``); other variables of that prefix belong to the
# scripts and the tests, so only the file's top-level keys are checked against these.
TOP_LEVEL_KEYS = (
    "data_dir",
    "policy_dir",
    "database_url",
    "database_owner_url",
    "database_app_role",
    "database_auditor_role",
)
# Environment variables of the gateway that are not configuration keys.
_NOT_CONFIG = {MASTER_KEY_ENV, f"{ENV_PREFIX}DATA_DIR", f"{ENV_PREFIX}CONFIG"}


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """Return ``data`` with every ``KZG_GATEWAY_*`` override applied (keys lower-cased)."""
    merged = copy.deepcopy(data)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_CONFIG:
            continue
        *path, option = name[len(ENV_PREFIX) :].lower().split("__")
        target = merged
        for part in path:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{name}: {part!r} is not a table")
        target[option] = _env_value(raw)
    return merged


@dataclass(frozen=True)
class Config:
    """The merged configuration of one gateway process."""

    data: dict[str, Any] = field(default_factory=dict)
    data_dir: Path = DEFAULT_DATA_DIR

    def section(self, name: str) -> dict[str, Any]:
        """Return a copy of ``[name]`` (empty when absent)."""
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        return dict(value)

    @property
    def policy_dir(self) -> Path:
        """``policy_dir`` (``KZG_GATEWAY_POLICY_DIR``), else the shipped ``policies/``."""
        return policy_dir(self.data.get("policy_dir"))

    @property
    def database_url(self) -> str:
        """The runtime (app role) async URL; default the embedded SQLite file, but only
        for a deployment that names no server database at all."""
        url = self.data.get("database_url")
        if url:
            return async_url(str(url))
        if self.data.get("database_owner_url"):
            # A PostgreSQL deployment without the runtime URL: falling back to an empty
            # SQLite file would answer from the wrong database.
            raise ConfigError(
                "database_url is not set (KZG_GATEWAY_DATABASE_URL): database_owner_url "
                "is for migrations only, commands run as the app role"
            )
        return f"sqlite+aiosqlite:///{(self.data_dir / DEFAULT_DATABASE_FILE).resolve()}"

    @property
    def database_owner_url(self) -> str:
        """The URL migrations run with (the schema owner); defaults to ``database_url``."""
        url = self.data.get("database_owner_url")
        return async_url(str(url)) if url else self.database_url

    @property
    def init_database_url(self) -> str:
        """The URL ``init`` seeds the first admin and keys with: ``database_url`` when
        set, else the owner's (the documented ``init`` names only the owner URL)."""
        if self.data.get("database_url") or not self.data.get("database_owner_url"):
            return self.database_url
        return self.database_owner_url

    @property
    def database_app_role(self) -> str | None:
        """The PostgreSQL role the gateway runs as, granted least privilege by migrations."""
        role = self.data.get("database_app_role")
        return str(role) if role else None

    @property
    def database_auditor_role(self) -> str | None:
        """A PostgreSQL role migrations grant SELECT on the audit tables only."""
        role = self.data.get("database_auditor_role")
        return str(role) if role else None

    def check_policy_files(self) -> None:
        """Raise ConfigError naming the first policy file that is missing."""
        for path in (
            self.policy_dir / "rbac.toml",
            self.policy_dir / "security.toml",
            self.audit.retention_policy,
        ):
            if not path.is_file():
                raise ConfigError(f"policy file {path} is missing (policy_dir: {self.policy_dir})")

    # The typed sections, parsed on first use (load_config has checked them already).
    @cached_property
    def server(self) -> ServerSettings:
        return ServerSettings.from_mapping(self.section("server"))

    @cached_property
    def tls(self) -> TlsSettings:
        return TlsSettings.from_mapping(self.section("tls"))

    @cached_property
    def auth(self) -> AuthSettings:
        return AuthSettings.from_mapping(self.section("auth"))

    @cached_property
    def audit(self) -> AuditSettings:
        # retention_policy defaults to the policy directory's, never the working one's.
        default = {"retention_policy": str(self.policy_dir / "retention.toml")}
        return AuditSettings.from_mapping({**default, **self.section("audit")})

    @cached_property
    def engine(self) -> EngineSettings:
        return EngineSettings.from_mapping(self.section("engine"))

    @cached_property
    def pool(self) -> PoolSection:
        return PoolSection.from_mapping(self.section("pool"))

    @cached_property
    def jobs(self) -> JobsSettings:
        return JobsSettings.from_mapping(self.section("jobs"))

    @cached_property
    def metrics(self) -> MetricsSettings:
        return MetricsSettings.from_mapping(self.section("metrics"))

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def with_overrides(self, section: str, **values: Any) -> Config:
        """Return a copy with ``[section]`` keys replaced (None values are ignored)."""
        data = {k: dict(v) if isinstance(v, dict) else v for k, v in self.data.items()}
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
        return Config(data, self.data_dir)


def load_config(
    path: Path | None = None,
    data_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read the configuration: ``path`` (else ``$KZG_GATEWAY_CONFIG``, else
    ``<data dir>/config.toml`` when present), then the environment overrides.

    The data directory is ``data_dir``, else ``$KZG_GATEWAY_DATA_DIR``, else the file's
    ``data_dir`` key, else ``./.kzg-gateway``."""
    env = os.environ if environ is None else environ
    if path is None and env.get(f"{ENV_PREFIX}CONFIG"):
        path = Path(env[f"{ENV_PREFIX}CONFIG"])
    chosen_dir = data_dir or (
        Path(env[f"{ENV_PREFIX}DATA_DIR"]) if env.get(f"{ENV_PREFIX}DATA_DIR") else None
    )
    if path is None:
        candidate = (chosen_dir or DEFAULT_DATA_DIR) / CONFIG_FILE
        path = candidate if candidate.is_file() else None
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read configuration {path}: {exc}") from exc
    for key, value in data.items():
        if key in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table (in {path})")
        if key in TOP_LEVEL_KEYS and isinstance(value, dict):
            raise ConfigError(f"{key} must be a value, not a table (in {path})")
        if key not in SECTIONS and key not in TOP_LEVEL_KEYS:
            kind = "section" if isinstance(value, dict) else "top-level key"
            raise ConfigError(f"unknown {kind} {key!r} (in {path})")
    data = apply_env(data, env)
    if chosen_dir is None:
        chosen_dir = Path(data["data_dir"]) if data.get("data_dir") else DEFAULT_DATA_DIR
    for name, value in data.items():
        if name in SECTIONS and not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        # A table the file does not have came from a KZG_GATEWAY_<NAME>__<KEY> override
        # (a variable without "__" that is no key is not the server's, whatever its value).
        prefix = f"{ENV_PREFIX}{name.upper()}__"
        variable = next((v for v in env if v.upper().startswith(prefix)), None)
        if isinstance(value, dict) and name not in SECTIONS and variable:
            raise ConfigError(f"unknown section {name!r} (in {variable})")
    _check_typed_sections(data, path, env)
    config = Config(data, chosen_dir)
    config.check_policy_files()
    return config


def _check_typed_sections(
    data: Mapping[str, Any], path: Path | None, environ: Mapping[str, str]
) -> None:
    """Parse every typed section once, so that an unknown key or a bad value stops the
    command at start, naming the key and where it came from (the override, else the file)."""
    for name, settings in TYPED_SECTIONS.items():
        try:
            settings.from_mapping(data.get(name, {}))
        except SettingsError as exc:
            variable = f"{ENV_PREFIX}{exc.section.upper()}__{exc.key.upper()}"
            origin = variable if exc.key and variable in environ else (path or "the environment")
            raise ConfigError(f"{exc} (in {origin})") from None


def cli_actor() -> str:
    """The audit actor of a command run by hand: the real OS account of the process
    (``$USER`` and ``$LOGNAME`` are whatever the caller set)."""
    uid = os.getuid()
    try:
        return f"cli:{pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"cli:uid-{uid}"
