"""Prometheus metrics of the signing layer. Labels are routes and outcomes, never content.

Each server owns its registry (no process-global state); `/metrics` serves it after the
engine's own metrics when the engine has any.
"""

from __future__ import annotations

from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_Metric = TypeVar("_Metric", bound=MetricWrapperBase)
_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class ServingMetrics:
    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tee_inference_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tee_inference_request_duration_seconds",
            "Time from request start to the last response byte",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "tee_inference_time_to_first_byte_seconds",
            "Time from request start to the first response body byte",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.signatures = Counter(
            "tee_inference_signatures",
            "Completions signed (both algorithms) and stored",
            registry=self.registry,
        )
        self.signing_seconds = Histogram(
            "tee_inference_signing_duration_seconds",
            "Time to sign one completion with both algorithms",
            buckets=_FAST_BUCKETS,
            registry=self.registry,
        )
        self.unsigned = Counter(
            "tee_inference_unsigned_responses",
            "Completion responses that could not be signed, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.gate_rejections = Counter(
            "tee_inference_gate_rejections",
            "Requests refused before the engine, by error code",
            ["code"],
            registry=self.registry,
        )
        self.store_evictions = Counter(
            "tee_inference_signature_store_evictions",
            "Signatures dropped from the store, by reason (expired or capacity)",
            ["reason"],
            registry=self.registry,
        )
        self.store_collisions = Counter(
            "tee_inference_signature_id_collisions",
            "Signatures not stored because their id was already held (the first record is kept)",
            registry=self.registry,
        )
        self.shed = Counter(
            "tee_inference_shed_requests",
            "Completions refused with 429 before the engine, by bound (inflight, ttft, body_bytes)",
            ["reason"],
            registry=self.registry,
        )
        self.inflight = Gauge(
            "tee_inference_inflight_completions",
            "Completions admitted and not yet finished",
            registry=self.registry,
        )
        self.store_entries = Gauge(
            "tee_inference_signature_store_entries",
            "Signatures currently held in memory",
            registry=self.registry,
        )
        # Scale-out (docs/scale-out.md): signed usage, and shared-store records refused on reading.
        self.usage_records = Counter(
            "tee_inference_usage_records",
            "Completions whose usage was signed and stored, by source (engine or counted)",
            ["source"],
            registry=self.registry,
        )
        self.shared_store_tampered = Counter(
            "tee_inference_shared_store_tampered",
            "Records read from a shared store that did not verify under a trusted key (not served)",
            ["kind"],
            registry=self.registry,
        )

    def child(self, metric: _Metric, *labels: str) -> _Metric:
        """`metric.labels(*labels)`, looked up once per label set (routes and statuses are few).

        prometheus_client's `labels` takes a lock and builds its key on every call: a few µs per
        request on the hot path, for the same handful of children.
        """
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[return-value]

    def render(self) -> bytes:
        return generate_latest(self.registry)
