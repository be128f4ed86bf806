"""Shadow routing's arithmetic: which `auto` requests a candidate router also sees, and how its routes compare
with the live router's. Pure; the gateway (serving.gateway.lifecycle) sends the requests.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# Upper bounds of the confidence buckets (the gateway's route-confidence histogram uses the same).
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# A route the fallback policy refused, as it appears in the confusion table.
REFUSED = "(refused)"


class ShadowSampler:
    """Takes exactly `fraction` of the requests it is asked about, evenly spread (no randomness to reason about)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self._credit = 0.0

    def take(self) -> bool:
        self._credit += self.fraction
        if self._credit >= 1 - 1e-9:  # 0.1 added ten times is 0.9999999999999999
            self._credit -= 1
            return True
        return False


@dataclass
class LabelledScore:
    """The live and the candidate router, each routing the labelled held-out captures (lora_router.capture): how
    often each named the label."""

    count: int
    scored: int = 0
    failed: int = 0
    live_correct: int = 0
    candidate_correct: int = 0

    def record(self, label: str, live_route: str, candidate_route: str) -> None:
        self.scored += 1
        self.live_correct += live_route == label
        self.candidate_correct += candidate_route == label

    def report(self) -> dict[str, Any]:
        accuracy = (lambda correct: round(correct / self.scored, 4) if self.scored else None)
        return {"count": self.count, "scored": self.scored, "failed": self.failed,
                "live": {"correct": self.live_correct, "accuracy": accuracy(self.live_correct)},
                "candidate": {"correct": self.candidate_correct, "accuracy": accuracy(self.candidate_correct)}}


@dataclass
class ShadowStats:
    """How a candidate router's routes compared with the live router's on the same requests."""

    candidate: str
    compared: int = 0
    agreed: int = 0
    failed: int = 0
    skipped: int = 0
    confusion: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    confidence_counts: list[int] = field(default_factory=lambda: [0] * len(CONFIDENCE_BUCKETS))
    confidence_sum: float = 0.0
    labelled: LabelledScore | None = None  # None while capture is off (or the scoring has not begun)

    def record(self, live_route: str, candidate_route: str, confidence: float) -> None:
        """One request both routed: where the live router sent it, where the candidate would have, and the
        candidate's confidence in its label."""
        self.compared += 1
        self.agreed += live_route == candidate_route
        self.confusion[live_route][candidate_route] += 1
        self.confidence_counts[min(bisect.bisect_left(CONFIDENCE_BUCKETS, confidence), len(CONFIDENCE_BUCKETS) - 1)] += 1
        self.confidence_sum += confidence

    def report(self) -> dict[str, Any]:
        """The comparison as JSON: agreement, confusion (live route -> candidate route -> requests) and the
        candidate's confidence distribution (requests per bucket, each bucket up to and including its bound)."""
        return {
            "candidate": self.candidate, "compared": self.compared, "agreed": self.agreed,
            "agreement": round(self.agreed / self.compared, 4) if self.compared else None,
            "failed": self.failed, "skipped": self.skipped,
            "confusion": {live: dict(row) for live, row in sorted(self.confusion.items())},
            "confidence": {"buckets": list(CONFIDENCE_BUCKETS), "counts": list(self.confidence_counts),
                           "mean": round(self.confidence_sum / self.compared, 4) if self.compared else None},
            "labelled": self.labelled.report() if self.labelled else None,
        }
