"""The admin API: change what a running deployment serves, without dropping a request. Off unless the config gives
gateway.admin_api_key (or $LORA_ROUTER_ADMIN_KEY); that key is not the service's, and the service's key opens none
of these routes.

    POST   /admin/adapters           {name, path, prompt?}  add an expert (checked, loaded, warmed up, probed)
    DELETE /admin/adapters/{name}                           remove an expert once its in-flight requests end
    GET    /admin/state                                     router versions, experts and LoRA slots
    POST   /admin/router/candidate   {path}                 load a router version beside the live one (shadowed)
    DELETE /admin/router/candidate                          discard it
    GET    /admin/router/shadow                             how the candidate's routes compare with the live ones
    POST   /admin/router/promote                            the candidate goes live
    POST   /admin/router/rollback                           the previous router version goes live again
    GET    /admin/drift                                     the live router's traffic against its calibration set
    GET    /admin/captures           ?reason=                 captured screenshots' routes, feedback and labels
    GET    /admin/captures/{id}/image                         one captured screenshot (PNG)
    DELETE /admin/captures/{id}                             delete a captured screenshot and its record

Paths are adapter folders inside gateway.adapter_dirs (relative: against the project root). Routes live here, the
request bodies in serving.gateway.protocol, the operations in serving.gateway.lifecycle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from lora_router.capture import REASONS, CaptureError
from lora_router.deployment import GatewayConfig
from serving.gateway.capture import Capturer
from serving.gateway.lifecycle import AdapterLifecycle
from serving.gateway.protocol import GatewayError, parse_add_adapter, parse_candidate, parse_json_object


class AdminRoutes:
    """The admin API of one gateway; `check_ready()` raises the gateway's 503 while vLLM is down (a change waits
    for a restart to end)."""

    def __init__(self, settings: GatewayConfig, lifecycle: AdapterLifecycle, check_ready: Callable[[], None],
                 capture: Capturer, drift_report: Callable[[], dict[str, Any]]) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.check_ready = check_ready
        self.capture = capture
        self.drift_report = drift_report

    def add_to(self, app: web.Application) -> None:
        """Mount the admin API under /admin (or, when it is off, one answer saying so)."""
        if not self.settings.admin_enabled:
            app.router.add_route("*", "/admin/{tail:.*}", self.off)
            return
        admin = web.Application(middlewares=[self._auth])
        admin.router.add_post("/adapters", self.add_adapter)
        admin.router.add_delete("/adapters/{name}", self.remove_adapter)
        admin.router.add_get("/state", self.state)
        admin.router.add_post("/router/candidate", self.load_candidate)
        admin.router.add_delete("/router/candidate", self.discard_candidate)
        admin.router.add_get("/router/shadow", self.shadow)
        admin.router.add_post("/router/promote", self.promote)
        admin.router.add_post("/router/rollback", self.rollback)
        admin.router.add_get("/drift", self.drift)
        admin.router.add_get("/captures", self.captures)
        admin.router.add_get("/captures/{id}/image", self.capture_image)
        admin.router.add_delete("/captures/{id}", self.delete_capture)
        app.add_subapp("/admin", admin)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        sent = request.headers.get("Authorization", "")
        if not sent:
            raise GatewayError(401, "no admin key: send 'Authorization: Bearer <gateway.admin_api_key>'",
                               type="authentication_error", code="invalid_admin_key")
        # Constant time: a wrong key's answer must not tell how much of it was right.
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.settings.admin_api_key}".encode()):
            raise GatewayError(401, "wrong admin key (the service's API key opens no admin route)",
                               type="authentication_error", code="invalid_admin_key")
        return await handler(request)

    async def off(self, request: web.Request) -> web.Response:
        raise GatewayError(404, "the admin API is off: start the deployment with gateway.admin_api_key (or "
                                "$LORA_ROUTER_ADMIN_KEY) set", code="admin_off")

    async def add_adapter(self, request: web.Request) -> web.Response:
        add = parse_add_adapter(parse_json_object(await request.read()))
        return await self._run(lambda: self.lifecycle.add_adapter(add.name, add.path, add.prompt))

    async def remove_adapter(self, request: web.Request) -> web.Response:
        return await self._run(lambda: self.lifecycle.remove_adapter(request.match_info["name"]))

    async def state(self, request: web.Request) -> web.Response:
        return web.json_response(self.lifecycle.state())

    async def load_candidate(self, request: web.Request) -> web.Response:
        path = parse_candidate(parse_json_object(await request.read()))
        return await self._run(lambda: self.lifecycle.load_candidate(path))

    async def discard_candidate(self, request: web.Request) -> web.Response:
        return await self._run(self.lifecycle.discard_candidate)

    async def shadow(self, request: web.Request) -> web.Response:
        return web.json_response(self.lifecycle.shadow_report())

    async def promote(self, request: web.Request) -> web.Response:
        return await self._run(self.lifecycle.promote)

    async def rollback(self, request: web.Request) -> web.Response:
        return await self._run(self.lifecycle.rollback)

    async def drift(self, request: web.Request) -> web.Response:
        return web.json_response(self.drift_report())

    async def captures(self, request: web.Request) -> web.Response:
        store = self.capture.require_store()
        reason = request.query.get("reason")
        if reason is not None and reason not in REASONS:
            raise GatewayError(400, f"reason must be one of {', '.join(REASONS)}, got {reason!r}", param="reason",
                               code="invalid_request")
        items = [dataclasses.asdict(i) for i in (await asyncio.to_thread(store.items)).values()
                 if reason is None or reason in i.reasons]
        return web.json_response({"count": len(items), "items": items})

    async def capture_image(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.capture.png(request.match_info["id"]), content_type="image/png")

    async def delete_capture(self, request: web.Request) -> web.Response:
        store = self.capture.require_store()
        try:
            await asyncio.to_thread(store.delete, request.match_info["id"])
        except CaptureError as exc:
            raise GatewayError(404, str(exc), code="not_found") from None
        return web.json_response({"deleted": request.match_info["id"]})

    async def _run(self, operation: Callable[[], Awaitable[dict[str, Any]]]) -> web.Response:
        self.check_ready()
        # Shielded: an admin caller that leaves mid-way must not cut an operation in half.
        return web.json_response(await asyncio.shield(operation()))
