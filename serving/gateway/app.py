"""The routing gateway: one OpenAI-compatible endpoint in front of vLLM where `model: "auto"` routes.

    POST /v1/chat/completions  model "auto": prepare the one image, ask the router adapter, send the caller's
                               own request to the chosen expert with the identical image bytes; any other
                               model is forwarded to vLLM unchanged (streaming included)
    GET  /v1/models            "auto" plus everything vLLM serves
    POST /v1/feedback          {request_id, correct, expert?}: the caller's verdict on an auto route (counted; with
                               gateway.capture on, stored with the screenshot)
    GET  /health               200 only while vLLM is up and warmed, and the gateway is not draining
    GET  /metrics              the gateway's Prometheus metrics, then vLLM's
    /admin/...                 the admin API (serving.gateway.admin), when gateway.admin_api_key is set
    /admin/review              the capture review page (serving.gateway.review), signed in with the admin key
    anything else              forwarded to vLLM (e.g. /tokenize), but never vLLM's own adapter loading

vLLM listens on loopback with an internal key; only the gateway reaches it. It serves each adapter under a
versioned name (name@version); callers use public names, which the gateway rewrites in what it forwards. Routes
live here, the wire contract in serving.gateway.protocol, the routing arithmetic in lora_router.routing, the adapters
and router versions served in serving.gateway.lifecycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from lora_router.deployment import LOOPBACK_HOSTS, DeploymentConfig
from serving.drift import DriftBaseline, DriftWindow
from serving.gateway.admin import AdminRoutes
from serving.gateway.auto import AutoRoute
from serving.gateway.capture import Capturer
from serving.gateway.engines import EnginePicker
from serving.gateway.lifecycle import AdapterLifecycle
from serving.gateway.metrics import NONE, OTHER, GatewayMetrics, outcome
from serving.gateway.protocol import (
    GatewayError,
    RequestRecord,
    is_lora_route,
    key_matches,
    named_model,
    parse_feedback,
    parse_json_object,
    request_id,
    retry_after,
    with_model,
)
from serving.gateway.review import ReviewRoutes
from serving.gateway.upstream import Upstream, upstream_error
from serving.lifecycle import AdapterSet

log = logging.getLogger(__name__)
# One line per request: method, path, model, expert, router version, status, route and total ms, request id.
access_log = logging.getLogger("serving.gateway.access")
RECORD = web.RequestKey("record", RequestRecord)
# Paths a prober or scraper calls every few seconds: no access-log line, or they would drown the others.
_QUIET_PATHS = ("/health", "/metrics")
# aiohttp's own refusals (no such route, a method the route does not take) by code; any other 4xx: invalid_request.
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}
# The caller's status for a request it gave up on before the answer (nginx's convention).
_CLIENT_CLOSED = 499
# Access-log values written as they are; any other is quoted (a caller's model name must not forge a field).
_PLAIN_VALUE = re.compile(r"^[\w.@:/+-]*$")

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
        self.capture = Capturer(self.settings.capture, config.capture_path, self.metrics, self._label)
        if self.capture.store is not None:
            self.lifecycle.shadow.labelled = self.capture.labelled_held_out
        # Every chat request holds the least-loaded data-parallel engine (global rank, over every node) while it runs.
        self.engines = EnginePicker(config.engine.data_parallel_size)
        self.drift = DriftWindow(self.settings.drift_window)
        self.auto = AutoRoute(config, self.upstream, self.lifecycle, self.metrics, self.engines, self.capture,
                              self.drift)
        self.admin = AdminRoutes(self.settings, self.lifecycle, self._check_ready, self.capture, self.drift_report)
        self.ready = False
        self._sync: asyncio.Task | None = None
        self.draining = False
        self._slots = asyncio.Semaphore(self.settings.max_in_flight)
        self._waiting = 0
        # The scrape shows which adapters and load each replica has: behind the service key on a public address.
        self._metrics_open = self.settings.public_metrics or config.engine.host in LOOPBACK_HOSTS
        self._json_log: logging.Handler | None = None
        if self.settings.log_format == "json":
            # Each line one JSON object, nothing around it: its own handler, not the process's prefixed format.
            self._json_log = logging.StreamHandler(sys.stderr)
            self._json_log.setFormatter(logging.Formatter("%(message)s"))
            access_log.addHandler(self._json_log)
            access_log.propagate = False

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
        await self.capture.close()
        await self.upstream.close()
        if self._json_log is not None:
            access_log.removeHandler(self._json_log)
            access_log.propagate = True

    async def resolve_policy(self) -> None:
        """Ask vLLM's tokenizer for the labels' first tokens (one-token routing); after each (re)start."""
        await self.lifecycle.resolve()

    def app(self) -> web.Application:
        """The aiohttp application: routes, auth, OpenAI-shaped errors, a body size cap."""
        app = web.Application(client_max_size=int(self.settings.max_body_mb * 1024 * 1024),
                              middlewares=[self._observe, self._errors, self._auth])
        app.on_response_prepare.append(_send_request_id)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/feedback", self.feedback)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        if self.settings.admin_enabled:  # before the admin API: the page signs in with a cookie, not a bearer key
            ReviewRoutes(self.settings.admin_api_key, self.capture, lambda: self.lifecycle.policy.labels).add_to(app)
        self.admin.add_to(app)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        return app

    # -- middlewares

    @web.middleware
    async def _observe(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Name the request (x-request-id), then count it and write its access-log line, whatever the answer."""
        record = request[RECORD] = RequestRecord(request_id(request.headers.get("x-request-id")))
        start = time.perf_counter()
        status = _CLIENT_CLOSED
        try:
            response = await handler(request)
            status = response.status
            return response
        finally:
            # A handler that ran named a model: chat requests are counted (callers without a key never get here).
            if request.path == "/v1/chat/completions" and record.model is not None:
                label = "cancelled" if status == _CLIENT_CLOSED else outcome(status)
                self.metrics.requests.labels(self._label(record.model), self._label(record.expert), label).inc()
            if request.path not in _QUIET_PATHS:
                self._access_line(request, record, status, time.perf_counter() - start)

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
            code = HTTP_ERROR_CODES.get(exc.status, "invalid_request")
            return _error_response(GatewayError(exc.status, exc.text or exc.reason, code=code))
        except Exception:
            # A bug, not the caller's fault: said in OpenAI's shape all the same, and logged whole.
            log.exception("request %s %s failed", request.method, request.path)
            return _error_response(GatewayError(500, "the gateway failed on this request (its log says why)",
                                                type="server_error", code="internal_error"))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        key = self.config.engine.api_key
        open_paths = ("/health", "/metrics") if self._metrics_open else ("/health",)
        # The admin API checks its own key, which is not the service's.
        if key and request.path not in open_paths and not request.path.startswith("/admin/"):
            if not key_matches(request.headers.get("Authorization", ""), key):
                raise GatewayError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                   type="authentication_error", code="invalid_api_key")
        return await handler(request)

    def _label(self, name: Any) -> str:
        """A model or expert name as a metrics label: a name the gateway serves as it is, any other `other`."""
        if name is None:
            return NONE
        served = isinstance(name, str) and (self.names.is_public(name) or name in (
            self.settings.auto_model, self.config.model.served_name))
        return name if served else OTHER

    def _access_line(self, request: web.Request, record: RequestRecord, status: int, seconds: float) -> None:
        fields = {"request_id": record.request_id, "method": request.method, "path": request.path,
                  "model": record.model, "expert": record.expert, "router": record.router, "status": status,
                  "route_ms": None if record.route_s is None else round(record.route_s * 1000, 1),
                  "total_ms": round(seconds * 1000, 1)}
        if self.settings.log_format == "json":
            access_log.info("%s", json.dumps(fields, default=str))
        else:
            access_log.info("%s", " ".join(f"{k}={_plain(v)}" for k, v in fields.items()))

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
        if self.lifecycle.adapters.router is not None:
            self.metrics.set_drift(self.drift_report())
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
        record = request[RECORD]
        record.model = NONE  # counted from here on, under the model the body names once it parses
        raw = await request.read()
        body = parse_json_object(raw)
        record.model = body.get("model", NONE)
        auto = body.get("model") == self.settings.auto_model
        async with self._admitted():
            self._check_ready()
            if not auto:
                model = str(body.get("model"))
                record.expert = model
                with self.names.hold(model) as served, self.engines.pinned() as rank:
                    sent = raw if served == model else with_model(body, served)
                    return await self._relay(request, sent, rank)
            return await self.auto.answer(request, body, record)

    async def feedback(self, request: web.Request) -> web.Response:
        """The caller's verdict on an auto route (serving.gateway.capture)."""
        feedback = parse_feedback(parse_json_object(await request.read()), list(self.lifecycle.policy.labels))
        answer = await self.capture.feedback(feedback)
        self.drift.feedback(answer["router"], feedback.correct)
        return web.json_response(answer)

    def drift_report(self) -> dict[str, Any]:
        """The live router's drift window beside its calibration set (serving.drift); 400 without a router."""
        policy = self.lifecycle.policy
        baseline = DriftBaseline.of(policy.min_confidence, self.lifecycle.adapters.router.calibration)
        return self.drift.report(baseline, list(policy.labels))

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

    async def _relay(self, request: web.Request, raw: bytes, rank: int | None = None) -> web.StreamResponse:
        """Forward a request to vLLM as it came (the key swapped for the internal one, named by the request's id,
        pinned to data-parallel `rank` if given) and stream the answer back; an error answer is the gateway's own, in
        OpenAI's shape with a code."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")}
        async with self.upstream.call(request.method, request.path_qs, raw=raw, headers=headers, rank=rank,
                                      request_id=request[RECORD].request_id) as up:
            if up.status >= 400:
                raise upstream_error(up.status, await up.read(), request.path)
            response = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in _HOP_HEADERS})
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


async def _send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer names its request, streamed ones too (their headers go before the first event)."""
    record = request.get(RECORD)
    if record is not None:
        response.headers["x-request-id"] = record.request_id


def _plain(value: Any) -> str:
    text = "-" if value is None else str(value)
    return text if _PLAIN_VALUE.match(text) else json.dumps(text)


def _error_response(exc: GatewayError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)
