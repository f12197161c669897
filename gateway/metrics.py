"""Prometheus instruments of one gateway app, in the app's own registry."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from audit.metrics import AuditMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    operations: Counter
    duration: Histogram
    inflight: Gauge
    queue_depth: Gauge
    requests: Counter
    audit: AuditMetrics
    tls_not_after: Gauge
    connections: Gauge
    connections_refused: Counter
    password_hash_verifications: Counter
    engine_disagreements: Counter

    @classmethod
    def create(cls) -> GatewayMetrics:
        registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds...
        ProcessCollector(registry=registry)
        return cls(
            registry=registry,
            operations=Counter(
                "kzg_operations",
                "KZG operations by operation and outcome",
                ["operation", "outcome"],
                registry=registry,
            ),
            duration=Histogram(
                "kzg_operation_duration_seconds",
                "Time of a KZG operation in the worker pool, queueing included",
                ["operation"],
                buckets=(
                    0.0005,
                    0.001,
                    0.0025,
                    0.005,
                    0.01,
                    0.025,
                    0.05,
                    0.1,
                    0.25,
                    0.5,
                    1,
                    2.5,
                    5,
                    10,
                ),
                registry=registry,
            ),
            inflight=Gauge(
                "kzg_inflight_requests", "Requests being handled right now", registry=registry
            ),
            queue_depth=Gauge(
                "kzg_pool_queue_depth", "KZG calls waiting for a free worker", registry=registry
            ),
            requests=Counter(
                "kzg_http_requests",
                "HTTP requests by route and status",
                ["route", "status"],
                registry=registry,
            ),
            audit=AuditMetrics.create(registry),
            tls_not_after=Gauge(
                "kzg_tls_certificate_not_after_seconds",
                "Expiry of the served TLS certificate (Unix time)",
                registry=registry,
            ),
            connections=Gauge(
                "kzg_open_connections", "Client connections open right now", registry=registry
            ),
            connections_refused=Counter(
                "kzg_connections_refused",
                "Connections closed on arrival because a connection limit was reached",
                ["limit"],
                registry=registry,
            ),
            password_hash_verifications=Counter(
                "kzg_password_hash_verifications",
                "argon2id verifications run, by credential (api_key, password)",
                ["credential"],
                registry=registry,
            ),
            engine_disagreements=Counter(
                "kzg_engine_disagreements",
                "Results refused because the cross-check engine disagreed, by operation",
                ["operation"],
                registry=registry,
            ),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
