"""Prometheus instruments of one gateway app, in the app's own registry."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from audit.metrics import AuditMetrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PROC = Path("/proc")


def _usage(pids: Iterable[int]) -> tuple[float, int]:
    """CPU seconds and resident bytes of the processes ``pids``, read from /proc; a process
    gone meanwhile (or no /proc) counts nothing."""
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    cpu, rss = 0.0, 0
    for pid in pids:
        try:
            stat = (_PROC / str(pid) / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu += (int(fields[11]) + int(fields[12])) / ticks
        rss += int(fields[21]) * page
    return cpu, rss


class WorkersCollector(Collector):
    """The engine workers' CPU and memory: ``process_*`` covers the server process only,
    while the KZG work runs in the workers (children of the engine server, not of this
    process). ``pids`` names them; the app points it at its pool."""

    def __init__(self) -> None:
        self.pids: Callable[[], Iterable[int]] = tuple

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        cpu, rss = _usage(self.pids())
        yield CounterMetricFamily(
            "kzg_workers_cpu_seconds",
            "CPU seconds used by the engine worker processes (user and system)",
            value=cpu,
        )
        yield GaugeMetricFamily(
            "kzg_workers_resident_memory_bytes",
            "Resident memory of the engine worker processes",
            value=rss,
        )


@dataclass(frozen=True)
class GatewayMetrics:
    registry: CollectorRegistry
    workers: WorkersCollector
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
    breaker_state: Gauge
    breaker_rejections: Counter
    probes_unrecorded: Counter
    readiness: Gauge
    disk_free: Gauge
    verifications: Counter

    @classmethod
    def create(cls) -> GatewayMetrics:
        registry = CollectorRegistry()
        # process_resident_memory_bytes, process_cpu_seconds_total, open fds...
        ProcessCollector(registry=registry)
        workers = WorkersCollector()
        registry.register(workers)
        return cls(
            registry=registry,
            workers=workers,
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
            breaker_state=Gauge(
                "kzg_audit_breaker_state",
                "Audit circuit breaker: 0 closed, 1 half-open (one trial commit), 2 open "
                "(requests refused with 503 at once)",
                registry=registry,
            ),
            breaker_rejections=Counter(
                "kzg_audit_breaker_rejections",
                "Requests refused at once (503 audit_unavailable) by the open audit breaker",
                registry=registry,
            ),
            probes_unrecorded=Counter(
                "kzg_probes_unrecorded",
                "Probe and scrape requests answered without an audit record "
                "([audit] record_probes = false)",
                ["route"],
                registry=registry,
            ),
            readiness=Gauge(
                "kzg_readiness_check",
                "Last result of each readiness check (1 passing, 0 failing)",
                ["check"],
                registry=registry,
            ),
            verifications=Counter(
                "kzg_audit_verifications",
                "Audit log verifications run through GET /v1/audit/verify, by result",
                ["result"],
                registry=registry,
            ),
            disk_free=Gauge(
                "kzg_data_dir_free_bytes",
                "Free space on the file system of the SQLite database's directory (no series "
                "on PostgreSQL)",
                ["path"],
                registry=registry,
            ),
        )

    def __post_init__(self) -> None:
        # Exported at 0 from the start: the first failed verification is an increase.
        for result in ("valid", "invalid"):
            self.verifications.labels(result)

    def render(self) -> bytes:
        return generate_latest(self.registry)
