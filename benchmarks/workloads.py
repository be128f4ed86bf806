"""The request paths a phase exercises, each one screenshot in, one RequestRecord out, through RouterClient.

    two-stage     route(router image) then run_expert(routed expert, image)   -- what process() does
    router-only   route(router image)
    expert-only   run_expert(the screenshot's true expert, image)            -- oracle routing
    adapters-mixed run_expert(experts in turn, image)                        -- every LoRA in every batch
    base-only     run_expert(base model, image)                              -- no LoRA at all

The two-stage path calls route() and run_expert() itself rather than process(): process() makes exactly these
two calls on one PreparedImage, but takes no per-request max_tokens and no separate router image.

A route whose answer is no expert (a random stand-in router in one-token mode, or one below min_confidence) is
recorded with its fallback reason, and its expert stage runs the true expert, as a trained router would send it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from benchmarks.pool import BenchItem
from router_client import RouteDecision, RouterClient, RouterClientError

EXPERT_TARGETS = ("routed", "oracle", "round-robin", "base")


@dataclass(frozen=True)
class Workload:
    """What one request of a phase does: optionally route (in `route_mode`), then optionally run an expert."""

    name: str
    route_mode: str | None  # 'choice' / 'one-token'; None: no routing request
    expert: str | None  # one of EXPERT_TARGETS; None: no expert request

    def __post_init__(self) -> None:
        if self.route_mode is None and self.expert in (None, "routed"):
            raise ValueError(f"workload {self.name!r}: without a routing request it needs a fixed expert target")
        if self.expert is not None and self.expert not in EXPERT_TARGETS:
            raise ValueError(f"workload {self.name!r}: expert must be one of {EXPERT_TARGETS}, got {self.expert!r}")


def two_stage(mode: str) -> Workload:
    """Route in `mode`, then run the routed expert."""
    return Workload(f"two-stage[{mode}]", route_mode=mode, expert="routed")


def router_only(mode: str) -> Workload:
    """Route in `mode` only."""
    return Workload(f"router-only[{mode}]", route_mode=mode, expert=None)


EXPERT_ONLY = Workload("expert-only", route_mode=None, expert="oracle")
ADAPTERS_MIXED = Workload("adapters-mixed", route_mode=None, expert="round-robin")
BASE_ONLY = Workload("base-only", route_mode=None, expert="base")


@dataclass
class RequestRecord:
    """One screenshot's outcome: timings in seconds, tokens, the routing decision, success or the error."""

    phase: str
    index: int  # the item's index in the run
    kind: str  # ground-truth class
    start_s: float  # when it was sent, seconds after the phase began
    e2e_s: float | None  # both stages, as the caller waits for them (None on error)
    route_s: float | None  # routing request (None: none made, or it failed)
    expert_s: float | None  # expert request (None: none made, or it failed)
    routed: str | None  # expert the router chose (None: no route, or an answer that is no expert)
    fallback_reason: str | None  # why the router's answer was not used
    expert: str | None  # model that ran the task
    route_prompt_tokens: int
    route_completion_tokens: int
    expert_prompt_tokens: int
    expert_completion_tokens: int
    max_tokens: int  # the expert's max_tokens
    image_tokens: int
    router_image_tokens: int
    ok: bool
    error: str | None


async def run_request(client: RouterClient, workload: Workload, item: BenchItem, phase: str,
                      phase_start: float) -> RequestRecord:
    """Send one screenshot along `workload`; never raises for a failed request (it is recorded as such)."""
    start = time.perf_counter()
    decision: RouteDecision | None = None
    record = RequestRecord(phase=phase, index=item.index, kind=item.kind, start_s=start - phase_start, e2e_s=None,
                           route_s=None, expert_s=None, routed=None, fallback_reason=None, expert=None,
                           route_prompt_tokens=0, route_completion_tokens=0, expert_prompt_tokens=0,
                           expert_completion_tokens=0, max_tokens=item.max_tokens, image_tokens=item.image_tokens,
                           router_image_tokens=item.router_image_tokens, ok=False, error=None)
    try:
        if workload.route_mode is not None:
            decision = await client.route(item.router_image, mode=workload.route_mode)
            record.route_s = decision.latency_s
            record.route_prompt_tokens = decision.prompt_tokens
            record.route_completion_tokens = decision.completion_tokens
            record.fallback_reason = decision.fallback_reason
            record.routed = decision.expert if decision.fallback_reason is None else None
        if workload.expert is not None:
            record.expert = _target(client, workload.expert, item, record.routed)
            result = await client.run_expert(record.expert, item.image, item.prompt, max_tokens=item.max_tokens)
            record.expert_s = result.latency_s
            record.expert_prompt_tokens = result.prompt_tokens
            record.expert_completion_tokens = result.completion_tokens
        record.ok = True
        record.e2e_s = time.perf_counter() - start
    except (RouterClientError, TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:500]
    return record


def _target(client: RouterClient, expert: str, item: BenchItem, routed: str | None) -> str:
    if expert == "routed":
        return routed or item.kind
    if expert == "oracle":
        return item.kind
    if expert == "base":
        return client.config.base_name
    labels = client.config.labels
    return labels[item.index % len(labels)]
