"""lora_router.openai_wire: the requests it builds and the answers it reads, as plain functions."""

from __future__ import annotations

import json
import re

import pytest

from lora_router.openai_wire import (
    ChatCompletion,
    ResponseFormatError,
    TokenLogprob,
    bearer_headers,
    chat_request,
    connect_host,
    error_body,
    error_message,
    read_completion,
    root_url,
    user_turn,
)


def test_user_turn_puts_the_image_before_the_text():
    assert user_turn("data:image/png;base64,AAAA", "Which one?") == {
        "role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                    {"type": "text", "text": "Which one?"}]}


def test_chat_request_is_greedy_and_carries_extra_fields():
    body = chat_request("calendar", [{"role": "user", "content": "hi"}], 8, logprobs=True)
    assert body == {"model": "calendar", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                    "max_tokens": 8, "logprobs": True}


@pytest.mark.parametrize("key, headers", [(None, {}), ("", {}), ("secret", {"Authorization": "Bearer secret"})])
def test_bearer_headers(key, headers):
    assert bearer_headers(key) == headers


def completion(**choice) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "calendar"}, **choice}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 2}}


@pytest.mark.parametrize("case, answer, expected", [
    ("no logprobs", completion(logprobs=None), ChatCompletion("calendar", 50, 2, None)),
    ("logprobs", completion(logprobs={"content": [
        {"token": "cal", "logprob": -0.5, "top_logprobs": [{"token": "cal", "logprob": -0.5},
                                                          {"token": "token_id:7", "logprob": -3}]},
        {"token": "endar", "logprob": 0, "top_logprobs": []}]}),
     ChatCompletion("calendar", 50, 2, [TokenLogprob("cal", -0.5, {"cal": -0.5, "token_id:7": -3.0}),
                                        TokenLogprob("endar", 0.0, {})])),
    ("null content, no usage", {"choices": [{"message": {"content": None}}]}, ChatCompletion("", 0, 0, None)),
])
def test_read_completion(case, answer, expected):
    assert read_completion(answer) == expected


@pytest.mark.parametrize("case, answer, message", [
    ("no choices", {"object": "error"}, "not a chat completion (KeyError: 'choices')"),
    ("empty choices", {"choices": []}, "not a chat completion (IndexError"),
    ("not an object", ["x"], "not a chat completion (TypeError"),
    ("entry without logprob", completion(logprobs={"content": [{"token": "cal"}]}), "logprobs entry without a logprob"),
    ("entry without token", completion(logprobs={"content": [{"logprob": -1}]}), "logprobs entry without a token"),
    ("alternative without logprob", completion(logprobs={"content": [
        {"token": "cal", "logprob": -1, "top_logprobs": [{"token": "x"}]}]}), "logprobs entry without a logprob"),
])
def test_read_completion_refuses_other_shapes(case, answer, message):
    with pytest.raises(ResponseFormatError, match=re.escape(message)):
        read_completion(answer)


@pytest.mark.parametrize("text, message", [
    (json.dumps(error_body("The model `x` does not exist.", "NotFoundError", param="model", code=404)),
     "The model `x` does not exist."),
    ('{"message": "bad api key"}', "bad api key"),
    ('{"detail": "no"}', '{"detail": "no"}'),
    ("Internal Server Error", "Internal Server Error"),
    ("", "(empty body)"),
])
def test_error_message(text, message):
    assert error_message(text) == message


def test_error_body_has_openais_shape():
    assert error_body("no route", "invalid_request_error") == {
        "error": {"message": "no route", "type": "invalid_request_error", "param": None, "code": None}}


@pytest.mark.parametrize("host, connect", [
    ("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "[::1]"), ("::1", "[::1]"), ("fe80::2", "[fe80::2]"),
    ("127.0.0.1", "127.0.0.1"), ("10.0.0.5", "10.0.0.5"), ("vllm.internal", "vllm.internal"),
])
def test_connect_host_and_root_url(host, connect):
    assert connect_host(host) == connect
    assert root_url(host, 8000) == f"http://{connect}:8000"
