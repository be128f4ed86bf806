"""The review page: captured screenshots with the router's guess, labelled in a browser (issue 25).

    GET  /admin/review/login     a form asking for the admin key
    POST /admin/review/login     the key, once: answered with a session cookie, then the page
    GET  /admin/review           the page (one HTML file, no external script, font or style: it works offline)
    GET  /admin/review/items     ?reason=low_confidence|disagreement|feedback|flagged|random|unlabeled
    GET  /admin/review/image/ID  one screenshot
    POST /admin/review/label     {id, label}: set (or, with null, clear) a capture's label

The key never goes into a URL: the session is a cookie (HttpOnly, SameSite=Strict, path /admin/review) holding its
expiry signed with the admin key, so every replica of a fleet that shares the key and the store accepts it. A
change also needs the page's CSRF token (derived from the session) in a header, and a same-origin Origin when the
browser sends one: another site can neither read the page nor post a label with the reviewer's cookie.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import html
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from lora_router.capture import REASONS, CaptureError
from serving.gateway.capture import Capturer
from serving.gateway.protocol import GatewayError, parse_json_object

PAGE = Path(__file__).with_name("review.html")
COOKIE = "lora_router_review"
CSRF_HEADER = "X-CSRF-Token"
SESSION_S = 12 * 3600
UNLABELED = "unlabeled"
_LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>lora-router review: sign in</title></head>
<body style="font-family: sans-serif; margin: 4em auto; max-width: 24em">
<h1>Capture review</h1>{message}
<form method="post" action="/admin/review/login">
<label>Admin key <input type="password" name="key" autofocus required></label> <button>Sign in</button>
</form></body></html>"""


class ReviewRoutes:
    """The review page of one gateway over its capture store; `labels()` gives the live router's labels."""

    def __init__(self, admin_key: str, capture: Capturer, labels) -> None:
        self._key = admin_key.encode()
        self.capture = capture
        self.labels = labels

    def add_to(self, app: web.Application) -> None:
        """Mount the page under /admin/review (before the admin API, whose bearer key it does not use)."""
        review = web.Application(middlewares=[self._session])
        review.router.add_get("/login", self.login_form)
        review.router.add_post("/login", self.login)
        review.router.add_get("", self.page)
        review.router.add_get("/items", self.items)
        review.router.add_get("/image/{id}", self.image)
        review.router.add_post("/label", self.label)
        app.add_subapp("/admin/review", review)

    # -- the session

    def session_cookie(self, now: float) -> str:
        expiry = str(int(now + SESSION_S))
        return f"{expiry}.{self._sign('session', expiry)}"

    def csrf_token(self, cookie: str) -> str:
        return self._sign("csrf", cookie)

    def _valid(self, cookie: str | None, now: float) -> bool:
        expiry, _, signature = (cookie or "").partition(".")
        return (expiry.isdigit() and int(expiry) > now
                and hmac.compare_digest(signature, self._sign("session", expiry)))

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()

    @web.middleware
    async def _session(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/admin/review/login":
            return await handler(request)
        cookie = request.cookies.get(COOKIE)
        if not self._valid(cookie, time.time()):
            if request.path == "/admin/review" and request.method == "GET":
                raise web.HTTPSeeOther("/admin/review/login")
            raise GatewayError(401, "no review session: sign in at /admin/review/login", type="authentication_error",
                               code="invalid_admin_key")
        if request.method != "GET":
            origin = request.headers.get("Origin")
            if origin is not None and origin != f"{request.scheme}://{request.host}":
                raise GatewayError(403, f"a change from another site ({origin}) is refused", code="csrf_refused")
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), self.csrf_token(cookie)):
                raise GatewayError(403, f"missing or wrong {CSRF_HEADER} header", code="csrf_refused")
        return await handler(request)

    # -- routes

    async def login_form(self, request: web.Request) -> web.Response:
        return web.Response(text=_LOGIN.format(message=""), content_type="text/html")

    async def login(self, request: web.Request) -> web.Response:
        sent = str((await request.post()).get("key", ""))
        if not hmac.compare_digest(sent.encode(), self._key):
            return web.Response(text=_LOGIN.format(message="<p role=alert>Wrong key.</p>"), content_type="text/html",
                                status=401)
        response = web.Response(status=303, headers={"Location": "/admin/review"})
        response.set_cookie(COOKIE, self.session_cookie(time.time()), max_age=SESSION_S, path="/admin/review",
                            httponly=True, samesite="Strict", secure=request.secure)
        return response

    async def page(self, request: web.Request) -> web.Response:
        self.capture.require_store()
        token = html.escape(self.csrf_token(request.cookies[COOKIE]))
        text = PAGE.read_text().replace("{{csrf}}", token)
        # The page runs only its own inline script and loads images from here: no other origin, ever.
        policy = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                  "connect-src 'self'; form-action 'self'; frame-ancestors 'none'")
        return web.Response(text=text, content_type="text/html",
                            headers={"Content-Security-Policy": policy, "Cache-Control": "no-store"})

    async def items(self, request: web.Request) -> web.Response:
        store = self.capture.require_store()
        reason = request.query.get("reason")
        if reason is not None and reason not in (*REASONS, UNLABELED):
            raise GatewayError(400, f"reason must be one of {', '.join((*REASONS, UNLABELED))}, got {reason!r}",
                               param="reason", code="invalid_request")
        every = list((await asyncio.to_thread(store.items)).values())
        shown = [i for i in every if reason is None or (i.label is None if reason == UNLABELED else
                                                       reason in i.reasons)]
        counts = {r: sum(1 for i in every if r in i.reasons) for r in REASONS}
        counts.update(all=len(every), unlabeled=sum(1 for i in every if i.label is None),
                      labelled=sum(1 for i in every if i.label is not None))
        return web.json_response({"labels": list(self.labels()), "counts": counts,
                                  "items": [dataclasses.asdict(i) for i in reversed(shown)]})

    async def image(self, request: web.Request) -> web.Response:
        return web.Response(body=await self.capture.png(request.match_info["id"]), content_type="image/png")

    async def label(self, request: web.Request) -> web.Response:
        store = self.capture.require_store()
        body = parse_json_object(await request.read())
        item_id, label = body.get("id"), body.get("label")
        if label is not None and label not in self.labels():
            raise GatewayError(400, f"label must be one of {', '.join(self.labels())} or null, got {label!r}",
                               param="label", code="invalid_request")
        try:
            item = await asyncio.to_thread(store.update, str(item_id), label=label)
        except CaptureError as exc:
            raise GatewayError(404, str(exc), code="not_found") from None
        return web.json_response(dataclasses.asdict(item))
