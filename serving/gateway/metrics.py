"""The gateway's Prometheus metrics (prometheus_client), one registry per gateway.

Names carry the application's prefix and Prometheus' unit suffixes (prometheus_client adds `_total` to counters).
Label values are bounded: a model or expert name the gateway does not serve is counted as `other`, so a caller
naming made-up models adds no series; outcomes are the few of OUTCOMES.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.shadow import CONFIDENCE_BUCKETS

PREFIX = "lora_router_gateway"
# Seconds; from a cache hit on the router (~20 ms on CPU) to a long expert answer.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGES = ("image", "route", "expert", "total")
OUTCOMES = ("ok", "bad_request", "not_found", "refused", "queue_full", "upstream_error", "timeout")
# The label value of a model or expert name that is not served, and of a request that named none (or none yet).
OTHER = "other"
NONE = "none"


def outcome(status: int) -> str:
    """The outcome label of an answer's status: refused is a route refused under fallback 'error' (422)."""
    if status < 400:
        return "ok"
    named = {404: "not_found", 422: "refused", 429: "queue_full", 504: "timeout"}
    return named.get(status, "upstream_error" if status >= 500 else "bad_request")


class GatewayMetrics:
    """Requests by model, expert and outcome; fallbacks by reason; route confidence; stage latencies; in flight;
    how a candidate router compares with the live one."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "Chat requests answered, by requested model, expert and "
                                "outcome (names not served: other).", ["model", "expert", "outcome"],
                                registry=self.registry)
        self.fallbacks = Counter(f"{PREFIX}_fallbacks", "Routes that took the fallback, by reason.", ["reason"],
                                 registry=self.registry)
        self.confidence = Histogram(f"{PREFIX}_route_confidence", "The router's confidence in its label.",
                                    buckets=CONFIDENCE_BUCKETS, registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_stage_seconds", "Seconds spent per stage of an auto request.", ["stage"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge(f"{PREFIX}_requests_in_flight", "Requests being answered now.",
                               registry=self.registry)
        self.queued = Gauge(f"{PREFIX}_requests_queued", "Requests waiting for an in-flight slot.",
                            registry=self.registry)
        self.upstream_restarts = Counter(f"{PREFIX}_upstream_restarts", "Times vLLM was restarted after it died.",
                                         registry=self.registry)
        # Shadow routing: a candidate router version beside the live one, by its versioned name.
        self.shadow_compared = Counter(f"{PREFIX}_shadow_compared", "Auto requests the candidate router also "
                                       "routed.", ["candidate"], registry=self.registry)
        self.shadow_agreed = Counter(f"{PREFIX}_shadow_agreed", "Shadowed requests the candidate routed as the live "
                                     "router did.", ["candidate"], registry=self.registry)
        self.shadow_routes = Counter(f"{PREFIX}_shadow_routes", "Shadowed requests by live route and candidate "
                                     "route (the confusion between the two).", ["candidate", "live", "shadow"],
                                     registry=self.registry)
        self.shadow_confidence = Histogram(f"{PREFIX}_shadow_confidence", "The candidate router's confidence in its "
                                           "label.", ["candidate"], buckets=CONFIDENCE_BUCKETS, registry=self.registry)
        self.shadow_failures = Counter(f"{PREFIX}_shadow_failures", "Shadow requests that failed (callers never see "
                                       "them).", ["candidate"], registry=self.registry)

    def text(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
