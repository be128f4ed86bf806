"""The routing gateway: one OpenAI-compatible endpoint in front of vLLM where `model: "auto"` routes.

    POST /v1/chat/completions  model "auto": prepare the one image, ask the router adapter, send the caller's
                               own request to the chosen expert with the identical image bytes; any other
                               model is forwarded to vLLM unchanged (streaming included)
    GET  /v1/models            "auto" plus everything vLLM serves
    GET  /health               200 only while vLLM is up and warmed, and the gateway is not draining
    GET  /metrics              the gateway's Prometheus metrics, then vLLM's
    /admin/...                 the admin API (serving.gateway.admin), when gateway.admin_api_key is set
    anything else              forwarded to vLLM (e.g. /tokenize), but never vLLM's own adapter loading

vLLM listens on loopback with an internal key; only the gateway reaches it. It serves each adapter under a
versioned name (name@version); callers use public names, which the gateway rewrites in what it forwards. Routes
live here, the wire contract in serving.gateway.protocol, the routing arithmetic in serving.routing, the adapters
and router versions served in serving.gateway.lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from serving.config import DeploymentConfig
from serving.gateway.admin import AdminRoutes
from serving.gateway.lifecycle import AdapterLifecycle
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.protocol import (
    AutoRequest,
    GatewayError,
    check_remote_url,
    decode_data_url,
    expert_body,
    is_lora_route,
    named_model,
    parse_auto_request,
    parse_json_object,
    png_as_sent,
    with_model,
)
from serving.images import InvalidImageError, PreparedImage, prepare_image
from serving.lifecycle import AdapterSet
from serving.openai_wire import ResponseFormatError, bearer_headers, error_message, read_completion
from serving.routing import RouteDecision, RouteRefused, RoutingPolicy

log = logging.getLogger(__name__)

# Response headers that describe one hop only; the gateway's own response sets its own.
_HOP_HEADERS = {"connection", "content-length", "transfer-encoding", "keep-alive", "server", "date",
                "content-encoding"}
# Seconds a caller is asked to wait while vLLM is down or the queue is full.
RETRY_AFTER_S = 5


class Gateway:
    """The gateway of one deployment; `ready` is set by the launcher once vLLM is up and warmed, `draining` once
    the service is stopping (it refuses new requests then, and /health says so, so that a balancer looks elsewhere).

    `adapters` is what vLLM serves at start, under versioned names; `config`, `base` and `config_adapters` as for
    AdapterLifecycle.
    """

    def __init__(self, config: DeploymentConfig, upstream_root: str, upstream_key: str, adapters: AdapterSet, *,
                 base: str | None, config_adapters: list[str]) -> None:
        self.config = config
        self.settings = config.gateway
        self.upstream_root = upstream_root
        self.upstream_key = upstream_key
        self.metrics = GatewayMetrics()
        self.lifecycle = AdapterLifecycle(config, upstream_root, upstream_key, adapters, self.metrics, base=base,
                                          config_adapters=config_adapters)
        self.names = self.lifecycle.names
        self.admin = AdminRoutes(self.settings, self.lifecycle, self._check_ready)
        self.ready = False
        self.draining = False
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(self.settings.max_in_flight)
        self._waiting = 0
        self._ranks = itertools.cycle(range(config.engine.data_parallel_size))
        self._prompts = self.lifecycle.prompts

    @property
    def policy(self) -> RoutingPolicy:
        """The live routing policy, read once per request (the admin API may swap it any time)."""
        return self.lifecycle.policy

    # -- lifecycle

    async def open(self) -> None:
        """Open the upstream session (idempotent)."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=self.settings.upstream_timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout, headers=bearer_headers(self.upstream_key),
                                                  connector=aiohttp.TCPConnector(limit=0))
        await self.lifecycle.open()

    async def close(self) -> None:
        await self.lifecycle.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def resolve_policy(self) -> None:
        """Ask vLLM's tokenizer for the labels' first tokens (one-token routing); after each (re)start."""
        await self.lifecycle.resolve()

    def app(self) -> web.Application:
        """The aiohttp application: routes, auth, OpenAI-shaped errors, a body size cap."""
        app = web.Application(client_max_size=int(self.settings.max_body_mb * 1024 * 1024),
                              middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        self.admin.add_to(app)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    # -- middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except GatewayError as exc:
            return _error_response(exc)
        except web.HTTPRequestEntityTooLarge as exc:
            return _error_response(GatewayError(413, f"request body over the gateway's limit of "
                                                     f"{self.settings.max_body_mb:g} MB ({exc.text})",
                                                code="body_too_large"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error_response(GatewayError(exc.status, exc.text or exc.reason))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.config.engine.api_key
        # The admin API checks its own key, which is not the service's.
        if key and request.path not in ("/health", "/metrics") and not request.path.startswith("/admin/"):
            if request.headers.get("Authorization", "") != f"Bearer {key}":
                raise GatewayError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   type="authentication_error", code="invalid_api_key")
        return await handler(request)

    # -- routes

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503, headers=_retry_after())
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503, headers=_retry_after())
        try:
            async with self._client().get(self.upstream_root + "/health",
                                          timeout=aiohttp.ClientTimeout(total=5)) as r:
                up = r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            up = False
        if not up:
            return web.json_response({"status": "vllm down"}, status=503, headers=_retry_after())
        return web.json_response({"status": "ok"})

    async def prometheus(self, request: web.Request) -> web.Response:
        text = self.metrics.text()
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, GatewayError):
            async with self._client().get(self.upstream_root + "/metrics",
                                          timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status == 200:
                    text += await r.read()
        return web.Response(body=text, content_type="text/plain", charset="utf-8")

    async def models(self, request: web.Request) -> web.Response:
        self._check_ready()
        listing = await self._upstream_json("GET", "/v1/models", None)
        created = int(time.time())
        listing["data"] = [{"id": self.settings.auto_model, "object": "model", "created": created,
                            "owned_by": "lora-router"}] + self.names.public_models(list(listing.get("data") or []))
        return web.json_response(listing)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = parse_json_object(raw)
        auto = body.get("model") == self.settings.auto_model
        async with self._admitted():
            self._check_ready()
            if not auto:
                model = str(body.get("model"))
                with self.names.hold(model) as served:
                    sent = raw if served == model else with_model(body, served)
                    return await self._relay(request, sent, outcome_model=model)
            return await self._auto(request, body)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        self._check_ready()
        if is_lora_route(request.path):
            raise GatewayError(404, f"{request.path} is not served: adapters are added through the admin API "
                                    "(/admin/adapters)", code="not_found")
        raw = await request.read()
        named = named_model(raw)
        if named is None:
            return await self._relay(request, raw)
        body, model = named
        with self.names.hold(model) as served:
            return await self._relay(request, raw if served == model else with_model(body, served))

    # -- the auto path

    async def _auto(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        start = time.perf_counter()
        outcome, expert = "error", ""
        try:
            auto = parse_auto_request(body)
            image = await self._prepare(auto)
            image_s = time.perf_counter() - start
            rank = next(self._ranks) if self.config.engine.data_parallel_size > 1 else None
            decision = await self._route(image, rank)
            expert = decision.expert
            route_s = decision.latency_s
            headers = _routing_headers(decision)
            self.lifecycle.shadow(image.data_url, decision, rank)
            prompt = self._prompts.get(expert) or self.policy.base_prompt
            expert_start = time.perf_counter()
            with self.names.hold(expert) as served:
                sent = expert_body(auto, served, image.data_url, prompt)
                if auto.stream:
                    response = await self._stream(request, sent, headers, rank)
                else:
                    answer = await self._upstream_json("POST", "/v1/chat/completions", sent, rank)
                    answer["model"] = expert
                    answer["routing"] = _routing_body(decision)
                    response = web.json_response(answer, headers=headers)
            for stage, seconds in (("image", image_s), ("route", route_s),
                                   ("expert", time.perf_counter() - expert_start),
                                   ("total", time.perf_counter() - start)):
                self.metrics.latency.labels(stage).observe(seconds)
            outcome = "ok"
            return response
        except GatewayError as exc:
            outcome = "refused" if exc.status == 422 else "bad_request" if exc.status < 500 else "error"
            raise
        finally:
            self.metrics.requests.labels(self.settings.auto_model, expert, outcome).inc()

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
        except InvalidImageError as exc:
            raise GatewayError(400, f"image: {exc}", param="messages", code="invalid_image") from None

    async def _fetch_image(self, url: str) -> bytes:
        limit = int(self.settings.max_body_mb * 1024 * 1024)
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                async with session.get(url) as r:
                    if r.status != 200:
                        raise GatewayError(400, f"image URL answered {r.status}", param="messages",
                                           code="invalid_image")
                    data = await r.content.read(limit + 1)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise GatewayError(400, f"image URL could not be fetched: {exc}", param="messages",
                               code="invalid_image") from None
        if len(data) > limit:
            raise GatewayError(413, f"image at URL is over {self.settings.max_body_mb:g} MB", code="body_too_large")
        return data

    async def _route(self, image: PreparedImage, rank: int | None) -> RouteDecision:
        policy = self.policy  # a request that started routing on one policy finishes on it
        start = time.perf_counter()
        with self.names.hold(policy.router_name):
            answer = await self._upstream_json("POST", "/v1/chat/completions", policy.request(image.data_url), rank)
        try:
            outcome = policy.decide(read_completion(answer), latency_s=time.perf_counter() - start)
        except ResponseFormatError as exc:
            raise GatewayError(502, f"the router's answer is unusable: {exc}", type="server_error",
                               code="upstream_failed") from None
        self.metrics.confidence.observe(outcome.confidence)
        reason = outcome.reason if isinstance(outcome, RouteRefused) else outcome.fallback_reason
        if reason:
            self.metrics.fallbacks.labels(reason).inc()
        if isinstance(outcome, RouteRefused):
            raise GatewayError(422, f"route refused: {outcome.message} (fallback is 'error')", type="routing_error",
                               code=outcome.reason, headers={"x-route-fallback": outcome.reason,
                                                             "x-route-confidence": f"{outcome.confidence:.4f}"})
        return outcome

    async def _stream(self, request: web.Request, body: dict[str, Any], headers: dict[str, str],
                      rank: int | None) -> web.StreamResponse:
        async with self._upstream_call("POST", "/v1/chat/completions", body, rank) as upstream:
            if upstream.status != 200:
                raise _upstream_error(upstream.status, await upstream.read())
            response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    # -- upstream

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise GatewayError(503, "the gateway is not started", type="server_error", headers=_retry_after())
        return self._session

    def _check_ready(self) -> None:
        if self.draining:
            raise GatewayError(503, "the service is stopping; retry on another replica", type="server_error",
                               code="shutting_down", headers=_retry_after())
        if not self.ready:
            raise GatewayError(503, "vLLM is not ready (starting or restarting); retry shortly",
                               type="server_error", code="upstream_unavailable", headers=_retry_after())

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """An in-flight slot, waiting in a bounded queue; 429 when the queue is full too."""
        if self._slots.locked() and self._waiting >= self.settings.max_queue:
            raise GatewayError(429, f"too many requests: {self.settings.max_in_flight} in flight and "
                                    f"{self._waiting} queued", type="rate_limit_error", code="queue_full",
                               headers=_retry_after())
        self._waiting += 1
        self.metrics.queued.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self.metrics.queued.dec()
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self._slots.release()
            self.metrics.in_flight.dec()

    @contextlib.asynccontextmanager
    async def _upstream_call(self, method: str, path: str, body: Any, rank: int | None = None,
                             raw: bytes | None = None,
                             headers: dict[str, str] | None = None) -> AsyncIterator[aiohttp.ClientResponse]:
        """One request to vLLM; its failures mapped to 502 (died mid-answer), 503 (down) and 504 (timeout)."""
        headers = dict(headers or {})
        if rank is not None:
            headers["X-data-parallel-rank"] = str(rank)
        try:
            async with self._client().request(method, self.upstream_root + path, json=body if raw is None else None,
                                              data=raw, headers=headers) as response:
                yield response
        except asyncio.TimeoutError:
            raise GatewayError(504, f"vLLM did not answer {path} within {self.settings.upstream_timeout_s:g} s",
                               type="server_error", code="upstream_timeout") from None
        except aiohttp.ClientConnectorError:
            raise GatewayError(503, "vLLM is down (connection refused); retry shortly", type="server_error",
                               code="upstream_unavailable", headers=_retry_after()) from None
        except aiohttp.ClientError as exc:
            raise GatewayError(502, f"vLLM broke off the answer ({type(exc).__name__}: {exc})",
                               type="server_error", code="upstream_failed") from None

    async def _upstream_json(self, method: str, path: str, body: Any, rank: int | None = None) -> dict[str, Any]:
        async with self._upstream_call(method, path, body, rank) as response:
            data = await response.read()
            if response.status != 200:
                raise _upstream_error(response.status, data)
            try:
                return parse_json_object(data)
            except GatewayError:
                raise GatewayError(502, f"vLLM answered {path} with no JSON object", type="server_error",
                                   code="upstream_failed") from None

    async def _relay(self, request: web.Request, raw: bytes, outcome_model: str | None = None) -> web.StreamResponse:
        """Forward a request to vLLM as it came (the key swapped for the internal one) and stream the answer back."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept", "x-request-id")}
        outcome = "error"
        try:
            async with self._upstream_call(request.method, request.path_qs, None, raw=raw, headers=headers) as up:
                response = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in _HOP_HEADERS})
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                outcome = "ok" if up.status < 400 else "upstream_error"
                return response
        finally:
            if outcome_model is not None:
                self.metrics.requests.labels(outcome_model, outcome_model, outcome).inc()


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}


def _error_response(exc: GatewayError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


def _upstream_error(status: int, data: bytes) -> GatewayError:
    """vLLM's own error, passed on with its status and message."""
    message = error_message(data.decode("utf-8", "replace"))
    return GatewayError(status, message, type="upstream_error" if status >= 500 else "invalid_request_error")


def _routing_headers(decision: RouteDecision) -> dict[str, str]:
    headers = {"x-route-expert": decision.expert, "x-route-confidence": f"{decision.confidence:.4f}",
               "x-route-ms": f"{decision.latency_s * 1000:.1f}", "x-route-mode": decision.mode}
    if decision.fallback_reason:
        headers["x-route-fallback"] = decision.fallback_reason
    return headers


def _routing_body(decision: RouteDecision) -> dict[str, Any]:
    return {"expert": decision.expert, "confidence": decision.confidence,
            "probabilities": decision.probabilities, "mode": decision.mode,
            "router_latency_ms": round(decision.latency_s * 1000, 2), "fallback_reason": decision.fallback_reason,
            "router_text": decision.raw, "router_prompt_tokens": decision.prompt_tokens,
            "router_completion_tokens": decision.completion_tokens}
