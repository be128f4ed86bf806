"""Latency percentiles, one way everywhere (the batch summary, the benchmark's phases): linear interpolation
between the closest ranks (numpy's default, the standard library's "inclusive" method), with no numpy."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Percentiles:
    """p50 / p90 / p99 and mean of a set of values in seconds (None when there are none)."""

    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None
    count: int


def percentiles(values: Sequence[float]) -> Percentiles:
    """Percentiles of `values` (None-free)."""
    if not values:
        return Percentiles(None, None, None, None, 0)
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return Percentiles(float(cuts[49]), float(cuts[89]), float(cuts[98]), statistics.fmean(values), len(values))
