"""Router confidence that means something: label probabilities from scores, temperature scaling, the expected
calibration error, and the confidence threshold that keeps routed accuracy at a target.

Scores are the log-probabilities of each label's first token at the router's first answer step: what the client's
one-token mode gets from vLLM (logprob_token_ids) and what the in-process validation reads from the model's
logits. A label's probability is the softmax of its score over the labels, divided by the temperature first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

# Confidence bins of the expected calibration error and the reliability diagram.
ECE_BINS = 10
# Temperatures searched when fitting (the optimum of a sane router lies well inside).
TEMPERATURE_RANGE = (0.05, 20.0)


def label_probabilities(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of (N, labels) scores divided by `temperature`; -inf scores get probability 0."""
    scaled = np.asarray(scores, dtype=np.float64) / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    weights = np.exp(scaled)
    return weights / weights.sum(axis=1, keepdims=True)


def negative_log_likelihood(scores: np.ndarray, gold: np.ndarray, temperature: float) -> float:
    """Mean -log p(gold) under label_probabilities(scores, temperature)."""
    probabilities = label_probabilities(scores, temperature)
    return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(gold)), gold], 1e-300, None))))


def fit_temperature(scores: np.ndarray, gold: np.ndarray, tolerance: float = 1e-4) -> float:
    """The temperature minimizing the held-out negative log-likelihood (temperature scaling, Guo et al. 2017).

    The NLL is convex in 1/temperature, so a golden-section search on log(temperature) finds its minimum.
    """
    if len(gold) == 0:
        raise ValueError("fit_temperature needs at least one example")
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = (negative_log_likelihood(scores, gold, math.exp(x)) for x in (a, b))
    while high - low > tolerance:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = negative_log_likelihood(scores, gold, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = negative_log_likelihood(scores, gold, math.exp(b))
    return math.exp((low + high) / 2)


@dataclass(frozen=True)
class ReliabilityBin:
    """One confidence bin: its bounds, how many predictions fell in it, their mean confidence and accuracy."""

    low: float
    high: float
    count: int
    confidence: float
    accuracy: float


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Equal-width confidence bins over [0, 1] (a confidence of exactly 1 falls in the last)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    result = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        result.append(ReliabilityBin(low=b / bins, high=(b + 1) / bins, count=count,
                                     confidence=float(confidence[mask].mean()) if count else 0.0,
                                     accuracy=float(correct[mask].mean()) if count else 0.0))
    return result


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over bins of (bin share) x |accuracy - mean confidence|."""
    total = len(confidence)
    if total == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    return float(sum(b.count / total * abs(b.accuracy - b.confidence) for b in reliability_bins(confidence, correct, bins)))


@dataclass(frozen=True)
class Threshold:
    """The lowest confidence routed: accuracy and coverage of the routed predictions (confidence >= threshold).
    `threshold` is None when no threshold reaches the target (nothing would be routed)."""

    threshold: float | None
    target_accuracy: float
    accuracy: float
    coverage: float
    routed: int


def routed_at(confidence: np.ndarray, correct: np.ndarray, threshold: float | None,
              target_accuracy: float = 0.0) -> Threshold:
    """Accuracy and coverage of the predictions a threshold routes (None routes nothing)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    routed = confidence >= threshold if threshold is not None else np.zeros(len(confidence), dtype=bool)
    count = int(routed.sum())
    return Threshold(threshold=threshold, target_accuracy=target_accuracy,
                     accuracy=float(correct[routed].mean()) if count else 0.0,
                     coverage=count / max(1, len(confidence)), routed=count)


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> Threshold:
    """The lowest threshold whose routed predictions are at least `target_accuracy` accurate: the most coverage
    that keeps the target. Candidates are the confidences themselves (ties are routed together)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    best = routed_at(confidence, correct, None, target_accuracy)
    for candidate in np.unique(confidence)[::-1]:
        result = routed_at(confidence, correct, float(candidate), target_accuracy)
        if result.accuracy >= target_accuracy:
            best = result
    return best


@dataclass
class Calibration:
    """What a router's manifest records of its confidence: the temperature its scores are divided by, the
    threshold under which a route takes the fallback, and what they were measured on."""

    temperature: float = field(metadata={"help": "Scores are divided by it before the softmax over labels."})
    threshold: float | None = field(metadata={
        "help": "Routes whose (temperature-scaled) confidence is below it take the fallback; None: none reached "
                "the target."})
    target_accuracy: float = field(metadata={"help": "Accuracy on routed screenshots the threshold keeps."})
    coverage: float = field(metadata={"help": "Share of the held-out screenshots the threshold routes."})
    routed_accuracy: float = field(metadata={"help": "Accuracy on those routed screenshots."})
    ece: float = field(metadata={"help": "Expected calibration error after temperature scaling."})
    ece_raw: float = field(metadata={"help": "Expected calibration error at temperature 1."})
    count: int = field(metadata={"help": "Held-out screenshots it was fitted on."})
    data: str = field(default="", metadata={"help": "The held-out set it was fitted on."})
    label_mix: dict[str, float] | None = field(default=None, metadata={
        "help": "Share of each label in that set: what the gateway's drift signal compares traffic with."})

    def to_dict(self) -> dict:
        return asdict(self)


def routed_confidence(scores: np.ndarray, gold: np.ndarray, valid: np.ndarray,
                      temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Each prediction's confidence (the top label's probability; 0 where the answer named no label, which is
    never routed) and whether it is right (the top label is gold and the answer named a label)."""
    probabilities = label_probabilities(scores, temperature)
    valid = np.asarray(valid, dtype=bool)
    return (np.where(valid, probabilities.max(axis=1), 0.0),
            valid & (probabilities.argmax(axis=1) == np.asarray(gold)))


def calibrate(scores: np.ndarray, gold: np.ndarray, valid: np.ndarray, target_accuracy: float,
              data: str = "") -> Calibration:
    """Fit the temperature, then choose the threshold on the scaled confidences of the same held-out set (rounded
    down, so a written threshold still routes what it was chosen on).

    `scores` (N, labels), `gold` (N,) label indices, `valid` (N,) whether the answer named a label at all.
    """
    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold)
    temperature = fit_temperature(scores, gold)
    raw, raw_correct = routed_confidence(scores, gold, valid, 1.0)
    scaled, correct = routed_confidence(scores, gold, valid, temperature)
    chosen = choose_threshold(scaled, correct, target_accuracy)
    return Calibration(temperature=round(temperature, 4),
                       threshold=None if chosen.threshold is None else math.floor(chosen.threshold * 1e6) / 1e6,
                       target_accuracy=target_accuracy, coverage=round(chosen.coverage, 4),
                       routed_accuracy=round(chosen.accuracy, 4),
                       ece=round(expected_calibration_error(scaled, correct), 4),
                       ece_raw=round(expected_calibration_error(raw, raw_correct), 4), count=len(gold), data=data)


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str,
                     bins: int = ECE_BINS) -> None:
    """Reliability diagram: accuracy against mean confidence per bin, one line per named (confidence, correct)
    pair, with each curve's ECE in the legend and the diagonal of perfect calibration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), height_ratios=[3, 1], sharex=True)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for name, (confidence, correct) in curves.items():
        filled = [b for b in reliability_bins(confidence, correct, bins) if b.count]
        ece = expected_calibration_error(confidence, correct, bins)
        ax.plot([b.confidence for b in filled], [b.accuracy for b in filled], marker="o",
                label=f"{name} (ECE {ece:.3f})")
        hist.hist(confidence, bins=bins, range=(0, 1), alpha=0.5, label=name)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("confidence of the chosen label")
    hist.set_ylabel("screenshots")
    hist.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
