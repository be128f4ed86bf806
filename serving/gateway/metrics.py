"""The gateway's Prometheus metrics (prometheus_client), one registry per gateway.

Names carry the application's prefix and Prometheus' unit suffixes (prometheus_client adds `_total` to counters).
Label values are bounded: a model or expert name the gateway does not serve is counted as `other`, so a caller
naming made-up models adds no series; outcomes are the few of OUTCOMES.
"""

from __future__ import annotations

import math
from typing import Any

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
        # Capture and caller feedback (serving.gateway.capture).
        self.captures = Counter(f"{PREFIX}_captures", "Auto requests captured, by reason (an item may have several).",
                                ["reason"], registry=self.registry)
        self.captures_dropped = Counter(f"{PREFIX}_captures_dropped", "Captured items dropped by the store's bounds.",
                                        registry=self.registry)
        self.capture_failures = Counter(f"{PREFIX}_capture_failures", "Captures that could not be written.",
                                        registry=self.registry)
        self.feedback = Counter(f"{PREFIX}_feedback", "Caller feedback on auto routes, by routed expert (names not "
                                "served: other) and verdict (correct, wrong).", ["expert", "verdict"],
                                registry=self.registry)
        # The drift signal (serving.drift), set from the window at each scrape; NaN while there is nothing to say.
        self.drift_routes = Gauge(f"{PREFIX}_drift_routes", "Routes of the live router in the drift window.",
                                  registry=self.registry)
        self.drift_low_confidence = Gauge(f"{PREFIX}_drift_low_confidence_share", "Share of the window's routes below "
                                          "the routing threshold.", registry=self.registry)
        self.drift_low_confidence_expected = Gauge(f"{PREFIX}_drift_low_confidence_expected", "Share of the router's "
                                                   "calibration set below the threshold.", registry=self.registry)
        self.drift_label_share = Gauge(f"{PREFIX}_drift_label_share", "Share of the window's routes per top label.",
                                       ["label"], registry=self.registry)
        self.drift_label_shift = Gauge(f"{PREFIX}_drift_label_shift", "Total variation distance between the window's "
                                       "label mix and the calibration set's.", registry=self.registry)
        self.drift_feedback_error = Gauge(f"{PREFIX}_drift_feedback_error_rate", "Share of the window's feedback "
                                          "verdicts that said the route was wrong.", registry=self.registry)
        self.drift_feedback_error_expected = Gauge(f"{PREFIX}_drift_feedback_error_expected", "Share of the "
                                                   "calibration set's routed screenshots routed wrong.",
                                                   registry=self.registry)
        self.shadow_failures = Counter(f"{PREFIX}_shadow_failures", "Shadow requests that failed (callers never see "
                                       "them).", ["candidate"], registry=self.registry)

    def set_drift(self, report: dict[str, Any]) -> None:
        """The drift gauges from a serving.drift report."""
        nan = lambda value: math.nan if value is None else value
        self.drift_routes.set(report["routes"])
        self.drift_low_confidence.set(nan(report["low_confidence_share"]))
        self.drift_low_confidence_expected.set(nan(report["low_confidence_expected"]))
        self.drift_label_shift.set(nan(report["label_shift"]))
        self.drift_feedback_error.set(nan(report["feedback_error_rate"]))
        self.drift_feedback_error_expected.set(nan(report["feedback_error_expected"]))
        self.drift_label_share.clear()  # a promoted router may have other labels
        for label, share in report["label_mix"].items():
            self.drift_label_share.labels(label).set(nan(share))

    def text(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
