"""The validation report's numbers on known inputs: classification metrics, calibration error, temperature,
threshold; and how the fitted calibration reaches routing (manifest < client: section)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lora_router.deployment import load_config
from lora_router.manifest import AdapterManifest
from lora_router.routing import RoutingConfigError, RoutingPolicy, calibrated_settings, decide
from router_client.config import ClientConfig
from tests.test_routing import FIRST, LABELS, one_token_completion
from training.calibration import (
    calibrate,
    choose_threshold,
    expected_calibration_error,
    fit_temperature,
    label_probabilities,
    reliability_bins,
    routed_at,
)
from training.validate_router import OTHER, calibration_section, classification_report


def test_classification_report_on_known_answers():
    gold = ["a", "a", "a", "b", "b", "c"]
    predicted = ["a", "a", "b", "b", "x", "c"]
    report = classification_report(gold, predicted, ["a", "b", "c"])
    assert (report["accuracy"], report["correct"], report["count"]) == (0.6667, 4, 6)
    assert report["confusion_matrix"] == {"rows_gold": ["a", "b", "c"], "columns_predicted": ["a", "b", "c", OTHER],
                                          "matrix": [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]}
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.6667, "f1": 0.8, "support": 3}
    assert report["per_class"]["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert report["per_class"]["c"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}


def test_classification_report_refuses_a_gold_answer_that_is_no_label():
    with pytest.raises(ValueError, match="gold answer 'z' is not a label"):
        classification_report(["z"], ["a"], ["a"])


def test_expected_calibration_error_on_known_bins():
    confidence = np.array([0.9, 0.9, 0.6, 0.6])
    correct = np.array([True, False, True, True])
    # Bin 0.9: accuracy 0.5 vs 0.9; bin 0.6: accuracy 1 vs 0.6; each holds half: 0.5*0.4 + 0.5*0.4.
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.4)
    bins = {b.low: b for b in reliability_bins(confidence, correct) if b.count}
    assert sorted(bins) == [0.6, 0.9] and bins[0.9].accuracy == 0.5 and bins[0.6].confidence == pytest.approx(0.6)
    # A confidence of exactly 1 falls in the last bin, and a perfectly calibrated set scores 0.
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([True, True])) == 0.0


@pytest.mark.parametrize("target, threshold, coverage, accuracy", [
    (0.99, 0.9, 0.4, 1.0),   # the top two are right, the third is wrong
    (0.75, 0.6, 1.0, 0.8),   # everything routed keeps 4/5
    (0.80, 0.6, 1.0, 0.8),
])
def test_choose_threshold_keeps_the_target_with_most_coverage(target, threshold, coverage, accuracy):
    confidence = np.array([0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([True, True, False, True, True])
    chosen = choose_threshold(confidence, correct, target)
    assert (chosen.threshold, chosen.coverage, chosen.accuracy) == (threshold, coverage, pytest.approx(accuracy))


def test_choose_threshold_routes_ties_together_and_may_route_nothing():
    chosen = choose_threshold(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]), 0.99)
    assert (chosen.threshold, chosen.coverage, chosen.routed) == (None, 0.0, 0)
    assert routed_at(np.array([0.9, 0.9, 0.5]), np.array([True, False, True]), 0.9).routed == 2


def test_label_probabilities_divide_by_the_temperature_and_ignore_missing_labels():
    probabilities = label_probabilities(np.array([[0.0, -math.inf, math.log(3)]]), temperature=1.0)
    assert probabilities[0].tolist() == pytest.approx([0.25, 0.0, 0.75])
    hotter = label_probabilities(np.array([[0.0, math.log(4)]]), temperature=2.0)
    assert hotter[0].tolist() == pytest.approx([1 / 3, 2 / 3])


def test_fit_temperature_finds_the_known_optimum():
    # Two labels, score 4 for label 0 every time, right 3 times in 4: sigmoid(4/T) = 3/4, T = 4/ln 3.
    scores = np.array([[4.0, 0.0]] * 4)
    gold = np.array([0, 0, 0, 1])
    assert fit_temperature(scores, gold) == pytest.approx(4 / math.log(3), rel=1e-3)


def test_calibrate_makes_an_overconfident_router_honest():
    rng = np.random.default_rng(0)
    n, k = 400, 3
    gold = rng.integers(0, k, n)
    # Right 80% of the time but with scores that claim ~99.9%.
    predicted = np.where(rng.random(n) < 0.8, gold, (gold + 1) % k)
    scores = np.full((n, k), -8.0)
    scores[np.arange(n), predicted] = 0.0
    fitted = calibrate(scores, gold, np.ones(n, dtype=bool), target_accuracy=0.99)
    assert fitted.ece_raw > 0.15 and fitted.ece < 0.05 and fitted.temperature > 1
    # Every prediction has the same confidence, so no threshold keeps 99%: none is chosen.
    assert fitted.threshold is None and fitted.coverage == 0.0 and fitted.count == n


def test_answers_that_name_no_label_are_never_routed():
    scores = np.array([[0.0, -5.0], [0.0, -5.0]])
    fitted = calibrate(scores, np.array([0, 0]), np.array([True, False]), target_accuracy=0.99)
    # The valid answer is routed and right; the other has confidence 0 and stays below any threshold.
    assert fitted.coverage == 0.5 and fitted.routed_accuracy == 1.0 and 0 < fitted.threshold <= 1


def test_calibration_section_scores_a_stored_manifest_on_a_new_set():
    scores = [[-0.1, -6.0], [-0.1, -6.0], [-6.0, -0.1], [-0.1, -6.0]]
    gold, answers = ["a", "a", "b", "b"], ["a", "a", "b", "a"]
    stored = {"temperature": 1.0, "threshold": 0.999, "target_accuracy": 0.99, "data": "first"}
    section, curves = calibration_section(scores, gold, answers, ["a", "b"], 0.99, "second", stored)
    assert section["with_manifest"]["routed"] == 0  # 0.995 < 0.999: nothing routed at that threshold
    assert section["fitted"]["data"] == "second" and set(curves) >= {"raw", "manifest"}


@pytest.mark.parametrize("client, calibration, expected", [
    ((None, None), None, {"min_confidence": 0.0, "temperature": 1.0}),
    ((None, None), {"threshold": 0.8, "temperature": 2.5}, {"min_confidence": 0.8, "temperature": 2.5}),
    ((0.5, None), {"threshold": 0.8, "temperature": 2.5}, {"min_confidence": 0.5, "temperature": 2.5}),
    ((None, 1.0), {"threshold": None, "temperature": 2.5}, {"min_confidence": 0.0, "temperature": 1.0}),
])
def test_the_client_section_wins_over_the_manifest(client, calibration, expected):
    assert calibrated_settings(*client, calibration) == expected


@pytest.mark.parametrize("calibration, message", [
    ({"threshold": "high", "temperature": "x"}, "calibration gives min_confidence 'high', which is no number; "
                                                "the router manifest's calibration gives temperature 'x'"),
    ({"threshold": 2}, "min_confidence must be within 0-1"),
    ({"temperature": 0}, "temperature must be > 0"),
])
def test_bad_calibrated_settings_are_named(calibration, message):
    with pytest.raises(RoutingConfigError, match=message):
        calibrated_settings(None, None, calibration)


def test_temperature_reaches_the_routes_confidence():
    completion = one_token_completion("token_id:11", "calendar", {"calendar": -0.1, "claim-window": -3.0,
                                                                    "provider-select": -3.0})
    raw = decide(completion, mode="one-token", labels=LABELS, first_tokens=FIRST, min_confidence=0.8,
                 fallback_target="base", latency_s=0.0)
    scaled = decide(completion, mode="one-token", labels=LABELS, first_tokens=FIRST, min_confidence=0.8,
                    fallback_target="base", latency_s=0.0, temperature=3.0)
    assert raw.expert == "calendar" and raw.confidence == pytest.approx(1 / (1 + 2 * math.exp(-2.9)))
    # Divided by 3 the same scores are less sure: below 0.8, so the fallback runs.
    assert scaled.confidence == pytest.approx(1 / (1 + 2 * math.exp(-2.9 / 3)))
    assert (scaled.expert, scaled.fallback_reason) == ("base", "low_confidence")


def test_the_router_manifest_calibration_reaches_client_and_gateway_policy(tmp_path):
    config = load_config("configs/tiny-cpu.yaml")
    router = tmp_path / "router"
    router.mkdir()
    AdapterManifest(base_model="b", base_model_fingerprint="f", rank=8, target_modules=["q_proj"],
                    labels=list(config.labels),
                    calibration={"temperature": 1.7, "threshold": 0.62, "target_accuracy": 0.99}).write(router)
    config.router.path = str(router)
    client = ClientConfig.from_deployment(config)
    assert (client.min_confidence, client.temperature) == (0.62, 1.7)
    calibration = json.loads((router / "lora_router_manifest.json").read_text())["calibration"]
    policy = RoutingPolicy.of(config, calibration=calibration)
    assert (policy.min_confidence, policy.temperature) == (0.62, 1.7)
    config.client.min_confidence = 0.3
    assert ClientConfig.from_deployment(config).min_confidence == 0.3
    assert RoutingPolicy.of(config, calibration=calibration).min_confidence == 0.3
