"""The RBAC and security policies (``policies/rbac.toml``, ``policies/security.toml``).

Data, not code: roles map to permissions, routes map to the one permission they need, and
anything not listed is denied. Deployment configuration may override security values.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from auth.security_settings import (
    AccessReview,
    ApiKeys,
    EngineShare,
    Enrollment,
    LoginThrottle,
    LogKeys,
    Passwords,
    PolicyError,
    Rate,
    RatelimitSharing,
    Tokens,
    parse_table,
)

__all__ = ["PolicyError", "RbacPolicy", "SecurityPolicy", "load_policies", "policy_dir"]

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
# Whoever may give people any role gains nothing by giving it to an API key instead.
GRANTS_ANY_ROLE = "users:manage"


def policy_dir(configured: str | Path | None = None) -> Path:
    """``configured`` (``policy_dir`` in the gateway config, or ``KZG_GATEWAY_POLICY_DIR``),
    else the ``policies/`` folder shipped beside the packages."""
    return Path(configured) if configured else POLICY_DIR


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"cannot read policy {path}: {exc}") from exc


@dataclass(frozen=True)
class Role:
    name: str
    permissions: frozenset[str]
    mfa: bool
    api_keys: bool
    grants: frozenset[str] = frozenset()  # roles its holders may give to API keys


@dataclass(frozen=True)
class RbacPolicy:
    roles: dict[str, Role]
    routes: dict[str, str]
    public: frozenset[str]

    @classmethod
    def load(cls, path: Path) -> RbacPolicy:
        data = _load(path)
        roles = {
            name: Role(
                name,
                frozenset(spec.get("permissions", [])),
                bool(spec.get("mfa", True)),
                bool(spec.get("api_keys", False)),
                frozenset(spec.get("grants", [])),
            )
            for name, spec in data.get("roles", {}).items()
        }
        for role in roles.values():
            if not role.grants <= roles.keys():
                raise PolicyError(f"{path}: {role.name} grants unknown roles")
        routes = {str(k): str(v) for k, v in data.get("routes", {}).items()}
        granted = set().union(*(r.permissions for r in roles.values())) if roles else set()
        unknown = set(routes.values()) - granted
        if unknown:
            raise PolicyError(f"{path}: permissions no role holds: {sorted(unknown)}")
        return cls(roles, routes, frozenset(data.get("public", {}).get("routes", [])))

    def permission_for(self, route_name: str | None) -> str | None:
        return self.routes.get(route_name or "")

    def allows(self, roles: tuple[str, ...], route_name: str | None) -> bool:
        """Default deny: only a listed route whose permission one of ``roles`` holds."""
        needed = self.permission_for(route_name)
        if needed is None:
            return False
        return any(needed in self.roles[r].permissions for r in roles if r in self.roles)

    def check_roles(self, roles: list[str] | tuple[str, ...], for_api_key: bool = False) -> None:
        if not roles:
            raise PolicyError("at least one role is required")
        for role in roles:
            if role not in self.roles:
                raise PolicyError(f"unknown role {role!r}; known: {', '.join(sorted(self.roles))}")
            if for_api_key and not self.allows_api_key(role):
                raise PolicyError(f"role {role!r} is for people only (MFA), not for API keys")

    def allows_api_key(self, role: str) -> bool:
        """Whether a machine identity may hold ``role`` under this policy (checked again at
        every use, so tightening the policy disables the keys it no longer allows)."""
        return role in self.roles and self.roles[role].api_keys

    def may_grant(self, grantor_roles: tuple[str, ...] | list[str], role: str) -> bool:
        """Whether holders of ``grantor_roles`` may hand ``role`` to an API key: only the
        roles their policy lists under ``grants`` (any, for whoever may give roles to
        people), so a key never lifts its creator to, say, audit access without MFA."""
        if role not in self.roles:
            return False
        known = [self.roles[name] for name in grantor_roles if name in self.roles]
        return self.manages_people(grantor_roles) or any(role in r.grants for r in known)

    def manages_people(self, roles: tuple[str, ...] | list[str]) -> bool:
        """Whether ``roles`` may give roles to people (and so any role to an API key)."""
        return any(GRANTS_ANY_ROLE in self.roles[r].permissions for r in roles if r in self.roles)

    def needs_mfa(self, roles: tuple[str, ...] | list[str]) -> bool:
        return any(self.roles[r].mfa for r in roles if r in self.roles)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_T = TypeVar("_T")


@dataclass(frozen=True)
class SecurityPolicy:
    """``policies/security.toml``, typed: see the file for what each value means."""

    passwords: Passwords
    login_throttle: LoginThrottle
    enrollment: Enrollment
    tokens: Tokens
    api_keys: ApiKeys
    log_keys: LogKeys
    access_review: AccessReview
    ratelimit_sharing: RatelimitSharing
    # Token buckets per role (``client``'s for a role without one).
    ratelimit: Mapping[str, Rate]
    # Engine calls one principal of the role may have in flight; roles absent: no cap.
    engine_share: Mapping[str, EngineShare]

    @classmethod
    def load(cls, path: Path, override: Mapping[str, Any] | None = None) -> SecurityPolicy:
        """``override`` is the config's ``[auth]`` section shaped like the file (e.g.
        ``{"passwords": {"memory_kib": 8192}}``), so tests and deployments can tune it.
        Unknown tables and keys are refused naming them and the file."""
        origin = f"{path} with [auth] overrides" if override else str(path)
        return cls.from_mapping(_merge(_load(path), override or {}), origin)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], origin: str) -> SecurityPolicy:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise PolicyError(f"unknown table [{unknown[0]}] (in {origin})")

        def table(kind: type[_T], name: str) -> _T:
            return parse_table(kind, name, data.get(name, {}), origin)

        def per_role(kind: type[_T], name: str) -> dict[str, _T]:
            section = data.get(name, {})
            if not isinstance(section, Mapping):
                raise PolicyError(f"[{name}] must be a table (in {origin})")
            return {
                role: parse_table(kind, f"{name}.{role}", spec, origin)
                for role, spec in section.items()
            }

        ratelimit = per_role(Rate, "ratelimit")
        if "client" not in ratelimit:
            raise PolicyError(f"missing table [ratelimit.client] (in {origin})")
        return cls(
            passwords=table(Passwords, "passwords"),
            login_throttle=table(LoginThrottle, "login_throttle"),
            enrollment=table(Enrollment, "enrollment"),
            tokens=table(Tokens, "tokens"),
            api_keys=table(ApiKeys, "api_keys"),
            log_keys=table(LogKeys, "log_keys"),
            access_review=table(AccessReview, "access_review"),
            ratelimit_sharing=table(RatelimitSharing, "ratelimit_sharing"),
            ratelimit=ratelimit,
            engine_share=per_role(EngineShare, "engine_share"),
        )

    def rate(self, role: str) -> tuple[float, float]:
        spec = self.ratelimit.get(role) or self.ratelimit["client"]
        return spec.rate, spec.burst


def load_policies(
    configured_dir: str | Path | None = None, override: Mapping[str, Any] | None = None
) -> tuple[RbacPolicy, SecurityPolicy]:
    directory = policy_dir(configured_dir)
    return (
        RbacPolicy.load(directory / "rbac.toml"),
        SecurityPolicy.load(directory / "security.toml", override),
    )
