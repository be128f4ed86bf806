"""The gateway's wire contract: what an `auto` request must carry, and errors in OpenAI's shape.

Pure functions over parsed JSON, so every bad input is tested without a server.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hmac
import json
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from lora_router.images import PreparedImage, open_header
from lora_router.openai_wire import error_body
from lora_router.routing import RouteDecision

# Seconds a caller is asked to wait while vLLM is down or the queue is full.
RETRY_AFTER_S = 5
# An incoming x-request-id is kept when it looks like this (it goes into vLLM's requests and every log line); any
# other is replaced by a fresh one.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class GatewayError(Exception):
    """An error answered to the caller as OpenAI's `{"error": {"message", "type", "param", "code"}}`; every one
    names its code (the README's error tables list them, tests/test_gateway_errors.py checks the two agree)."""

    def __init__(self, status: int, message: str, *, code: str, type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, param=self.param, code=self.code)


def key_matches(sent: str, key: str) -> bool:
    """Whether an Authorization header is `Bearer <key>`, compared in constant time: a wrong key's answer must not
    tell how much of it was right."""
    return hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), f"Bearer {key}".encode())


def request_id(incoming: str | None) -> str:
    """The id of a request: the caller's x-request-id when it is a plain token, else a fresh one."""
    if incoming and _REQUEST_ID_RE.match(incoming):
        return incoming
    return uuid.uuid4().hex


def retry_after() -> dict[str, str]:
    """The header that tells a caller of a 503 or 429 when to try again."""
    return {"Retry-After": str(RETRY_AFTER_S)}


def routing_headers(decision: RouteDecision) -> dict[str, str]:
    """The `x-route-*` headers of an answer to model `auto`: the route a caller can read without the body."""
    headers = {"x-route-expert": decision.expert, "x-route-confidence": f"{decision.confidence:.4f}",
               "x-route-ms": f"{decision.latency_s * 1000:.1f}", "x-route-mode": decision.mode}
    if decision.fallback_reason:
        headers["x-route-fallback"] = decision.fallback_reason
    if decision.router:
        headers["x-route-router"] = decision.router
    return headers


@dataclass
class RequestRecord:
    """What one request's access-log line and metrics say about it, filled in as it is answered: its id, the model
    it named, the expert that answered and the router version that chose it (auto), the routing time."""

    request_id: str
    model: Any = None
    expert: str | None = None
    router: str | None = None
    route_s: float | None = None


@dataclass(frozen=True)
class ImageRef:
    """Where the one image of an `auto` request lives in its messages, and what it points to."""

    message_index: int
    part_index: int
    url: str


@dataclass(frozen=True)
class AutoRequest:
    """A checked `model: auto` chat request: the caller's body, its one image, and whether the turn has text."""

    body: dict[str, Any]
    image: ImageRef
    has_text: bool
    stream: bool


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def parse_auto_request(body: dict[str, Any]) -> AutoRequest:
    """Check an `auto` request: messages whose last user turn carries exactly one image (400 otherwise)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "'messages' must be a non-empty list", param="messages", code="invalid_request")
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise GatewayError(400, "'messages' has no user turn; routing needs a user turn with one image",
                           param="messages", code="invalid_request")
    index = users[-1]
    content = messages[index].get("content")
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}] if isinstance(content, str) else None
    if parts is None:
        raise GatewayError(400, f"messages[{index}].content must be a string or a list of parts", param="messages",
                           code="invalid_request")
    images = [(j, p) for j, p in enumerate(parts) if isinstance(p, dict) and p.get("type") == "image_url"]
    if not images:
        raise GatewayError(400, f"the last user turn (messages[{index}]) has no image: model 'auto' routes a "
                                "screenshot, send one image_url part", param="messages", code="no_image")
    if len(images) > 1:
        raise GatewayError(400, f"the last user turn (messages[{index}]) has {len(images)} images: model 'auto' "
                                "routes exactly one screenshot", param="messages", code="too_many_images")
    part_index, part = images[0]
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise GatewayError(400, f"messages[{index}].content[{part_index}].image_url.url is missing",
                           param="messages", code="invalid_request")
    has_text = any(isinstance(p, dict) and p.get("type") == "text" and str(p.get("text") or "").strip()
                   for p in parts)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(400, f"'stream' must be true or false, got {stream!r}", param="stream",
                           code="invalid_request")
    return AutoRequest(body=body, image=ImageRef(index, part_index, url), has_text=has_text, stream=stream)


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL (400 if it is not one)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise GatewayError(400, "image_url must be a base64 data URL (data:image/png;base64,...)",
                           param="messages", code="invalid_image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise GatewayError(400, "image_url data URL is not valid base64", param="messages",
                           code="invalid_image") from None


def png_as_sent(data: bytes, *, max_pixels: int | None, max_image_pixels: int,
                encoded: str | None = None) -> PreparedImage | None:
    """The caller's PNG as it came, when lora_router.images.prepare_image would not change a pixel of it: 8-bit RGB
    without transparency, within max_pixels and the pixel cap. Its header and every chunk's checksum are checked
    (verify), its pixels not decoded. None when it needs preparing, or fails a check (prepare_image then says why).
    `encoded` is the base64 of `data` as the caller sent it, reused as it is (None: encoded here).
    """
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    try:
        image = open_header(data)
        width, height = image.size
        fits = width * height <= min(max_pixels or max_image_pixels, max_image_pixels)
        if image.mode != "RGB" or "transparency" in image.info or not fits:
            return None
        image.verify()
    except Exception:  # PIL raises many exception types on corrupt data
        return None
    payload = encoded if encoded is not None else base64.b64encode(data).decode("ascii")
    return PreparedImage(data_url="data:image/png;base64," + payload, width=width, height=height, source="<request>")


def check_remote_url(url: str, allowed_hosts: list[str]) -> str:
    """An http(s) image URL whose host is allowed, else 400: fetching any URL a caller names is an SSRF hole."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise GatewayError(400, f"image_url scheme {parts.scheme or '(none)'!r} is not supported; send a data URL",
                           param="messages", code="invalid_image")
    if (parts.hostname or "") not in allowed_hosts:
        raise GatewayError(400, f"image URLs on host {parts.hostname!r} are refused (not in "
                                "gateway.image_url_hosts); send the image as a data URL",
                           param="messages", code="image_url_refused")
    return url


def expert_body(request: AutoRequest, expert: str, data_url: str, default_prompt: str) -> dict[str, Any]:
    """The caller's own request, sent to `expert`: the prepared image in place, the default prompt if no text."""
    body = copy.deepcopy(request.body)
    body["model"] = expert
    message = body["messages"][request.image.message_index]
    message["content"][request.image.part_index] = {"type": "image_url", "image_url": {"url": data_url}}
    if not request.has_text and default_prompt:
        message["content"].append({"type": "text", "text": default_prompt})
    return body


@dataclass(frozen=True)
class AddAdapterRequest:
    """A checked `POST /admin/adapters` body: the expert's public name, its folder and its default prompt."""

    name: str
    path: str
    prompt: str


def _admin_fields(body: dict[str, Any], required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, str]:
    """The string fields of an admin request body, or a 400 naming the first field missing, unknown or not a string."""
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise GatewayError(400, f"unknown field(s) {', '.join(unknown)}; expected {', '.join(required + optional)}",
                           param=unknown[0], code="invalid_request")
    for name in required:
        if not body.get(name):
            raise GatewayError(400, f"'{name}' is missing", param=name, code="invalid_request")
    for name in body:
        if not isinstance(body[name], str):
            raise GatewayError(400, f"'{name}' must be a string, got {body[name]!r}", param=name,
                               code="invalid_request")
    return body


def parse_add_adapter(body: dict[str, Any]) -> AddAdapterRequest:
    """`{"name", "path", "prompt"?}`: an expert to add."""
    fields = _admin_fields(body, ("name", "path"), ("prompt",))
    return AddAdapterRequest(name=fields["name"], path=fields["path"], prompt=fields.get("prompt", ""))


def parse_candidate(body: dict[str, Any]) -> str:
    """`{"path"}`: the folder of a router version to load as the candidate."""
    return _admin_fields(body, ("path",))["path"]


@dataclass(frozen=True)
class Feedback:
    """A checked `POST /v1/feedback` body: the auto request it is about, whether its route was right, and the right
    expert when the caller knows it (only with correct false)."""

    request_id: str
    correct: bool
    expert: str | None


def parse_feedback(body: dict[str, Any], experts: list[str]) -> Feedback:
    """`{"request_id", "correct", "expert"?}`; a 400 naming every problem at once. `experts`: the live router's
    labels, the only right answers there are."""
    problems = []
    unknown = sorted(set(body) - {"request_id", "correct", "expert"})
    if unknown:
        problems.append(f"unknown field(s): {', '.join(unknown)}")
    request = body.get("request_id")
    if not isinstance(request, str) or not _REQUEST_ID_RE.match(request):
        problems.append("request_id must be the x-request-id of an auto request (a string)")
    correct = body.get("correct")
    if not isinstance(correct, bool):
        problems.append("correct must be true or false")
    expert = body.get("expert")
    if expert is not None and (not isinstance(expert, str) or expert not in experts):
        problems.append(f"expert must be one of the router's labels ({', '.join(experts)}), got {expert!r}")
    elif expert is not None and correct is True:
        problems.append("expert is the right expert of a wrong route: send it with correct false")
    if problems:
        raise GatewayError(400, "feedback: " + "; ".join(problems), code="invalid_feedback")
    return Feedback(request_id=request, correct=correct, expert=expert)


# vLLM's own adapter loading routes: only the admin API, after its checks, may load an adapter.
_LORA_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters")


def is_lora_route(path: str) -> bool:
    """Whether a path reaches vLLM's adapter loading (however it is spelled: extra slashes, '.' parts, a prefix)."""
    normal = posixpath.normpath("/" + path.lstrip("/"))
    return any(normal == route or normal.startswith(route + "/") for route in _LORA_ROUTES)


def named_model(raw: bytes) -> tuple[dict[str, Any], str] | None:
    """A forwarded request's JSON object body and the model it names, or None when it has neither."""
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return None
    return body, body["model"]


def with_model(body: dict[str, Any], model: str) -> bytes:
    """The body, re-encoded, naming `model` (a public name's versioned one)."""
    return json.dumps({**body, "model": model}).encode()
