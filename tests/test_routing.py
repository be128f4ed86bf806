"""lora_router.routing, every branch, as plain functions: no server, no fake server."""

from __future__ import annotations

import math
import re

import pytest

from lora_router.openai_wire import ChatCompletion, ResponseFormatError, TokenLogprob
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from lora_router.routing import (
    FirstToken,
    RouteDecision,
    RouterAnswer,
    RouteRefused,
    RoutingConfigError,
    decide,
    fallback_reason,
    fallback_target,
    needs_first_tokens,
    one_token_problem,
    read_first_token,
    read_router_answer,
    resolve_mode,
    router_request,
    tokenize_request,
)

LABELS = ("calendar", "claim-window", "provider-select")
FIRST = {"calendar": FirstToken(11, "cal"), "claim-window": FirstToken(12, "claim"),
         "provider-select": FirstToken(13, "provider")}
SHARED = {**FIRST, "claim-window": FirstToken(11, "cal")}


def choice_completion(text: str, logprobs: list[float]) -> ChatCompletion:
    tokens = [TokenLogprob(token=f"t{i}", logprob=lp, top_logprobs={}) for i, lp in enumerate(logprobs)]
    return ChatCompletion(text=text, prompt_tokens=50, completion_tokens=len(tokens), logprobs=tokens)


def one_token_completion(greedy: str, text: str, label_logprobs: dict[str, float]) -> ChatCompletion:
    """The greedy token ("token_id:N") and, as vLLM returns for logprob_token_ids, each named label's first token."""
    top = {f"token_id:{FIRST[label].id}": lp for label, lp in label_logprobs.items()}
    greedy_lp = max([-0.5, *label_logprobs.values()])
    return ChatCompletion(text=text, prompt_tokens=50, completion_tokens=1,
                          logprobs=[TokenLogprob(token=greedy, logprob=greedy_lp, top_logprobs=top)])


def softmax(logprobs: dict[str, float]) -> dict[str, float]:
    total = sum(math.exp(lp) for lp in logprobs.values())
    return {label: math.exp(lp) / total for label, lp in logprobs.items()}


@pytest.mark.parametrize("setting, needed", [("auto", True), ("one-token", True), ("choice", False)])
def test_needs_first_tokens(setting, needed):
    assert needs_first_tokens(setting) is needed


@pytest.mark.parametrize("setting, first_tokens, outcome", [
    ("choice", {}, "choice"),
    ("choice", SHARED, "choice"),
    ("auto", FIRST, "one-token"),
    ("auto", SHARED, "choice"),
    ("one-token", FIRST, "one-token"),
    ("one-token", SHARED, "router mode 'one-token' cannot tell the labels apart: 'calendar' and 'claim-window' "
                          "both start with token 'cal'"),
    ("fast", FIRST, "router mode must be one of auto, choice, one-token, got 'fast'"),
])
def test_resolve_mode(setting, first_tokens, outcome):
    if outcome in ("choice", "one-token"):
        assert resolve_mode(setting, first_tokens) == outcome
        return
    with pytest.raises(RoutingConfigError, match=re.escape(outcome)):
        resolve_mode(setting, first_tokens)


@pytest.mark.parametrize("first_tokens, problem", [
    (FIRST, None),
    (SHARED, "'calendar' and 'claim-window' both start with token 'cal'"),
    # Two ids spelled alike are still two tokens: vLLM reports each id's log-probability apart.
    ({**FIRST, "claim-window": FirstToken(99, "cal")}, None),
])
def test_one_token_problem(first_tokens, problem):
    assert one_token_problem(first_tokens) == problem


@pytest.mark.parametrize("answer, token", [
    ({"tokens": [11, 7], "token_strs": ["cal", "endar"]}, FirstToken(11, "cal")),
    ({"tokens": [], "token_strs": []}, None),
    ({"tokens": [11], "token_strs": None}, None),
    ({"tokens": [11, 7], "token_strs": ["cal"]}, None),
    (["not", "a", "dict"], None),
])
def test_read_first_token(answer, token):
    if token is not None:
        assert read_first_token(answer, "calendar") == token
        return
    with pytest.raises(ResponseFormatError, match="/tokenize answered .* for label 'calendar'"):
        read_first_token(answer, "calendar")


def test_tokenize_request_asks_for_the_labels_own_tokens():
    assert tokenize_request("router", "calendar") == {"model": "router", "prompt": "calendar",
                                                      "add_special_tokens": False, "return_token_strs": True}


@pytest.mark.parametrize("mode, extra", [
    ("choice", {"max_tokens": len("provider-select") + 1, "structured_outputs": {"choice": list(LABELS)}}),
    ("one-token", {"max_tokens": 1, "logprob_token_ids": [11, 12, 13], "return_tokens_as_token_ids": True}),
])
def test_router_request(mode, extra):
    body = router_request("router", LABELS, "data:image/png;base64,AAAA", mode, FIRST)
    messages = [{"role": "system", "content": router_system_prompt(LABELS)},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                             {"type": "text", "text": ROUTER_USER_PROMPT}]}]
    assert body == {"model": "router", "messages": messages, "temperature": 0, "logprobs": True, **extra}


@pytest.mark.parametrize("case, mode, completion, label, probabilities", [
    ("choice: a label spelled in two tokens", "choice", choice_completion(" claim-window\n", [-0.1, -0.2]),
     "claim-window", {"claim-window": math.exp(-0.3)}),
    ("choice: no label", "choice", choice_completion("weather", [-0.1]), None, {}),
    ("one-token: greedy token starts a label", "one-token",
     one_token_completion("token_id:12", "claim", {"calendar": -2.0, "claim-window": -1.0, "provider-select": -3.0}),
     "claim-window", softmax({"calendar": -2.0, "claim-window": -1.0, "provider-select": -3.0})),
    ("one-token: a label vLLM did not return gets 0", "one-token",
     one_token_completion("token_id:11", "cal", {"calendar": -1.0, "claim-window": -2.0}),
     "calendar", {**softmax({"calendar": -1.0, "claim-window": -2.0}), "provider-select": 0.0}),
    ("one-token: greedy token starts no label", "one-token",
     one_token_completion("token_id:500", "The", {"calendar": -2.0, "claim-window": -1.0, "provider-select": -3.0}),
     None, softmax({"calendar": -2.0, "claim-window": -1.0, "provider-select": -3.0})),
    ("one-token: no label returned", "one-token", one_token_completion("token_id:500", "The", {}),
     None, dict.fromkeys(LABELS, 0.0)),
])
def test_read_router_answer(case, mode, completion, label, probabilities):
    answer = read_router_answer(completion, mode, LABELS, FIRST)
    assert answer.raw == completion.text and answer.label == label
    assert answer.probabilities == pytest.approx(probabilities)
    assert answer.confidence == pytest.approx(probabilities[label] if label else 0.0)


@pytest.mark.parametrize("logprobs", [None, []])
@pytest.mark.parametrize("mode", ["choice", "one-token"])
def test_read_router_answer_without_logprobs(mode, logprobs):
    completion = ChatCompletion(text="calendar", prompt_tokens=1, completion_tokens=1, logprobs=logprobs)
    with pytest.raises(ResponseFormatError, match="router answer has no logprobs"):
        read_router_answer(completion, mode, LABELS, FIRST)


@pytest.mark.parametrize("fallback, target", [
    ("error", None),
    ("base", "base"),
    ("expert:claim-window", "claim-window"),
    ("expert:weather", "fallback 'expert:weather' names no expert (experts: calendar, claim-window, provider-select)"),
    ("expert:", "fallback must be 'error', 'base' or 'expert:<name>', got 'expert:'"),
    ("retry", "fallback must be 'error', 'base' or 'expert:<name>', got 'retry'"),
])
def test_fallback_target(fallback, target):
    if target is None or target in LABELS or target == "base":
        assert fallback_target(fallback, LABELS, "base") == target
        return
    with pytest.raises(RoutingConfigError, match=re.escape(target)):
        fallback_target(fallback, LABELS, "base")


@pytest.mark.parametrize("answer, min_confidence, reason", [
    (RouterAnswer("calendar", "calendar", {"calendar": 0.9}), 0.0, None),
    (RouterAnswer("calendar", "calendar", {"calendar": 0.9}), 0.9, None),
    (RouterAnswer("calendar", "calendar", {"calendar": 0.9}), 0.95, "low_confidence"),
    (RouterAnswer("weather", None, {}), 0.0, "unknown_label"),
    (RouterAnswer("The", None, dict.fromkeys(LABELS, 0.0)), 0.5, "unknown_label"),
])
def test_fallback_reason(answer, min_confidence, reason):
    assert fallback_reason(answer, min_confidence) == reason


CONFIDENT = choice_completion("calendar", [math.log(0.9)])
UNKNOWN = choice_completion("weather", [-0.1])


@pytest.mark.parametrize("case, completion, min_confidence, target, outcome", [
    ("confident", CONFIDENT, 0.5, None, ("calendar", None)),
    ("confident, a fallback unused", CONFIDENT, 0.5, "base", ("calendar", None)),
    ("unknown, to base", UNKNOWN, 0.0, "base", ("base", "unknown_label")),
    ("unknown, to an expert", UNKNOWN, 0.0, "claim-window", ("claim-window", "unknown_label")),
    ("low, to base", CONFIDENT, 0.95, "base", ("base", "low_confidence")),
    ("low, to an expert", CONFIDENT, 0.95, "provider-select", ("provider-select", "low_confidence")),
    ("unknown, refused", UNKNOWN, 0.0, None,
     RouteRefused("unknown_label", "weather", 0.0, "the router answered 'weather', which is no expert "
                                                   "(experts: calendar, claim-window, provider-select)")),
    ("low, refused", CONFIDENT, 0.95, None,
     RouteRefused("low_confidence", "calendar", pytest.approx(0.9),
                  "the router chose 'calendar' with confidence 0.900, below min_confidence 0.95")),
])
def test_decide(case, completion, min_confidence, target, outcome):
    result = decide(completion, mode="choice", labels=LABELS, first_tokens={}, min_confidence=min_confidence,
                    fallback_target=target, latency_s=0.25)
    if isinstance(outcome, RouteRefused):
        assert result == outcome
        return
    expert, reason = outcome
    assert result == RouteDecision(expert=expert, confidence=pytest.approx(0.9 if completion is CONFIDENT else 0.0),
                                   probabilities=pytest.approx({"calendar": 0.9} if completion is CONFIDENT else {}),
                                   mode="choice", latency_s=0.25, raw=completion.text, prompt_tokens=50,
                                   completion_tokens=1, fallback_reason=reason)
