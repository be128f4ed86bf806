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
# Per-request timings whose means split a request's time: vLLM's, from arrival in its engine to the answer (queued,
# prefill: scheduled to first token, decode: first to last token, e2e: all of it), and the gateway's stages
# (image preparation, the router request, the expert request, total), labelled
# "lora_router_gateway_stage_seconds[stage]".
TIMINGS = (
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
)
GATEWAY_STAGE = "lora_router_gateway_stage_seconds"


@dataclass
class ServerSnapshot:
    """The counters of COUNTERS, the TTFT histogram's cumulative buckets (upper bound -> count), and the (sum,
    count) of each timing histogram (TIMINGS, the gateway's stages)."""

    counters: dict[str, float] = field(default_factory=dict)
    ttft_buckets: dict[float, float] = field(default_factory=dict)
    ttft_sum: float = 0.0
    ttft_count: float = 0.0
    histograms: dict[str, tuple[float, float]] = field(default_factory=dict)

    def minus(self, before: ServerSnapshot) -> ServerSnapshot:
        """What happened between `before` and this snapshot."""
        return ServerSnapshot(
            counters={k: v - before.counters.get(k, 0.0) for k, v in self.counters.items()},
            ttft_buckets={le: n - before.ttft_buckets.get(le, 0.0) for le, n in self.ttft_buckets.items()},
            ttft_sum=self.ttft_sum - before.ttft_sum, ttft_count=self.ttft_count - before.ttft_count,
            histograms={k: _minus(v, before.histograms.get(k, (0.0, 0.0))) for k, v in self.histograms.items()})

    def means(self) -> dict[str, float]:
        """Mean seconds per observation of each timing histogram that observed anything."""
        return {k: total / n for k, (total, n) in self.histograms.items() if n > 0}

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


def _minus(after: tuple[float, float], before: tuple[float, float]) -> tuple[float, float]:
    return after[0] - before[0], after[1] - before[1]


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
            elif sample.name.endswith(("_sum", "_count")):
                name, _, part = sample.name.rpartition("_")
                if name in TIMINGS or name == GATEWAY_STAGE:
                    key = f"{name}[{sample.labels['stage']}]" if name == GATEWAY_STAGE else name
                    total, n = snap.histograms.get(key, (0.0, 0.0))
                    snap.histograms[key] = (total + sample.value, n) if part == "sum" else (total, n + sample.value)
    return snap


async def scrape(session: aiohttp.ClientSession, root_url: str) -> ServerSnapshot:
    """GET {root_url}/metrics and parse it."""
    async with session.get(root_url.rstrip("/") + "/metrics") as response:
        response.raise_for_status()
        return parse_metrics(await response.text())
