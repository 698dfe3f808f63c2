"""The gateway's Prometheus metrics: routes and outcomes, nodes' states, limits, the outbox."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

if TYPE_CHECKING:
    from tee_inference.gateway.nodes import NodePool
    from tee_inference.gateway.outbox import Outbox, Reporter


class GatewayMetrics:
    def __init__(self, pool: NodePool, outbox: Outbox, reporter: Reporter) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tee_inference_gateway_requests",
            "Requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "tee_inference_gateway_rate_limited",
            "Completions refused with 429 (per-key limit)",
            registry=self.registry,
        )
        self.tampered = Counter(
            "tee_inference_gateway_shared_store_tampered",
            "Shared-store records that did not verify under a verified node's key (not served)",
            registry=self.registry,
        )
        verified = Gauge(
            "tee_inference_gateway_nodes_verified", "Nodes verified and routed to", registry=self.registry
        )
        verified.set_function(lambda: len(pool.verified()))
        configured = Gauge("tee_inference_gateway_nodes", "Nodes configured", registry=self.registry)
        configured.set_function(lambda: len(pool.nodes))
        for outcome in ("ok", "failed"):
            gauge = Gauge(
                f"tee_inference_gateway_verifications_{outcome}",
                f"Node verifications that {'passed' if outcome == 'ok' else 'failed'} since start",
                registry=self.registry,
            )
            gauge.set_function(functools.partial(pool.verifications.__getitem__, outcome))
        pending = Gauge(
            "tee_inference_gateway_usage_outbox",
            "Usage records written and not yet reported",
            registry=self.registry,
        )
        pending.set_function(lambda: outbox.count("pending") + outbox.count("ready"))
        reported = Gauge(
            "tee_inference_gateway_usage_reported",
            "Usage records reported since start",
            registry=self.registry,
        )
        reported.set_function(lambda: reporter.reported)

    def render(self) -> bytes:
        return generate_latest(self.registry)
