"""vLLM's Prometheus /metrics: scrape, difference two scrapes, and read a histogram's quantiles.

Counters are summed over their label sets (one engine here). Time to first token comes from vLLM's
`vllm:time_to_first_token_seconds` histogram, measured in the server from arrival to the first token: the
client does not stream, so the benchmark reads TTFT from here, per phase (a phase's requests are the only ones
in flight, so its histogram difference is its requests' TTFT, router and expert requests together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

COUNTERS = (
    "vllm:mm_cache_hits_total",
    "vllm:mm_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:num_preemptions_total",
    "vllm:request_success_total",
)
TTFT = "vllm:time_to_first_token_seconds"


@dataclass
class ServerSnapshot:
    """The counters of COUNTERS and the TTFT histogram's cumulative buckets (upper bound -> count)."""

    counters: dict[str, float] = field(default_factory=dict)
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    ttft_sum: float = 0.0
    ttft_count: float = 0.0

    def minus(self, before: ServerSnapshot) -> ServerSnapshot:
        """What happened between `before` and this snapshot."""
        return ServerSnapshot(
            counters={k: v - before.counters.get(k, 0.0) for k, v in self.counters.items()},
            ttft_buckets={le: n - before.ttft_buckets.get(le, 0.0) for le, n in self.ttft_buckets.items()},
            ttft_sum=self.ttft_sum - before.ttft_sum, ttft_count=self.ttft_count - before.ttft_count)

    def ratio(self, hits: str, queries: str) -> float | None:
        """counters[hits] / counters[queries], None without queries."""
        q = self.counters.get(queries, 0.0)
        return self.counters.get(hits, 0.0) / q if q else None

    def ttft_quantile(self, q: float) -> float | None:
        """Quantile q (0-1) of TTFT, interpolated linearly inside its bucket (Prometheus' histogram_quantile)."""
        if self.ttft_count <= 0:
            return None
        rank = q * self.ttft_count
        lower_bound, lower_count = 0.0, 0.0
        for le in sorted(self.ttft_buckets):
            count = self.ttft_buckets[le]
            if count >= rank:
                if math.isinf(le):
                    return lower_bound
                width = count - lower_count
                return lower_bound + (le - lower_bound) * ((rank - lower_count) / width if width else 1.0)
            lower_bound, lower_count = le, count
        return lower_bound


def parse_metrics(text: str) -> ServerSnapshot:
    """A snapshot from Prometheus exposition text (parsed by prometheus_client)."""
    snap = ServerSnapshot(counters=dict.fromkeys(COUNTERS, 0.0))
    # Samples by their own names: a counter's sample is NAME_total and a histogram's NAME_bucket / _sum / _count,
    # whether or not the text declares the family's type.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in snap.counters:
                snap.counters[sample.name] += sample.value
            elif sample.name == TTFT + "_bucket":
                le = float(sample.labels["le"])
                snap.ttft_buckets[le] = snap.ttft_buckets.get(le, 0.0) + sample.value
            elif sample.name == TTFT + "_sum":
                snap.ttft_sum += sample.value
            elif sample.name == TTFT + "_count":
                snap.ttft_count += sample.value
    return snap


async def scrape(session: aiohttp.ClientSession, root_url: str) -> ServerSnapshot:
    """GET {root_url}/metrics and parse it."""
    async with session.get(root_url.rstrip("/") + "/metrics") as response:
        response.raise_for_status()
        return parse_metrics(await response.text())
