"""The gateway's Prometheus metrics (prometheus_client), one registry per gateway."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.shadow import CONFIDENCE_BUCKETS

# Seconds; from a cache hit on the router (~20 ms on CPU) to a long expert answer.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGES = ("image", "route", "expert", "total")


class GatewayMetrics:
    """Requests by model, expert and outcome; fallbacks by reason; route confidence; stage latencies; in flight;
    how a candidate router compares with the live one."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("gateway_requests", "Requests answered, by requested model, expert and outcome.",
                                ["model", "expert", "outcome"], registry=self.registry)
        self.fallbacks = Counter("gateway_fallbacks", "Routes that took the fallback, by reason.", ["reason"],
                                 registry=self.registry)
        self.confidence = Histogram("gateway_route_confidence", "The router's confidence in its label.",
                                    buckets=CONFIDENCE_BUCKETS, registry=self.registry)
        self.latency = Histogram("gateway_stage_seconds", "Seconds spent per stage of an auto request.", ["stage"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being answered now.", registry=self.registry)
        self.queued = Gauge("gateway_requests_queued", "Requests waiting for an in-flight slot.",
                            registry=self.registry)
        self.upstream_restarts = Counter("gateway_upstream_restarts", "Times vLLM was restarted after it died.",
                                         registry=self.registry)
        # Shadow routing: a candidate router version beside the live one, by its versioned name.
        self.shadow_compared = Counter("gateway_shadow_compared", "Auto requests the candidate router also routed.",
                                       ["candidate"], registry=self.registry)
        self.shadow_agreed = Counter("gateway_shadow_agreed", "Shadowed requests the candidate routed as the live "
                                     "router did.", ["candidate"], registry=self.registry)
        self.shadow_routes = Counter("gateway_shadow_routes", "Shadowed requests by live route and candidate route "
                                     "(the confusion between the two).", ["candidate", "live", "shadow"],
                                     registry=self.registry)
        self.shadow_confidence = Histogram("gateway_shadow_confidence", "The candidate router's confidence in its "
                                           "label.", ["candidate"], buckets=CONFIDENCE_BUCKETS, registry=self.registry)
        self.shadow_failures = Counter("gateway_shadow_failures", "Shadow requests that failed (callers never see "
                                       "them).", ["candidate"], registry=self.registry)

    def text(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
