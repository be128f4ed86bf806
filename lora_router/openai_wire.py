"""The OpenAI chat-completions wire format as vLLM speaks it: the one place that builds requests and reads answers.

Requests: the user turn with an image, a greedy request body, the bearer Authorization header. Answers: a chat
completion's text, usage and per-token log-probabilities as typed values, and an error body's message. Errors in
OpenAI's shape (error_body) for a server of our own, and the URL a client reaches a server on (root_url).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


class ResponseFormatError(ValueError):
    """An answer that is not the OpenAI shape expected; the message says what is missing."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text (or "token_id:N"), log-probability, and the alternatives' log-probabilities."""

    token: str
    logprob: float
    top_logprobs: dict[str, float]


@dataclass(frozen=True)
class ChatCompletion:
    """The first choice of a chat completion: its text, the request's token usage, and its logprobs content
    (None unless the request asked for logprobs)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None


def user_turn(image_url: str, text: str) -> dict[str, Any]:
    """The user message with one image (a URL or data URL) and a text."""
    # Image part before the text part: training renders "<image>\n<text>".
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                        {"type": "text", "text": text}]}


def chat_request(model: str, messages: list[dict[str, Any]], max_tokens: int, **options: Any) -> dict[str, Any]:
    """A greedy (temperature 0) chat-completions body; `options` adds vLLM's extra fields (logprobs, ...)."""
    return {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, **options}


def bearer_headers(api_key: str | None) -> dict[str, str]:
    """The Authorization header for an API key; none without a key."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def read_completion(answer: Any) -> ChatCompletion:
    """The first choice of a chat completion (a decoded JSON body); ResponseFormatError if it is none."""
    try:
        choice = answer["choices"][0]
        text = choice["message"].get("content") or ""
        usage = answer.get("usage") or {}
        content = (choice.get("logprobs") or {}).get("content")
        prompt_tokens, completion_tokens = int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise ResponseFormatError(f"not a chat completion ({type(exc).__name__}: {exc}): {str(answer)[:200]}") from None
    logprobs = None if content is None else [_token_logprob(entry) for entry in content]
    return ChatCompletion(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          logprobs=logprobs)


def _token_logprob(entry: Any) -> TokenLogprob:
    token, logprob = _token_and_logprob(entry)
    top = entry.get("top_logprobs") or []
    if not isinstance(top, list):
        raise ResponseFormatError(f"logprobs entry whose top_logprobs is no list: {entry!r}")
    return TokenLogprob(token=token, logprob=logprob, top_logprobs=dict(map(_token_and_logprob, top)))


def _token_and_logprob(entry: Any) -> tuple[str, float]:
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        raise ResponseFormatError(f"logprobs entry without a token: {entry!r}")
    value = entry.get("logprob")
    if not isinstance(value, (int, float)):
        raise ResponseFormatError(f"logprobs entry without a logprob: {entry!r}")
    return entry["token"], float(value)


def error_message(text: str) -> str:
    """The message of an error answer's body: vLLM's {"error": {"message": ...}} or {"message": ...}, else the
    start of the body."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if body.get("message"):
            return str(body["message"])
    return text[:500] or "(empty body)"


def error_param(text: str) -> str | None:
    """The `param` of an error answer's body in OpenAI's shape (the field at fault, e.g. "model"), or None."""
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return None
    param = error.get("param") if isinstance(error, dict) else None
    return param if isinstance(param, str) else None


def error_body(message: str, error_type: str, *, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    """An error answer in OpenAI's shape, e.g. error_body("no expert 'x'", "invalid_request_error", param="model")."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def connect_host(host: str) -> str:
    """The address a client connects to for a server bound to `host`, as a URL writes it: a wildcard bind
    ('0.0.0.0', '', '::') is reached on loopback, an IPv6 literal is bracketed."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def root_url(host: str, port: int) -> str:
    """The root URL (where /health, /tokenize and /metrics live) of a server bound to host:port; the OpenAI API
    is under root_url + "/v1"."""
    return f"http://{connect_host(host)}:{port}"
