"""Small builders shared by the audit tests."""

from __future__ import annotations

from datetime import UTC, datetime

from audit.events import AuditEvent


def make_event(n: int = 0, **overrides: object) -> AuditEvent:
    """An event that looks like a verified-proof request; ``n`` varies its content."""
    values: dict[str, object] = {
        "request_id": f"req-{n}",
        "occurred_at": datetime(2026, 1, 2, 3, 4, 5, n % 1_000_000, tzinfo=UTC),
        "actor": f"apikey:{n % 3}",
        "role": "client",
        "action": "verify_kzg_proof",
        "outcome": "success",
        "http_status": 200,
        "client_addr": "127.0.0.1",
        "tls_version": "TLSv1.3",
        "method": "POST",
        "path": "/v1/kzg/verify-proof",
        "input_digests": {"commitment": f"{n:064x}"},
        "result_digest": f"{n + 1:064x}",
        "latency_ms": 1.25 + n,
        "detail": {"note": "ünïcode ok", "n": n},
    }
    values.update(overrides)
    return AuditEvent(**values)  # type: ignore[arg-type]
