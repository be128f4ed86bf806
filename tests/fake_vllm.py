"""A scripted stand-in for vLLM's OpenAI-compatible server, for client tests only.

A real server cannot be made to fail on cue; this one speaks the endpoints the client and the gateway use
(/v1/chat/completions, /tokenize, /v1/models, /health, /metrics, adapter loading) and plays scripted faults, one per
request, in order. It also answers the routing gateway's `model: "auto"` as the gateway does: the routed expert's
completion with a `routing` object and x-route-* headers. Versioned names (`calendar@3f2a9c01b7de`, as the gateway
sends them) are served as their public name.

    fake.faults.append(Fault(status=503))          # the next chat request answers 503
    fake.fail_models["router@v2"] = 500            # every chat request for that exact model answers 500
    fake.route = lambda png: "claim-window"        # the router's answer per image
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

LABELS = ("calendar", "claim-window", "provider-select")
BODY = web.RequestKey("body", dict)
CLICK = '{"name": "click", "arguments": {"x": 10, "y": 20}}'


@dataclass
class Fault:
    """One scripted misbehaviour: wait `stall_s`, then drop the connection (`reset`) or answer `status`."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stall_s: float = 0.0
    reset: bool = False
    message: str = "scripted failure"


@dataclass
class Seen:
    """One request as the fake received it."""

    path: str
    body: dict[str, Any]
    headers: CIMultiDict[str]  # names in any case
    at: float


class FakeVLLM:
    """The scripted server; attributes are the script, `requests` the record."""

    def __init__(self, labels: tuple[str, ...] = LABELS) -> None:
        self.labels = labels
        self.models = ("base", "router", *labels)
        self.faults: deque[Fault] = deque()
        self.requests: list[Seen] = []
        # The router's answer for an image's PNG bytes, and the (constrained) probability of that answer.
        self.route: Callable[[bytes], str] = lambda png: labels[0]
        # A router version's own answers, by its versioned name (router@...), where it must differ from `route`'s.
        self.routes: dict[str, Callable[[bytes], str]] = {}
        self.choice_probability = 0.9
        # One-token mode: first-token string -> logprob; None derives it from `route`.
        self.first_token_logprobs: dict[str, float] | None = None
        # Tokenisation of each label for /tokenize and logprobs; default one token per label.
        self.tokens: dict[str, list[str]] = {label: [label] for label in labels}
        self.answers: dict[str, str] = {}
        # The gateway's routing model name; None answers it as vLLM does (404).
        self.auto_model: str | None = "auto"
        self.api_key: str | None = None
        self.fail_models: dict[str, int] = {}
        # Status of adapter loading (/v1/load_lora_adapter), and chat handlers cancelled because their caller left.
        self.load_status = 200
        self.cancelled = 0
        self.request_id = itertools.count(1)
        self._vocab: dict[str, int] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def chat_requests(self, model: str | None = None) -> list[Seen]:
        """The chat requests received, optionally only those for `model`."""
        return [r for r in self.requests
                if r.path == "/v1/chat/completions" and (model is None or r.body.get("model") == model)]

    def token_id(self, token: str) -> int:
        return self._vocab.setdefault(token, 100 + len(self._vocab))

    async def start(self) -> None:
        app = web.Application(middlewares=[self._record_and_fault])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._load)
        # Cancel a handler whose client went away (stalls), and do not wait for stragglers at shutdown.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _record_and_fault(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            body = await request.json() if request.method == "POST" else {}
        except ValueError:
            body = None  # answered 400 below, as vLLM answers a body it cannot read
        request[BODY] = body
        self.requests.append(Seen(request.path, body if isinstance(body, dict) else {}, CIMultiDict(request.headers),
                                  time.monotonic()))
        headers = {"x-request-id": f"req-{next(self.request_id)}"}
        if self.api_key and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "bad api key", headers)
        if not isinstance(body, dict):
            return _error(400, "the body is no JSON object", headers)
        fault = self.faults.popleft() if self.faults and request.path == "/v1/chat/completions" else None
        try:
            if fault is not None:
                await asyncio.sleep(fault.stall_s)
                if fault.reset:
                    request.transport.close()
                    return web.Response()  # never sent: the connection is gone
                if fault.status is not None:
                    return _error(fault.status, fault.message, {**headers, **fault.headers})
            response = await handler(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        response.headers.update(headers)
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0.0\n")

    async def _load(self, request: web.Request) -> web.Response:
        """Load or unload an adapter: its name is served from then on (or no longer)."""
        if self.load_status != 200:
            return _error(self.load_status, "scripted load failure", {})
        name = str(request[BODY].get("lora_name")).split("@")[0]
        if request.path == "/v1/load_lora_adapter":
            self.models = (*self.models, name)
        else:
            self.models = tuple(m for m in self.models if m != name)
        return web.Response(text="Success")

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _tokenize(self, request: web.Request) -> web.Response:
        body = request[BODY]
        tokens = self.tokens.get(body["prompt"], list(body["prompt"]))
        return web.json_response({"count": len(tokens), "max_model_len": 4096,
                                  "tokens": [self.token_id(t) for t in tokens],
                                  "token_strs": tokens if body.get("return_token_strs") else None})

    async def _chat(self, request: web.Request) -> web.Response:
        body = request[BODY]
        requested = body.get("model")
        if isinstance(requested, str) and requested in self.fail_models:
            return _error(self.fail_models[requested], f"scripted failure of {requested}", {})
        model = requested.split("@")[0] if isinstance(requested, str) else requested
        if model not in self.models and model != self.auto_model:
            return _error(404, f"The model `{requested}` does not exist.", {}, param="model")
        try:
            content = body["messages"][-1]["content"]
            png = base64.b64decode(content[0]["image_url"]["url"].split(",", 1)[1])
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            return _error(400, "messages: expected an image_url part first in the last turn", {})
        if model == self.auto_model:
            return self._auto(png)
        if model != "router":
            return _completion(model, self.answers.get(model, CLICK), None)
        answer = self.routes.get(requested, self.route)(png)
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        if "structured_outputs" in body:
            tokens = self.tokens.get(answer, [answer])
            each = math.log(self.choice_probability) / len(tokens)
            entries = [{"token": self._token(t, as_ids), "logprob": each, "top_logprobs": []} for t in tokens]
            return _completion(model, answer, entries)
        firsts = self.first_token_logprobs or {
            **{self.tokens[label][0]: -6.0 for label in self.labels}, "The": -5.0,
            self.tokens.get(answer, [answer])[0]: -0.1}
        # As vLLM does for logprob_token_ids: the sampled token, then every requested id with its full-vocabulary
        # log-probability (here -30 for a token the script does not name).
        best, best_lp = max(firsts.items(), key=lambda item: item[1])
        by_id = {self.token_id(t): lp for t, lp in firsts.items()}
        top = [{"token": self._token(best, as_ids), "logprob": best_lp}]
        top += [{"token": f"token_id:{i}", "logprob": by_id.get(i, -30.0)} for i in body.get("logprob_token_ids") or []]
        return _completion(model, best, [{"token": self._token(best, as_ids), "logprob": best_lp, "top_logprobs": top}])

    def _auto(self, png: bytes) -> web.Response:
        expert, confidence = self.route(png), self.choice_probability
        routing = {"expert": expert, "confidence": confidence, "probabilities": {expert: confidence},
                   "mode": "choice", "router_latency_ms": 1.5, "fallback_reason": None, "router_text": expert,
                   "router_prompt_tokens": 90, "router_completion_tokens": 1}
        headers = {"x-route-expert": expert, "x-route-confidence": f"{confidence:.4f}", "x-route-ms": "1.5",
                   "x-route-mode": "choice"}
        body = {**_completion_body(expert, self.answers.get(expert, CLICK), None), "routing": routing}
        return web.json_response(body, headers=headers)

    def _token(self, token: str, as_id: bool) -> str:
        return f"token_id:{self.token_id(token)}" if as_id else token


def _completion(model: str, text: str, logprobs: list[dict] | None) -> web.Response:
    return web.json_response(_completion_body(model, text, logprobs))


def _completion_body(model: str, text: str, logprobs: list[dict] | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None if logprobs is None else {"content": logprobs}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 50, "completion_tokens": max(1, len(logprobs or [1, 2, 3])),
                  "total_tokens": 53},
    }


def _error(status: int, message: str, headers: dict[str, str], param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "ScriptedError", "param": param, "code": status}}
    return web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def fake_vllm() -> FakeVLLM:
    """A started FakeVLLM on a free port of 127.0.0.1."""
    server = FakeVLLM()
    await server.start()
    yield server
    await server.stop()
