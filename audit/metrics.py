"""Prometheus instruments of the audit writer, registered wherever the caller wants."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class AuditMetrics:
    queue_depth: Gauge
    batch_size: Histogram
    commit_latency: Histogram
    head_seq: Gauge
    failures: Counter
    tree_size: Gauge
    checkpoint_time: Gauge
    signing_failures: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> AuditMetrics:
        """Create the instruments in ``registry`` (the process default when None)."""
        reg = REGISTRY if registry is None else registry
        return cls(
            queue_depth=Gauge(
                "kzg_audit_queue_depth", "Audit records waiting for a commit", registry=reg
            ),
            batch_size=Histogram(
                "kzg_audit_batch_size",
                "Audit records committed per transaction",
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
                registry=reg,
            ),
            commit_latency=Histogram(
                "kzg_audit_commit_seconds",
                "Time to append and commit one batch of audit records",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                registry=reg,
            ),
            head_seq=Gauge(
                "kzg_audit_head_seq", "Sequence number of the newest audit record", registry=reg
            ),
            failures=Counter(
                "kzg_audit_commit_failures",
                "Audit batches that could not be committed",
                registry=reg,
            ),
            tree_size=Gauge(
                "kzg_audit_tree_size", "Size of the newest signed tree head", registry=reg
            ),
            checkpoint_time=Gauge(
                "kzg_audit_checkpoint_timestamp_seconds",
                "Unix time this process last signed and stored a tree head",
                registry=reg,
            ),
            signing_failures=Counter(
                "kzg_audit_signing_failures",
                "Tree heads the log key failed to sign (their batch is refused)",
                registry=reg,
            ),
        )
