"""The drift signal: whether live traffic still looks like what the live router was calibrated on. Over a sliding
window of its last routes and feedback verdicts: the share of routes below the routing threshold, the label mix,
and the feedback error rate, each beside what the router's calibration set showed (the manifest's `calibration`,
written by the validators). A router that meets screens in a look it never saw routes more of them below the
threshold, shifts its label mix, or gets more `correct: false` feedback. Pure arithmetic, like serving.shadow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DriftBaseline:
    """What the live router's calibration set showed; None where the manifest does not say."""

    threshold: float
    """The live routing threshold (min_confidence): routes below it take the fallback."""
    low_confidence: float | None
    """Share of the calibration set below that threshold (1 - coverage), when the threshold is the fitted one."""
    label_mix: Mapping[str, float] | None
    """Share of each label in the calibration set."""
    error_rate: float | None
    """Share of routed calibration screenshots routed wrong (1 - routed accuracy)."""

    @classmethod
    def of(cls, threshold: float, calibration: Mapping[str, Any] | None) -> DriftBaseline:
        calibration = calibration or {}
        fitted = calibration.get("threshold")
        same = fitted is not None and abs(float(fitted) - threshold) < 1e-9
        return cls(threshold=threshold,
                   low_confidence=round(1 - float(calibration["coverage"]), 4)
                   if same and "coverage" in calibration else None,
                   label_mix=calibration.get("label_mix"),
                   error_rate=round(1 - float(calibration["routed_accuracy"]), 4)
                   if same and "routed_accuracy" in calibration else None)


class DriftWindow:
    """The last `size` routes (top label, confidence) and feedback verdicts of one router version; a route by
    another version (a promotion, a rollback) starts the window again."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.router: str | None = None
        self.routes: deque[tuple[str | None, float]] = deque(maxlen=size)
        self.verdicts: deque[bool] = deque(maxlen=size)

    def route(self, router: str | None, probabilities: Mapping[str, float], confidence: float) -> None:
        """One route: the router version, its label probabilities (empty when it named no label), its confidence."""
        self._follow(router)
        top = max(probabilities, key=probabilities.__getitem__) if probabilities else None
        self.routes.append((top, confidence))

    def feedback(self, router: str | None, correct: bool) -> None:
        """A caller's verdict on a route by `router`; verdicts on an older version's routes are not this one's."""
        if router == self.router:
            self.verdicts.append(correct)

    def report(self, baseline: DriftBaseline, labels: list[str]) -> dict[str, Any]:
        """The window beside the baseline; shares are None while the window is empty."""
        routes = len(self.routes)
        mix = {label: (sum(1 for top, _ in self.routes if top == label) / routes if routes else None)
               for label in labels}
        shift = None
        if routes and baseline.label_mix:
            # Total variation distance: the share of traffic that would have to change label to match.
            shift = round(0.5 * sum(abs((mix[label] or 0.0) - float(baseline.label_mix.get(label, 0.0)))
                                    for label in set(labels) | set(baseline.label_mix)), 4)
        low = sum(1 for _, confidence in self.routes if confidence < baseline.threshold) / routes if routes else None
        verdicts = len(self.verdicts)
        return {"router": self.router, "window": self.size, "routes": routes,
                "low_confidence_share": _round(low), "low_confidence_expected": baseline.low_confidence,
                "threshold": baseline.threshold,
                "label_mix": {label: _round(share) for label, share in mix.items()},
                "label_mix_expected": dict(baseline.label_mix) if baseline.label_mix else None,
                "label_shift": shift, "feedback": verdicts,
                "feedback_error_rate": _round(self.verdicts.count(False) / verdicts) if verdicts else None,
                "feedback_error_expected": baseline.error_rate}

    def _follow(self, router: str | None) -> None:
        if router != self.router:
            self.router = router
            self.routes.clear()
            self.verdicts.clear()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
