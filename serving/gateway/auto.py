"""The `auto` path: prepare the one image, ask the live router, send the caller's own request to the chosen expert
with the identical image bytes, and answer with the expert's completion and a `routing` object
(lora_router.routing.RouteDecision.to_wire) plus `x-route-*` headers.

A request reads the live routing policy once, so a request that started routing on one router version finishes on
it; the two stages go to one data-parallel engine, the least loaded (serving.gateway.engines), so the image is
encoded once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import aiohttp
from aiohttp import web

from lora_router.deployment import DeploymentConfig
from lora_router.images import InvalidImageError, PreparedImage, TooManyPixelsError, prepare_image
from lora_router.openai_wire import ResponseFormatError, read_completion
from lora_router.routing import RouteDecision, RouteRefused
from serving.drift import DriftWindow
from serving.gateway.capture import Capturer
from serving.gateway.engines import EnginePicker
from serving.gateway.lifecycle import AdapterLifecycle
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.protocol import (
    AutoRequest,
    GatewayError,
    RequestRecord,
    check_remote_url,
    decode_data_url,
    expert_body,
    parse_auto_request,
    png_as_sent,
    routing_headers,
)
from serving.gateway.upstream import Upstream, upstream_error

# Seconds an image URL may take to fetch.
_FETCH_TIMEOUT_S = 30


class AutoRoute:
    """Answers `model: auto` chat requests for one gateway."""

    def __init__(self, config: DeploymentConfig, upstream: Upstream, lifecycle: AdapterLifecycle,
                 metrics: GatewayMetrics, engines: EnginePicker, capture: Capturer, drift: DriftWindow) -> None:
        self.config = config
        self.settings = config.gateway
        self.upstream = upstream
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.engines = engines
        self.capture = capture
        self.drift = drift

    async def answer(self, request: web.Request, body: dict[str, Any], record: RequestRecord) -> web.StreamResponse:
        """The expert's answer to an auto request; `record` gets the route (expert, router version, route time) for
        the access log and the metrics, and names both stages in vLLM (`<request id>-router`, `-expert`)."""
        with self.engines.pinned() as rank:
            return await self._answer(request, body, rank, record)

    async def _answer(self, request: web.Request, body: dict[str, Any], rank: int | None,
                      record: RequestRecord) -> web.StreamResponse:
        start = time.perf_counter()
        auto = parse_auto_request(body)
        image = await self._prepare(auto)
        image_s = time.perf_counter() - start
        decision = await self._route(image, rank, record)
        expert = decision.expert
        headers = routing_headers(decision)
        self.capture.observe(record.request_id, image, decision, flagged=request.headers.get("x-capture") == "1")
        self.lifecycle.shadow.submit(image.data_url, decision, rank, f"{record.request_id}-shadow",
                                     on_disagreement=lambda: self.capture.disagreement(record.request_id))
        prompt = self.lifecycle.prompts.get(expert) or self.lifecycle.policy.base_prompt
        expert_start = time.perf_counter()
        expert_id = f"{record.request_id}-expert"
        with self.lifecycle.names.hold(expert) as served:
            sent = expert_body(auto, served, image.data_url, prompt)
            if auto.stream:
                response = await self._stream(request, sent, headers, rank, expert_id)
            else:
                answer = await self.upstream.json("POST", "/v1/chat/completions", sent, rank, expert_id)
                answer["model"] = expert
                answer["routing"] = decision.to_wire()
                response = web.json_response(answer, headers=headers)
        for stage, seconds in (("image", image_s), ("route", decision.latency_s),
                               ("expert", time.perf_counter() - expert_start),
                               ("total", time.perf_counter() - start)):
            self.metrics.latency.labels(stage).observe(seconds)
        return response

    async def _prepare(self, auto: AutoRequest) -> PreparedImage:
        url = auto.image.url
        encoded = None
        if url.startswith("data:"):
            data = decode_data_url(url)
            encoded = url.partition(",")[2]  # the checked base64 of `data`: encoding it again took 0.5-0.8 ms
        else:
            data = await self._fetch_image(check_remote_url(url, self.settings.image_url_hosts))
        # A PNG that preparing would leave as it is goes on as it came: decoding and re-encoding it (~6 ms of CPU,
        # 33 ms of latency on average on 2 busy cores) bought nothing, vLLM gets the same pixels either way.
        kept = png_as_sent(data, max_pixels=self.config.engine.max_pixels,
                           max_image_pixels=self.settings.max_image_pixels, encoded=encoded)
        if kept is not None:
            return kept
        try:
            # Decoding and PNG encoding take CPU time; off the event loop, other requests keep flowing.
            return await asyncio.to_thread(prepare_image, data, max_pixels=self.config.engine.max_pixels,
                                           max_image_pixels=self.settings.max_image_pixels)
        except TooManyPixelsError as exc:
            raise GatewayError(400, f"image has too many pixels ({exc.width}x{exc.height} = "
                                    f"{exc.width * exc.height:,}), over gateway.max_image_pixels ({exc.limit:,}); "
                                    "send a smaller screenshot", param="messages", code="image_too_large") from None
        except InvalidImageError as exc:
            raise GatewayError(400, f"image: {exc}", param="messages", code="invalid_image") from None

    async def _fetch_image(self, url: str) -> bytes:
        limit = int(self.settings.max_body_mb * 1024 * 1024)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_S)) as session:
                async with session.get(url) as r:
                    if r.status != 200:
                        raise GatewayError(400, f"image URL answered {r.status}", param="messages",
                                           code="invalid_image")
                    data = await r.content.read(limit + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GatewayError(400, f"image URL could not be fetched: {exc}", param="messages",
                               code="invalid_image") from None
        if len(data) > limit:
            raise GatewayError(413, f"image at URL is over {self.settings.max_body_mb:g} MB", code="body_too_large")
        return data

    async def _route(self, image: PreparedImage, rank: int | None, record: RequestRecord) -> RouteDecision:
        policy = self.lifecycle.policy  # a request that started routing on one policy finishes on it
        record.router = policy.router_name
        start = time.perf_counter()
        with self.lifecycle.names.hold(policy.router_name):
            answer = await self.upstream.json("POST", "/v1/chat/completions", policy.request(image.data_url), rank,
                                              f"{record.request_id}-router")
        record.route_s = time.perf_counter() - start
        try:
            outcome = policy.decide(read_completion(answer), latency_s=record.route_s)
        except ResponseFormatError as exc:
            raise GatewayError(502, f"the router's answer is unusable: {exc}", type="server_error",
                               code="upstream_failed") from None
        self.metrics.confidence.observe(outcome.confidence)
        self.drift.route(policy.router_name, outcome.probabilities if isinstance(outcome, RouteDecision) else
                         ({outcome.answer: outcome.confidence} if outcome.answer in policy.labels else {}),
                         outcome.confidence)
        reason = outcome.reason if isinstance(outcome, RouteRefused) else outcome.fallback_reason
        if reason:
            self.metrics.fallbacks.labels(reason).inc()
        if isinstance(outcome, RouteRefused):
            raise GatewayError(422, f"route refused: {outcome.message} (fallback is 'error')", type="routing_error",
                               code=outcome.reason, headers={"x-route-fallback": outcome.reason,
                                                             "x-route-confidence": f"{outcome.confidence:.4f}",
                                                             "x-route-router": policy.router_name})
        record.expert = outcome.expert
        return dataclasses.replace(outcome, router=policy.router_name)

    async def _stream(self, request: web.Request, body: dict[str, Any], headers: dict[str, str],
                      rank: int | None, request_id: str) -> web.StreamResponse:
        async with self.upstream.call("POST", "/v1/chat/completions", body, rank=rank,
                                      request_id=request_id) as upstream:
            if upstream.status != 200:
                raise upstream_error(upstream.status, await upstream.read(), "/v1/chat/completions")
            response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
