"""A phase's numbers, computed from its request records and its /metrics difference (vLLM's benchmarks style).

Throughput is completed screenshots over the phase's wall time (first request sent to last answer in); latency
percentiles are lora_router.percentiles' (numpy's linear interpolation) over the successful requests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from benchmarks.server_metrics import ServerSnapshot
from benchmarks.workloads import RequestRecord
from lora_router.percentiles import Percentiles, percentiles


def server_ttft(server: ServerSnapshot) -> Percentiles:
    """TTFT from a /metrics difference: the exact mean; p50 / p90 / p99 interpolated inside the buckets."""
    count = int(server.ttft_count)
    if count <= 0:
        return Percentiles(None, None, None, None, 0)
    return Percentiles(server.ttft_quantile(0.5), server.ttft_quantile(0.9), server.ttft_quantile(0.99),
                       server.ttft_sum / count, count)


@dataclass
class PhaseMetrics:
    """What one phase measured."""

    name: str
    workload: str
    concurrency: int | None  # closed loop: requests in flight; None for open loop
    arrival_rate: float | None  # open loop: Poisson arrivals per second; None for closed loop
    kind: str | None  # every screenshot of this class; None: the class mix
    reduced_router: bool  # router requests carried reduced-resolution images
    screenshots: int
    completed: int
    failed: int
    errors: dict[str, int]
    retries: int  # HTTP attempts the client repeated (connection errors, timeouts, 429, 5xx)
    duration_s: float
    screenshots_per_s: float
    http_requests_per_s: float
    output_tokens_per_s: float
    route_s: Percentiles
    expert_s: Percentiles
    e2e_s: Percentiles
    chain_gap_s: Percentiles  # two-stage: end to end minus both requests (client time between the stages)
    ttft_s: Percentiles  # vLLM's server-side histogram, every request of the phase
    server_means_s: dict[str, float]  # mean seconds per request of vLLM's timing histograms (and gateway stages)
    mean_route_prompt_tokens: float | None
    mean_expert_prompt_tokens: float | None
    mean_expert_completion_tokens: float | None
    route_completion_tokens_max: int | None
    mean_image_tokens: float
    mean_router_image_tokens: float
    routes: int
    unroutable: int  # routes whose answer was no expert (or below min_confidence)
    routing_accuracy: float | None  # routed expert == true class, over all routes
    server: dict[str, float]  # /metrics counter differences over the phase
    mm_cache_hit_rate: float | None
    prefix_cache_hit_rate: float | None
    load_before: float  # 1-minute load average of the machine running the benchmark
    load_after: float
    client_cpu_s: float  # CPU seconds the benchmark's own process used during the phase (it shares the machine)
    # CPU seconds of the server's processes (vLLM's and the gateway's) during the phase; None for a server started
    # elsewhere. With client_cpu_s, the phase's cost on the machine, whatever else ran on it meanwhile.
    server_cpu_s: float | None
    interleaved_with: str | None  # ran in turns with this phase: server /metrics, load and retries are the pair's


def summarise(name: str, workload: str, records: Sequence[RequestRecord], duration_s: float, server: ServerSnapshot,
              load: tuple[float, float], retries: int, client_cpu_s: float, concurrency: int | None = None,
              arrival_rate: float | None = None, kind: str | None = None, reduced_router: bool = False,
              interleaved_with: str | None = None, server_cpu_s: float | None = None) -> PhaseMetrics:
    """PhaseMetrics of one phase (for an interleaved one, `server` and the rest are the pair's)."""
    ok = [r for r in records if r.ok]
    routed = [r for r in records if r.route_s is not None]
    experts = [r for r in ok if r.expert_s is not None]
    http = len(routed) + sum(r.expert_s is not None for r in records)
    out_tokens = sum((r.route_completion_tokens or 0) + r.expert_completion_tokens for r in ok)
    errors = Counter((r.error or "").split(":", 1)[0] for r in records if not r.ok)

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return PhaseMetrics(
        name=name, workload=workload, concurrency=concurrency, arrival_rate=arrival_rate, kind=kind,
        reduced_router=reduced_router,
        screenshots=len(records), completed=len(ok), failed=len(records) - len(ok), errors=dict(errors),
        retries=retries, duration_s=duration_s,
        screenshots_per_s=len(ok) / duration_s if duration_s > 0 else 0.0,
        http_requests_per_s=http / duration_s if duration_s > 0 else 0.0,
        output_tokens_per_s=out_tokens / duration_s if duration_s > 0 else 0.0,
        route_s=percentiles([r.route_s for r in ok if r.route_s is not None]),
        expert_s=percentiles([r.expert_s for r in experts]),
        e2e_s=percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        chain_gap_s=percentiles([r.e2e_s - r.route_s - r.expert_s for r in ok
                                 if r.e2e_s is not None and r.route_s is not None and r.expert_s is not None]),
        ttft_s=server_ttft(server),
        server_means_s=server.means(),
        mean_route_prompt_tokens=mean([r.route_prompt_tokens for r in routed if r.route_prompt_tokens is not None]),
        mean_expert_prompt_tokens=mean([r.expert_prompt_tokens for r in experts]),
        mean_expert_completion_tokens=mean([r.expert_completion_tokens for r in experts]),
        route_completion_tokens_max=max((r.route_completion_tokens for r in routed
                                         if r.route_completion_tokens is not None), default=None),
        mean_image_tokens=float(np.mean([r.image_tokens for r in records])) if records else 0.0,
        mean_router_image_tokens=float(np.mean([r.router_image_tokens for r in records])) if records else 0.0,
        routes=len(routed), unroutable=sum(r.fallback_reason is not None for r in routed),
        routing_accuracy=mean([float(r.routed == r.kind) for r in routed]),
        server=dict(server.counters),
        mm_cache_hit_rate=server.ratio("vllm:mm_cache_hits_total", "vllm:mm_cache_queries_total"),
        prefix_cache_hit_rate=server.ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"),
        load_before=load[0], load_after=load[1], client_cpu_s=client_cpu_s, server_cpu_s=server_cpu_s,
        interleaved_with=interleaved_with,
    )
