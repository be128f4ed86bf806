"""Shadow routing: while a candidate router version is loaded, a fraction of `auto` requests is also routed by it,
in the background, and its routes are compared with the live router's. The caller's answer never waits for it,
and its failures only count in the statistics. With capture on, both routers also route the labelled held-out
captures once, one at a time, so the report says which of them is right more often, not only how they differ.
The arithmetic (sampling, comparison, scores) is serving.shadow's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from lora_router.openai_wire import read_completion
from lora_router.routing import RouteDecision, RouteRefused, RoutingPolicy
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.upstream import Upstream
from serving.shadow import REFUSED, LabelledScore, ShadowSampler, ShadowStats

log = logging.getLogger(__name__)


class ShadowRouter:
    """Shadows `fraction` of the auto requests to one candidate at a time, at most `max_in_flight` at once."""

    def __init__(self, upstream: Upstream, metrics: GatewayMetrics, fraction: float, max_in_flight: int) -> None:
        self.upstream = upstream
        self.metrics = metrics
        self.fraction = fraction
        self.max_in_flight = max_in_flight
        self.stats: ShadowStats | None = None  # the candidate's, or the last candidate's once it ended
        self._policy: RoutingPolicy | None = None
        self._sampler = ShadowSampler(fraction)
        self._tasks: set[asyncio.Task] = set()
        # The labelled held-out captures as (image data URL, label); set by the gateway while capture is on.
        self.labelled: Callable[[], list[tuple[str, str]]] | None = None

    @property
    def active(self) -> bool:
        return self._policy is not None

    def start(self, candidate: str, policy: RoutingPolicy, live: RoutingPolicy, fraction: float | None = None) -> None:
        """Shadow `fraction` (default: the configured one) to the candidate router served as `candidate`, with fresh
        statistics; score it and the `live` router on the labelled captures, in the background."""
        self.fraction = self.fraction if fraction is None else fraction
        self.stats = ShadowStats(candidate=candidate)
        self._sampler = ShadowSampler(self.fraction)
        self._policy = policy
        if self.labelled is not None:
            self._spawn(self._score_labelled(live, policy, self.stats))

    def end(self) -> None:
        """Stop shadowing; requests already sent finish and count (a promoted candidate stays loaded)."""
        self._policy = None

    async def cancel(self) -> None:
        """Stop shadowing and cancel what is in flight (the candidate is about to be unloaded)."""
        self.end()
        tasks = list(self._tasks)
        for task in tasks:  # shadow requests only: no caller waits for them
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def submit(self, image_url: str, live: RouteDecision, rank: int | None, request_id: str,
               on_disagreement: Callable[[], None] | None = None) -> None:
        """Also route this image with the candidate, in the background, if it is among the shadowed fraction;
        `request_id` names the shadow request in vLLM; `on_disagreement` is called if the candidate routes it
        otherwise."""
        policy, stats = self._policy, self.stats
        if policy is None or stats is None or not self._sampler.take():
            return
        if len(self._tasks) >= self.max_in_flight:
            stats.skipped += 1  # vLLM is busy enough; the comparison can do with fewer samples
            return
        self._spawn(self._one(policy, stats, image_url, live.expert, rank, request_id, on_disagreement))

    def report(self) -> dict:
        """The comparison so far (serving.shadow.ShadowStats.report), and whether shadowing goes on."""
        report = self.stats.report() if self.stats else {"candidate": None, "compared": 0}
        return {**report, "shadowing": self.active, "fraction": self.fraction}

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _route(self, policy: RoutingPolicy, image_url: str, rank: int | None = None,
                     request_id: str | None = None) -> RouteDecision | RouteRefused:
        start = time.perf_counter()
        answer = json.loads(await self.upstream.read("POST", "/v1/chat/completions", policy.request(image_url),
                                                     rank, request_id))
        return policy.decide(read_completion(answer), latency_s=time.perf_counter() - start)

    async def _one(self, policy: RoutingPolicy, stats: ShadowStats, image_url: str, live_route: str,
                   rank: int | None, request_id: str, on_disagreement: Callable[[], None] | None) -> None:
        candidate = stats.candidate
        try:
            outcome = await self._route(policy, image_url, rank, request_id)
        except Exception as exc:  # a shadow failure must never reach anything but the statistics
            stats.failed += 1
            self.metrics.shadow_failures.labels(candidate).inc()
            log.warning("shadow request to %s failed: %s", candidate, exc)
            return
        route = _named(outcome)
        stats.record(live_route, route, outcome.confidence)
        self.metrics.shadow_compared.labels(candidate).inc()
        if route == live_route:
            self.metrics.shadow_agreed.labels(candidate).inc()
        self.metrics.shadow_routes.labels(candidate, live_route, route).inc()
        if route != live_route and on_disagreement is not None:
            on_disagreement()
        self.metrics.shadow_confidence.labels(candidate).observe(outcome.confidence)

    async def _score_labelled(self, live: RoutingPolicy, candidate: RoutingPolicy, stats: ShadowStats) -> None:
        captures = await asyncio.to_thread(self.labelled)
        stats.labelled = score = LabelledScore(count=len(captures))
        for image_url, label in captures:  # one at a time: live traffic comes first
            try:
                routes = [_named(await self._route(policy, image_url)) for policy in (live, candidate)]
            except Exception as exc:  # as a shadow request's: counted, never raised
                score.failed += 1
                log.warning("scoring %s on a labelled capture failed: %s", stats.candidate, exc)
                continue
            score.record(label, *routes)
        log.info("labelled captures routed right: live %s, candidate %s %s (%d of %d scored)",
                 score.live_correct, stats.candidate, score.candidate_correct, score.scored, score.count)


def _named(outcome: RouteDecision | RouteRefused) -> str:
    """A route as the statistics name it: the expert, or REFUSED."""
    return REFUSED if isinstance(outcome, RouteRefused) else outcome.expert
