"""The drift signal (serving.drift): the live router's window of routes and verdicts against its calibration set."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.drift import DriftBaseline, DriftWindow
from serving.gateway.metrics import GatewayMetrics

LABELS = ["calendar", "claim-window", "provider-select"]
CALIBRATION = {"threshold": 0.6, "coverage": 0.95, "routed_accuracy": 0.98,
               "label_mix": {"calendar": 0.34, "claim-window": 0.33, "provider-select": 0.33}}


def _window(routes: list[tuple[str, float]], router: str = "router@1", size: int = 100) -> DriftWindow:
    window = DriftWindow(size)
    for label, confidence in routes:
        window.route(router, {label: confidence}, confidence)
    return window


def test_traffic_like_the_calibration_set_shows_no_drift():
    window = _window([(label, 0.99) for label in LABELS] * 10)
    report = window.report(DriftBaseline.of(0.6, CALIBRATION), LABELS)
    assert report["routes"] == 30 and report["low_confidence_share"] == 0.0
    assert report["low_confidence_expected"] == 0.05 and report["feedback_error_expected"] == 0.02
    assert report["label_shift"] == pytest.approx(0.0067, abs=1e-4)


def test_an_unseen_look_shows_as_low_confidence_a_shifted_mix_and_wrong_verdicts():
    # The new look: half the screens go to calendar at low confidence, and callers say those routes are wrong.
    window = _window([("calendar", 0.4)] * 10 + [("claim-window", 0.9)] * 5 + [("provider-select", 0.9)] * 5)
    for correct in [False] * 6 + [True] * 4:
        window.feedback("router@1", correct)
    report = window.report(DriftBaseline.of(0.6, CALIBRATION), LABELS)
    assert report["low_confidence_share"] == 0.5
    assert report["label_mix"] == {"calendar": 0.5, "claim-window": 0.25, "provider-select": 0.25}
    assert report["label_shift"] == pytest.approx(0.16)
    assert report["feedback_error_rate"] == 0.6


def test_the_window_keeps_the_last_routes_and_starts_again_for_another_router_version():
    window = _window([("calendar", 0.1)] * 5 + [("claim-window", 0.9)] * 5, size=5)
    assert window.report(DriftBaseline.of(0.6, CALIBRATION), LABELS)["low_confidence_share"] == 0.0
    window.feedback("router@1", False)
    window.route("router@2", {"calendar": 0.9}, 0.9)  # promoted
    window.feedback("router@1", False)  # a verdict on the old version's route
    report = window.report(DriftBaseline.of(0.6, CALIBRATION), LABELS)
    assert (report["router"], report["routes"], report["feedback"]) == ("router@2", 1, 0)


@pytest.mark.parametrize("threshold, calibration, expected", [
    (0.6, None, (None, None, None)),  # a router validated without --write_calibration
    (0.7, CALIBRATION, (None, CALIBRATION["label_mix"], None)),  # the config overrides the fitted threshold
])
def test_what_the_manifest_does_not_say_is_not_compared(threshold, calibration, expected):
    baseline = DriftBaseline.of(threshold, calibration)
    assert (baseline.low_confidence, baseline.label_mix, baseline.error_rate) == expected
    report = _window([("calendar", 0.9)]).report(baseline, LABELS)
    assert report["low_confidence_expected"] is None and report["feedback_error_expected"] is None


def test_the_gauges_follow_the_report_and_are_nan_while_the_window_is_empty():
    metrics = GatewayMetrics()
    metrics.set_drift(DriftWindow(10).report(DriftBaseline.of(0.6, CALIBRATION), LABELS))
    empty = _gauges(metrics)
    assert empty["lora_router_gateway_drift_routes"] == 0 and math.isnan(empty["lora_router_gateway_drift_label_shift"])
    metrics.set_drift(_window([("calendar", 0.4)] * 4).report(DriftBaseline.of(0.6, CALIBRATION), LABELS))
    gauges = _gauges(metrics)
    assert gauges["lora_router_gateway_drift_low_confidence_share"] == 1.0
    assert gauges["lora_router_gateway_drift_low_confidence_expected"] == 0.05
    assert gauges[("lora_router_gateway_drift_label_share", "calendar")] == 1.0


def _gauges(metrics: GatewayMetrics) -> dict:
    out = {}
    for family in text_string_to_metric_families(metrics.text().decode()):
        for sample in family.samples:
            if sample.name.startswith("lora_router_gateway_drift"):
                out[(sample.name, sample.labels["label"]) if sample.labels else sample.name] = sample.value
    return out
