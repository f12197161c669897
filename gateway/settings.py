"""Typed ``[server]``, ``[tls]``, ``[engine]``, ``[pool]``, ``[jobs]``, ``[metrics]`` and
``[auth]`` settings.

Each section is a frozen dataclass with the defaults the gateway has always used, parsed
by ``audit.settings.parse_table``. Its keys are checked once, when the configuration is
loaded: an unknown key or a value of the wrong kind is refused naming the key and the
file (or the environment variable) it came from, so a typo never passes silently as a
default.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from audit.settings import AuditSettings, SettingsError, parse_table, table_value

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8443
# The jobs the server schedules; ``[jobs] <name>_interval_seconds`` is known for each.
JOB_NAMES = ("checkpoint", "retention", "rotate-keys", "access-review")
# ``[tls] client_cert``: how a client certificate is asked for under mTLS.
CLIENT_CERT_MODES = ("required", "optional")


class ConfigError(ValueError):
    """The configuration file or an override is malformed."""


@dataclass(frozen=True)
class ServerSettings:
    """``[server]``: the listener, drain, batch bounds and probe settings. What one client
    may take of the server (connections, timeouts, header sizes) is ``ServerLimits`` in
    gateway/limits.py, whose fields are ``[server]`` keys of the same names."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # /readyz is 503 this long before the listener closes.
    drain_seconds: float = 0.0
    log_key_refresh_seconds: float = 30.0
    max_batch_blobs: int = 64
    max_batch_cells: int = 1024
    max_batch_operations: int = 16
    readiness_interval_seconds: float = 2.0
    min_free_disk_mib: int = 32
    max_connections: int = 1024
    max_connections_per_address: int = 256
    backlog: int = 1024
    tls_handshake_timeout_seconds: float = 10.0
    keepalive_timeout_seconds: float = 15.0
    body_timeout_seconds: float = 30.0
    max_header_bytes: int = 8190
    max_headers: int = 64
    shutdown_timeout_seconds: float = 30.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ServerSettings:
        return parse_table(cls, "server", values)


@dataclass(frozen=True)
class EngineSettings:
    """``[engine]``: the engine that answers, and the one that checks it ("" is off).
    Which names are valid is checked by the pool (gateway/pool.py PoolSettings)."""

    name: str = "blspy"
    cross_check: str = ""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> EngineSettings:
        return parse_table(cls, "engine", values)


@dataclass(frozen=True)
class PoolSection:
    """``[pool]``: 0 workers is one per core, 0 max_queue is 8 per worker (validated by
    gateway/pool.py PoolSettings, which joins this with ``[engine]``)."""

    workers: int = 0
    max_queue: int = 0
    start_method: str = "fork"
    retry_after_seconds: int = 1

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PoolSection:
        return parse_table(cls, "pool", values)


@dataclass(frozen=True)
class JobsSettings:
    """``[jobs]``: ``enabled`` turns the scheduler in the server on; ``intervals`` holds
    each ``<job>_interval_seconds`` that is set (0: that job is not scheduled)."""

    enabled: bool = True
    intervals: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> JobsSettings:
        keys = {f"{name.replace('-', '_')}_interval_seconds": name for name in JOB_NAMES}
        intervals: dict[str, float] = {}
        enabled = True
        for key, value in values.items():
            if key == "enabled":
                enabled = table_value("jobs", key, "bool", value)
            elif key in keys:
                intervals[keys[key]] = table_value("jobs", key, "float", value)
            else:
                raise SettingsError("jobs", key, f"unknown [jobs] key {key!r}")
        return cls(enabled, intervals)


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics] public``: /metrics without a credential."""

    public: bool = False

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> MetricsSettings:
        return parse_table(cls, "metrics", values)


@dataclass(frozen=True)
class TlsSettings:
    """``[tls]``: the server's certificate and key ("": the development ones ``init``
    makes), the CA ``init`` reports, and mTLS: ``client_ca_file`` turns it on,
    ``client_cert`` is "required" or "optional"."""

    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    client_ca_file: str = ""
    client_cert: str = "required"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TlsSettings:
        settings = parse_table(cls, "tls", values)
        if settings.client_cert not in CLIENT_CERT_MODES:
            raise SettingsError(
                "tls",
                "client_cert",
                f"[tls] client_cert must be one of {', '.join(CLIENT_CERT_MODES)}, "
                f"got {settings.client_cert!r}",
            )
        return settings


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AuthSettings:
    """``[auth]``: ``allow_cidrs`` (when set, only these sources are served) and
    ``deny_cidrs`` (never served, whatever allows them). Its tables override
    ``policies/security.toml`` and are checked with the policy (auth/security_settings.py)."""

    allow_cidrs: tuple[Network, ...] = ()
    deny_cidrs: tuple[Network, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> AuthSettings:
        networks: dict[str, tuple[Network, ...]] = {}
        overrides = {}
        for key, value in values.items():
            if isinstance(value, Mapping):
                overrides[key] = value
            elif key in ("allow_cidrs", "deny_cidrs"):
                networks[key] = _networks(key, value)
            else:
                raise SettingsError("auth", key, f"unknown [auth] key {key!r}")
        return cls(**networks, overrides=MappingProxyType(overrides))


def _networks(key: str, values: Any) -> tuple[Network, ...]:
    message = f"[auth] {key} must be a list of CIDR strings, got {values!r}"
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise SettingsError("auth", key, message)
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as exc:
        raise SettingsError("auth", key, f"[auth] {key}: {exc}") from None


# The typed sections, checked when the configuration is loaded.
TYPED_SECTIONS: dict[str, Any] = {
    "server": ServerSettings,
    "tls": TlsSettings,
    "auth": AuthSettings,
    "audit": AuditSettings,
    "engine": EngineSettings,
    "pool": PoolSection,
    "jobs": JobsSettings,
    "metrics": MetricsSettings,
}
