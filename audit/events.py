"""What one audit record says about one request, job run or admin action."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def format_timestamp(moment: datetime) -> str:
    """Return the canonical UTC text form of ``moment``: fixed width, always microseconds
    and "Z", so it sorts as text and hashes identically everywhere (naive is refused)."""
    if moment.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    utc = moment.astimezone(UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def storable(value: Any) -> Any:
    """Return ``value`` with every string made storable in any database: NUL (which
    PostgreSQL text refuses) and lone surrogates (not UTF-8) become backslash escapes.
    A client can put either in a URL path; refused, it would fail its whole commit batch."""
    kind = type(value)
    if kind is str:
        if value.isascii() and "\x00" not in value:
            return value  # the common case, decided without a call
        if "\x00" in value:
            value = value.replace("\x00", "\\x00")
        if value.isascii():
            return value
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if kind is int or kind is float or value is None or kind is bool:
        return value
    if isinstance(value, str):
        return storable(str(value))
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [storable(v) for v in value]
    return value


def parse_timestamp(text: str) -> datetime:
    """Return the aware datetime for a canonical or ISO 8601 timestamp."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class AuditEvent:
    """One request (or job, or admin action) as the auditors see it. Never holds a secret:
    blobs appear as SHA-256 digests and credentials as keyed HMAC references."""

    request_id: str
    occurred_at: datetime
    actor: str | None
    role: str | None
    action: str
    outcome: str
    http_status: int | None = None
    client_addr: str | None = None
    tls_version: str | None = None
    method: str | None = None
    path: str | None = None
    input_digests: dict[str, str] = field(default_factory=dict)
    result_digest: str | None = None
    latency_ms: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """Return the JSON-ready field values exactly as they are stored and hashed."""
        latency = None
        if self.latency_ms is not None:
            if not math.isfinite(self.latency_ms):
                raise ValueError("latency_ms must be finite")
            latency = round(float(self.latency_ms), 3)
        values = {
            "request_id": self.request_id,
            "occurred_at": format_timestamp(self.occurred_at),
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "outcome": self.outcome,
            "http_status": self.http_status,
            "client_addr": self.client_addr,
            "tls_version": self.tls_version,
            "method": self.method,
            "path": self.path,
            "input_digests": self.input_digests,
            "result_digest": self.result_digest,
            "latency_ms": latency,
            "detail": self.detail,
        }
        # The names are ours; storable copies the nested dicts as it escapes them. Plain
        # ASCII strings and numbers, nearly every value, skip the call (append hot path).
        return {
            name: value
            if value is None
            or (type(value) is str and value.isascii() and "\x00" not in value)
            or type(value) is int
            or type(value) is float
            else storable(value)
            for name, value in values.items()
        }


EVENT_FIELDS: tuple[str, ...] = tuple(AuditEvent.__dataclass_fields__)
# Stored as canonical JSON text, hashed as nested objects.
JSON_FIELDS: frozenset[str] = frozenset({"input_digests", "detail"})
