"""Latency percentiles, one way everywhere (the batch summary, the benchmark's phases): numpy's default linear
interpolation between the closest ranks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
    return Percentiles(p50, p90, p99, float(np.mean(values)), len(values))
