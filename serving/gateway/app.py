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
live here, the wire contract in serving.gateway.protocol, the routing arithmetic in lora_router.routing, the adapters
and router versions served in serving.gateway.lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from lora_router.deployment import DeploymentConfig
from serving.gateway.admin import AdminRoutes
from serving.gateway.auto import AutoRoute
from serving.gateway.lifecycle import AdapterLifecycle
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.protocol import (
    GatewayError,
    is_lora_route,
    named_model,
    parse_json_object,
    retry_after,
    with_model,
)
from serving.gateway.upstream import Upstream
from serving.lifecycle import AdapterSet

log = logging.getLogger(__name__)

# Response headers that describe one hop only; the gateway's own response sets its own.
_HOP_HEADERS = {"connection", "content-length", "transfer-encoding", "keep-alive", "server", "date",
                "content-encoding"}


class Gateway:
    """The gateway of one deployment; `ready` is set by the launcher once vLLM is up and warmed, `draining` once
    the service is stopping (it refuses new requests then, and /health says so, so that a balancer looks elsewhere).

    `adapters` is what vLLM serves at start, under versioned names; `config`, `base` and `config_adapters` as for
    AdapterLifecycle.
    """

    def __init__(self, config: DeploymentConfig, upstream_root: str, upstream_key: str, adapters: AdapterSet, *,
                 base: str | None, config_adapters: list[str], replica: str) -> None:
        self.config = config
        self.settings = config.gateway
        self.metrics = GatewayMetrics()
        self.upstream = Upstream(upstream_root, upstream_key, self.settings.upstream_timeout_s)
        self.lifecycle = AdapterLifecycle(config, self.upstream, adapters, self.metrics, base=base,
                                          config_adapters=config_adapters, replica=replica)
        self.names = self.lifecycle.names
        self.auto = AutoRoute(config, self.upstream, self.lifecycle, self.metrics)
        self.admin = AdminRoutes(self.settings, self.lifecycle, self._check_ready)
        self.ready = False
        self._sync: asyncio.Task | None = None
        self.draining = False
        self._slots = asyncio.Semaphore(self.settings.max_in_flight)
        self._waiting = 0

    # -- lifecycle

    async def open(self) -> None:
        """Open the upstream session and start following the fleet's state file (idempotent)."""
        await self.upstream.open()
        if self._sync is None and self.config.state_path and self.settings.sync_interval_s > 0:
            self._sync = asyncio.get_running_loop().create_task(self.lifecycle.sync_forever())

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.cancel()
            await asyncio.gather(self._sync, return_exceptions=True)
            self._sync = None
        await self.lifecycle.close()
        await self.upstream.close()

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
            return web.json_response({"status": "draining"}, status=503, headers=retry_after())
        if not self.ready:
            return web.json_response({"status": "starting"}, status=503, headers=retry_after())
        if not await self.upstream.healthy():
            return web.json_response({"status": "vllm down"}, status=503, headers=retry_after())
        return web.json_response({"status": "ok"})

    async def prometheus(self, request: web.Request) -> web.Response:
        text = self.metrics.text() + await self.upstream.metrics()
        return web.Response(body=text, content_type="text/plain", charset="utf-8")

    async def models(self, request: web.Request) -> web.Response:
        self._check_ready()
        listing = await self.upstream.json("GET", "/v1/models")
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
            return await self.auto.answer(request, body)

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

    # -- admission and relaying

    def _check_ready(self) -> None:
        if self.draining:
            raise GatewayError(503, "the service is stopping; retry on another replica", type="server_error",
                               code="shutting_down", headers=retry_after())
        if not self.ready:
            raise GatewayError(503, "vLLM is not ready (starting or restarting); retry shortly",
                               type="server_error", code="upstream_unavailable", headers=retry_after())

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """An in-flight slot, waiting in a bounded queue; 429 when the queue is full too."""
        if self._slots.locked() and self._waiting >= self.settings.max_queue:
            raise GatewayError(429, f"too many requests: {self.settings.max_in_flight} in flight and "
                                    f"{self._waiting} queued", type="rate_limit_error", code="queue_full",
                               headers=retry_after())
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

    async def _relay(self, request: web.Request, raw: bytes, outcome_model: str | None = None) -> web.StreamResponse:
        """Forward a request to vLLM as it came (the key swapped for the internal one) and stream the answer back."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept", "x-request-id")}
        outcome = "error"
        try:
            async with self.upstream.call(request.method, request.path_qs, raw=raw, headers=headers) as up:
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


def _error_response(exc: GatewayError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
