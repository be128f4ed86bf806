"""The request paths a phase exercises, each one screenshot in, one RequestRecord out: through RouterClient
straight to vLLM, or one request to the routing gateway.

    two-stage     route(router image) then run_expert(routed expert, image)   -- what process() does
    router-only   route(router image)
    expert-only   run_expert(the screenshot's true expert, image)            -- oracle routing
    adapters-mixed run_expert(experts in turn, image)                        -- every LoRA in every batch
    base-only     run_expert(base model, image)                              -- no LoRA at all
                  (both write exactly max_tokens, vLLM's ignore_eos: LoRA costs per token, so the pair compares
                  the same work, whichever model would have stopped first)
    gateway       POST model "auto" to the gateway (image, the task prompt, max_tokens as two-stage sends them):
                  the gateway routes and runs the expert; its x-route-* headers say where and how long

The two-stage path calls route() and run_expert() itself rather than process(): process() makes exactly these
two calls on one PreparedImage, but takes no per-request max_tokens and no separate router image.

A route whose answer is no expert (a random stand-in router in one-token mode, or one below min_confidence) is
recorded with its fallback reason, and its expert stage runs the true expert, as a trained router would send it.
Through the gateway it is whatever the deployment's fallback does (under fallback 'error', a 422: an error here).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import aiohttp

from benchmarks.pool import BenchItem
from lora_router.openai_wire import ResponseFormatError, chat_request, error_message, read_completion, user_turn
from router_client import RouterClient, RouterClientError

EXPERT_TARGETS = ("routed", "oracle", "round-robin", "base")


@dataclass(frozen=True)
class Workload:
    """What one request of a phase does: optionally route (in `route_mode`), then optionally run an expert."""

    name: str
    route_mode: str | None  # 'choice' / 'one-token'; None: no routing request
    expert: str | None  # one of EXPERT_TARGETS; None: no expert request
    via_gateway: bool = False  # one request to the gateway, which routes and runs the routed expert itself
    exact_tokens: bool = False  # the expert writes exactly max_tokens (vLLM's ignore_eos), never stopping early

    def __post_init__(self) -> None:
        if self.via_gateway and (self.route_mode is None or self.expert != "routed"):
            raise ValueError(f"workload {self.name!r}: through the gateway it routes and runs the routed expert")
        if self.route_mode is None and self.expert in (None, "routed"):
            raise ValueError(f"workload {self.name!r}: without a routing request it needs a fixed expert target")
        if self.exact_tokens and (self.expert is None or self.via_gateway):
            raise ValueError(f"workload {self.name!r}: exact_tokens applies to an expert request of the client")
        if self.expert is not None and self.expert not in EXPERT_TARGETS:
            raise ValueError(f"workload {self.name!r}: expert must be one of {EXPERT_TARGETS}, got {self.expert!r}")


def two_stage(mode: str) -> Workload:
    """Route in `mode`, then run the routed expert."""
    return Workload(f"two-stage[{mode}]", route_mode=mode, expert="routed")


def router_only(mode: str) -> Workload:
    """Route in `mode` only."""
    return Workload(f"router-only[{mode}]", route_mode=mode, expert=None)


def gateway(mode: str) -> Workload:
    """One `model: auto` request to the gateway, which routes in `mode` (the deployment's) and runs the expert."""
    return Workload(f"gateway[{mode}]", route_mode=mode, expert="routed", via_gateway=True)


EXPERT_ONLY = Workload("expert-only", route_mode=None, expert="oracle")
ADAPTERS_MIXED = Workload("adapters-mixed", route_mode=None, expert="round-robin", exact_tokens=True)
BASE_ONLY = Workload("base-only", route_mode=None, expert="base", exact_tokens=True)


@dataclass
class RequestRecord:
    """One screenshot's outcome: timings in seconds, tokens, the routing decision, success or the error."""

    phase: str
    index: int  # the item's index in the run
    kind: str  # ground-truth class
    start_s: float  # when it was sent, seconds after the phase began
    e2e_s: float | None  # both stages, as the caller waits for them (None on error)
    route_s: float | None  # routing request (None: none made, or it failed); gateway: its x-route-ms header
    expert_s: float | None  # expert request (None: none made, or it failed, or the gateway made it)
    routed: str | None  # expert the router chose (None: no route, or an answer that is no expert)
    route_mode: str | None  # the mode the route used (gateway: its x-route-mode header)
    fallback_reason: str | None  # why the router's answer was not used
    expert: str | None  # model that ran the task (gateway: its x-route-expert header)
    route_prompt_tokens: int | None  # None: no route, or the gateway made it (its usage is the expert's)
    route_completion_tokens: int | None
    expert_prompt_tokens: int
    expert_completion_tokens: int
    max_tokens: int  # the expert's max_tokens
    image_tokens: int
    router_image_tokens: int
    ok: bool
    error: str | None


class GatewayRequestError(Exception):
    """A gateway request that failed: its HTTP status and message, a broken connection, or an unreadable answer."""


@dataclass(frozen=True)
class GatewayTarget:
    """Where gateway workloads go: the gateway's API root (…/v1) on a session that carries its key."""

    session: aiohttp.ClientSession
    base_url: str
    model: str  # the gateway's routing model name ("auto")
    api_key: str | None  # what the session sends, for other tools (vllm bench serve)


async def run_request(client: RouterClient, workload: Workload, item: BenchItem, phase: str, phase_start: float,
                      gateway: GatewayTarget | None = None) -> RequestRecord:
    """Send one screenshot along `workload`; never raises for a failed request (it is recorded as such)."""
    start = time.perf_counter()
    record = RequestRecord(phase=phase, index=item.index, kind=item.kind, start_s=start - phase_start, e2e_s=None,
                           route_s=None, expert_s=None, routed=None, route_mode=None, fallback_reason=None,
                           expert=None, route_prompt_tokens=None, route_completion_tokens=None,
                           expert_prompt_tokens=0, expert_completion_tokens=0, max_tokens=item.max_tokens,
                           image_tokens=item.image_tokens, router_image_tokens=item.router_image_tokens, ok=False,
                           error=None)
    try:
        if workload.via_gateway:
            if gateway is None:
                raise GatewayRequestError("the run has no gateway")
            await _via_gateway(gateway, item, record)
        else:
            await _via_client(client, workload, item, record)
        record.ok = True
        record.e2e_s = time.perf_counter() - start
    except (RouterClientError, GatewayRequestError, TimeoutError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:500]
    return record


async def _via_client(client: RouterClient, workload: Workload, item: BenchItem, record: RequestRecord) -> None:
    if workload.route_mode is not None:
        decision = await client.route(item.router_image, mode=workload.route_mode)
        record.route_s = decision.latency_s
        record.route_mode = decision.mode
        record.route_prompt_tokens = decision.prompt_tokens
        record.route_completion_tokens = decision.completion_tokens
        record.fallback_reason = decision.fallback_reason
        record.routed = decision.expert if decision.fallback_reason is None else None
    if workload.expert is not None:
        record.expert = _target(client, workload.expert, item, record.routed)
        result = await client.run_expert(record.expert, item.image, item.prompt, max_tokens=item.max_tokens,
                                         extra_body={"ignore_eos": True} if workload.exact_tokens else None)
        record.expert_s = result.latency_s
        record.expert_prompt_tokens = result.prompt_tokens
        record.expert_completion_tokens = result.completion_tokens


async def _via_gateway(gateway: GatewayTarget, item: BenchItem, record: RequestRecord) -> None:
    """The two-stage request as one `model: auto` call: the body run_expert sends, with the gateway's model name."""
    body = chat_request(gateway.model, [user_turn(item.image.data_url, item.prompt)], item.max_tokens)
    try:
        async with gateway.session.post(gateway.base_url + "/chat/completions", json=body) as response:
            data = await response.read()
            status, headers = response.status, response.headers
    except aiohttp.ClientError as exc:
        raise GatewayRequestError(f"{type(exc).__name__}: {exc}") from None
    if status != 200:
        raise GatewayRequestError(f"{status}: {error_message(data.decode('utf-8', 'replace'))}")
    try:
        completion = read_completion(json.loads(data))
        record.route_s = float(headers["x-route-ms"]) / 1000
        record.expert = headers["x-route-expert"]
    except (ValueError, KeyError, ResponseFormatError) as exc:
        raise GatewayRequestError(f"unreadable answer ({type(exc).__name__}: {exc})") from None
    record.route_mode = headers.get("x-route-mode")
    record.fallback_reason = headers.get("x-route-fallback")
    record.routed = None if record.fallback_reason else record.expert
    record.expert_prompt_tokens = completion.prompt_tokens
    record.expert_completion_tokens = completion.completion_tokens


def _target(client: RouterClient, expert: str, item: BenchItem, routed: str | None) -> str:
    if expert == "routed":
        return routed or item.kind
    if expert == "oracle":
        return item.kind
    if expert == "base":
        return client.config.base_name
    labels = client.config.labels
    return labels[item.index % len(labels)]
