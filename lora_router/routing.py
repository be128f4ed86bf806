"""Routing as pure functions: the router request for a prepared image, the router's answer read as label
probabilities, the router mode chosen from the labels' first tokens, and the fallback policy. No I/O: the client
(router_client) and the gateway send the requests built here and pass back what the server answered.

Router modes:
    choice     the answer is constrained to the labels (structured_outputs choice); its confidence is the
               answer's probability, exp(sum of its tokens' log-probabilities).
    one-token  one unconstrained token; vLLM returns the log-probability of each label's first token
               (logprob_token_ids) and the label probabilities are their softmax. The greedy token must be a
               label's first token, else the answer names no label. Needs labels whose first tokens differ.
    auto       (a setting, not a mode) one-token unless two labels share a first token, else choice.

Fallback: an answer that names no label (unknown_label) or a label below min_confidence (low_confidence) runs on
the fallback target (an expert, or the base model's served name), or is refused under fallback 'error'.

Calibration: one-token scores are divided by a temperature before the softmax, and min_confidence defaults to the
threshold that kept held-out routed accuracy at a target; both are fitted by the validators (training.calibration)
and kept in the router's manifest. They describe one-token probabilities: choice mode's answer probability is
not rescaled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lora_router.deployment import DEFAULT_BASE_PROMPT, DEFAULT_ROUTER_MODE, DeploymentConfig
from lora_router.openai_wire import ChatCompletion, ResponseFormatError, chat_request, user_turn
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt

RouterMode = Literal["choice", "one-token"]
FallbackReason = Literal["unknown_label", "low_confidence"]
ROUTER_MODES: tuple[RouterMode, ...] = ("choice", "one-token")
# What a caller may ask for: a router mode, or 'auto'.
MODE_SETTINGS = ("auto", *ROUTER_MODES)
# The deployment's `client:` settings that decide a route default as lora_router.deployment.ClientSettings says;
# min_confidence and temperature, unset there and in the manifest, to these.
DEFAULT_MIN_CONFIDENCE = 0.0
DEFAULT_TEMPERATURE = 1.0


class RoutingConfigError(ValueError):
    """A routing setting that cannot work (router mode, fallback); the message names the setting."""


@dataclass(frozen=True)
class FirstToken:
    """A label's first token as the router's tokenizer writes it: its id and its text."""

    id: int
    text: str


@dataclass(frozen=True)
class RouterAnswer:
    """The router's answer read as labels: its own text, the label it chose (None: it named none) and the label
    probabilities (choice: the chosen label's only; one-token: every label's)."""

    raw: str
    label: str | None
    probabilities: dict[str, float]

    @property
    def confidence(self) -> float:
        """The chosen label's probability; 0 when the answer names no label."""
        return self.probabilities[self.label] if self.label is not None else 0.0


@dataclass(frozen=True)
class RouteDecision:
    """The router's answer for one screenshot, after the fallback policy.

    `expert` is who handles the image: the routed label, or, when `fallback_reason` is set, the fallback
    target (an expert, or the base model's served name). `raw` is the router's own text.
    """

    expert: str
    confidence: float
    probabilities: dict[str, float]
    mode: RouterMode
    latency_s: float
    raw: str
    prompt_tokens: int
    completion_tokens: int
    fallback_reason: FallbackReason | None = None
    router: str | None = None
    """The router version that routed (its versioned name, e.g. router@3f2a9c01b7de), when the gateway routed."""

    def to_wire(self) -> dict[str, Any]:
        """The `routing` object of the gateway's answer to model `auto`."""
        return {"expert": self.expert, "confidence": self.confidence, "probabilities": self.probabilities,
                "mode": self.mode, "router_latency_ms": round(self.latency_s * 1000, 2),
                "fallback_reason": self.fallback_reason, "router_text": self.raw,
                "router_prompt_tokens": self.prompt_tokens, "router_completion_tokens": self.completion_tokens,
                "router": self.router}

    @classmethod
    def from_wire(cls, obj: Any) -> RouteDecision:
        """A `routing` object read back (the client's side of to_wire); ResponseFormatError naming what is off."""
        try:
            return cls(expert=str(obj["expert"]), confidence=float(obj["confidence"]),
                       probabilities={str(k): float(v) for k, v in obj["probabilities"].items()},
                       mode=obj["mode"], latency_s=float(obj["router_latency_ms"]) / 1000, raw=str(obj["router_text"]),
                       prompt_tokens=int(obj["router_prompt_tokens"]),
                       completion_tokens=int(obj["router_completion_tokens"]), fallback_reason=obj["fallback_reason"],
                       router=obj.get("router"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ResponseFormatError(f"no usable routing object ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class RouteRefused:
    """A route that fallback 'error' refuses: why, the router's answer (the label it chose, or its text when it
    named none), that label's confidence, and a message naming them."""

    reason: FallbackReason
    answer: str
    confidence: float
    message: str


def tokenize_request(model: str, label: str) -> dict[str, Any]:
    """The body of POST {server root}/tokenize (vLLM's, not under /v1) asking the router's tokenizer for a label."""
    return {"model": model, "prompt": label, "add_special_tokens": False, "return_token_strs": True}


def read_first_token(answer: Any, label: str) -> FirstToken:
    """A label's first token from vLLM's /tokenize answer; ResponseFormatError if the answer has none."""
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    token_strs = answer.get("token_strs") if isinstance(answer, dict) else None
    if not tokens or not token_strs or len(tokens) != len(token_strs):
        raise ResponseFormatError(f"/tokenize answered {answer!r} for label {label!r}: expected tokens and token_strs")
    return FirstToken(id=tokens[0], text=token_strs[0])


def needs_first_tokens(setting: str) -> bool:
    """Whether a mode setting needs the labels' first tokens (all but 'choice'); RoutingConfigError if unknown."""
    if setting not in MODE_SETTINGS:
        raise RoutingConfigError(f"router mode must be one of {', '.join(MODE_SETTINGS)}, got {setting!r}")
    return setting != "choice"


def one_token_problem(first_tokens: Mapping[str, FirstToken]) -> str | None:
    """Why one-token mode cannot tell these labels apart (two share a first token), or None."""
    seen: dict[int, str] = {}
    for label, token in first_tokens.items():
        if token.id in seen:
            return f"{seen[token.id]!r} and {label!r} both start with token {token.text!r}"
        seen[token.id] = label
    return None


def resolve_mode(setting: str, first_tokens: Mapping[str, FirstToken]) -> RouterMode:
    """The mode a route uses for a mode setting, given each label's first token (unused for 'choice').

    Raises RoutingConfigError for an unknown setting, or for 'one-token' when two labels share a first token.
    """
    if not needs_first_tokens(setting):
        return "choice"
    problem = one_token_problem(first_tokens)
    if problem is not None and setting == "one-token":
        raise RoutingConfigError(f"router mode 'one-token' cannot tell the labels apart: {problem}")
    return "choice" if problem else "one-token"


def router_request(model: str, labels: Sequence[str], image_url: str, mode: RouterMode,
                   first_tokens: Mapping[str, FirstToken]) -> dict[str, Any]:
    """The chat-completions body asking the router `model` which label fits the image (first tokens: one-token)."""
    messages = [{"role": "system", "content": router_system_prompt(labels)}, user_turn(image_url, ROUTER_USER_PROMPT)]
    if mode == "choice":
        # A label is at most one token per byte; one more for the end-of-sequence token.
        return chat_request(model, messages, max(len(label.encode()) for label in labels) + 1, logprobs=True,
                            structured_outputs={"choice": list(labels)})
    # vLLM returns the full-vocabulary log-probability of exactly these ids (as "token_id:N", matched against
    # /tokenize's ids whatever the tokenizer's byte-level spelling), so no label goes unseen.
    return chat_request(model, messages, 1, logprobs=True, return_tokens_as_token_ids=True,
                        logprob_token_ids=[first_tokens[label].id for label in labels])


def read_router_answer(completion: ChatCompletion, mode: RouterMode, labels: Sequence[str],
                       first_tokens: Mapping[str, FirstToken], temperature: float = 1.0) -> RouterAnswer:
    """The router's completion (to a router_request in `mode`) as a label and label probabilities (one-token: the
    softmax of the label scores divided by `temperature`; choice mode's answer probability is left as it is).

    Raises ResponseFormatError when the completion has no logprobs.
    """
    if not completion.logprobs:
        raise ResponseFormatError("router answer has no logprobs (requested with logprobs=true)")
    raw = completion.text
    if mode == "choice":
        label = raw.strip() if raw.strip() in labels else None
        # The constrained decoder may spell a label in several tokens: its probability is their product.
        probabilities = {label: math.exp(sum(t.logprob for t in completion.logprobs))} if label else {}
        return RouterAnswer(raw=raw, label=label, probabilities=probabilities)
    scores = label_scores(completion, labels, first_tokens)
    # Softmax over the labels' first tokens, scores divided by the temperature; a label vLLM did not return gets 0.
    probabilities = dict.fromkeys(labels, 0.0)
    found = {label: score / temperature for label, score in scores.items() if score > -math.inf}
    if found:
        top = max(found.values())
        weights = {label: math.exp(score - top) for label, score in found.items()}
        total = sum(weights.values())
        probabilities.update({label: weight / total for label, weight in weights.items()})
    # The router's own greedy token must start a label; otherwise its answer names no expert.
    greedy = completion.logprobs[0].token
    starts_label = any(greedy == f"token_id:{first_tokens[label].id}" for label in labels)
    label = max(labels, key=probabilities.__getitem__) if starts_label else None
    return RouterAnswer(raw=raw, label=label, probabilities=probabilities)


def label_scores(completion: ChatCompletion, labels: Sequence[str],
                 first_tokens: Mapping[str, FirstToken]) -> dict[str, float]:
    """Each label's score in a one-token answer: its first token's full-vocabulary log-probability at the first
    answer step (-inf when vLLM did not return it). What calibration fits its temperature on.

    Raises ResponseFormatError when the completion has no logprobs.
    """
    if not completion.logprobs:
        raise ResponseFormatError("router answer has no logprobs (requested with logprobs=true)")
    top = completion.logprobs[0].top_logprobs
    return {label: top.get(f"token_id:{first_tokens[label].id}", -math.inf) for label in labels}


def fallback_target(fallback: str, labels: Sequence[str], base_name: str) -> str | None:
    """The model a rejected route runs on under a fallback setting: None for 'error' (refused), base_name for
    'base', the expert for 'expert:<name>'. RoutingConfigError for any other setting or an unknown expert."""
    if fallback == "error":
        return None
    if fallback == "base":
        return base_name
    kind, _, name = fallback.partition(":")
    if kind != "expert" or not name:
        raise RoutingConfigError(f"fallback must be 'error', 'base' or 'expert:<name>', got {fallback!r}")
    if name not in labels:
        raise RoutingConfigError(f"fallback {fallback!r} names no expert (experts: {', '.join(labels)})")
    return name


def fallback_reason(answer: RouterAnswer, min_confidence: float) -> FallbackReason | None:
    """Why the router's answer cannot be used as it is (no label, or a label below min_confidence), or None."""
    if answer.label is None:
        return "unknown_label"
    if answer.confidence < min_confidence:
        return "low_confidence"
    return None


def decide(completion: ChatCompletion, *, mode: RouterMode, labels: Sequence[str],
           first_tokens: Mapping[str, FirstToken], min_confidence: float, fallback_target: str | None,
           latency_s: float, temperature: float = 1.0) -> RouteDecision | RouteRefused:
    """The route for the router's completion: its label, the fallback target when fallback_reason gives a reason,
    or RouteRefused when there is a reason and no target (fallback 'error').

    Raises ResponseFormatError when the completion has no logprobs.
    """
    answer = read_router_answer(completion, mode, labels, first_tokens, temperature)
    reason = fallback_reason(answer, min_confidence)
    if reason is not None and fallback_target is None:
        return _refusal(answer, reason, labels, min_confidence)
    return RouteDecision(expert=answer.label if reason is None else fallback_target, confidence=answer.confidence,
                         probabilities=answer.probabilities, mode=mode, latency_s=latency_s, raw=answer.raw,
                         prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                         fallback_reason=reason)


def _refusal(answer: RouterAnswer, reason: FallbackReason, labels: Sequence[str],
             min_confidence: float) -> RouteRefused:
    if answer.label is None:
        message = f"the router answered {answer.raw!r}, which is no expert (experts: {', '.join(labels)})"
        return RouteRefused(reason=reason, answer=answer.raw, confidence=0.0, message=message)
    message = (f"the router chose {answer.label!r} with confidence {answer.confidence:.3f}, below "
               f"min_confidence {min_confidence}")
    return RouteRefused(reason=reason, answer=answer.label, confidence=answer.confidence, message=message)


@dataclass(frozen=True)
class RoutingPolicy:
    """How one deployment routes: the router, its labels, the mode and the fallback, with the labels' first tokens
    once resolved. The gateway's routing state; a new policy replaces it atomically after a (re)start."""

    router_name: str
    labels: tuple[str, ...]
    mode_setting: str = DEFAULT_ROUTER_MODE
    fallback_target: str | None = None
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    temperature: float = DEFAULT_TEMPERATURE
    base_prompt: str = DEFAULT_BASE_PROMPT
    first_tokens: Mapping[str, FirstToken] = field(default_factory=dict)
    mode: RouterMode = "choice"

    @classmethod
    def of(cls, config: DeploymentConfig, router_name: str | None = None, labels: Sequence[str] | None = None,
           calibration: Mapping[str, Any] | None = None) -> RoutingPolicy:
        """The policy a deployment config states: its router and experts (or the router `router_name`, as vLLM
        serves it, with its `labels`), and its `client:` routing settings; min_confidence and temperature not set
        there come from the router manifest's `calibration` (see calibrated_settings)."""
        if router_name is None and config.router is None:
            raise RoutingConfigError("the deployment has no router adapter: model 'auto' cannot route")
        router_name = router_name or config.router.name
        labels = list(config.labels if labels is None else labels)
        client = config.client
        settings = calibrated_settings(client.min_confidence, client.temperature, calibration)
        return cls(router_name=router_name, labels=tuple(labels), mode_setting=client.router_mode,
                   fallback_target=fallback_target(client.fallback, labels, config.model.served_name),
                   min_confidence=settings["min_confidence"], temperature=settings["temperature"],
                   base_prompt=client.base_prompt)

    async def resolved(self, tokenize: Callable[[dict[str, Any]], Awaitable[Any]]) -> RoutingPolicy:
        """This policy with its mode resolved; `tokenize(body)` answers a /tokenize request (one-token needs it)."""
        if not needs_first_tokens(self.mode_setting):
            return dataclasses.replace(self, mode="choice")
        first = {label: read_first_token(await tokenize(tokenize_request(self.router_name, label)), label)
                 for label in self.labels}
        return dataclasses.replace(self, first_tokens=first, mode=resolve_mode(self.mode_setting, first))

    def request(self, image_url: str) -> dict[str, Any]:
        """The router request for an image."""
        return router_request(self.router_name, self.labels, image_url, self.mode, self.first_tokens)

    def decide(self, completion: ChatCompletion, latency_s: float) -> RouteDecision | RouteRefused:
        """The route for the router's completion under this policy."""
        return decide(completion, mode=self.mode, labels=self.labels, first_tokens=self.first_tokens,
                      min_confidence=self.min_confidence, fallback_target=self.fallback_target, latency_s=latency_s,
                      temperature=self.temperature)


def calibrated_settings(min_confidence: float | None, temperature: float | None,
                        calibration: Mapping[str, Any] | None) -> dict[str, float]:
    """min_confidence and temperature from a deployment's `client:` section (None: unset) and its router manifest's
    calibration: a value the section sets wins; else the manifest's threshold and temperature (the validators'
    --write-calibration fits them on held-out data); else 0 and 1. RoutingConfigError names every bad value."""
    calibration = calibration or {}
    given = {"min_confidence": (min_confidence, calibration.get("threshold"), DEFAULT_MIN_CONFIDENCE),
             "temperature": (temperature, calibration.get("temperature"), DEFAULT_TEMPERATURE)}
    values, problems = {}, []
    for key, (setting, calibrated, default) in given.items():
        value = next((v for v in (setting, calibrated) if v is not None), default)
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            problems.append(f"the router manifest's calibration gives {key} {value!r}, which is no number")
    if not problems and not 0.0 <= values["min_confidence"] <= 1.0:
        problems.append(f"min_confidence must be within 0-1, got {values['min_confidence']}")
    if not problems and values["temperature"] <= 0:
        problems.append(f"temperature must be > 0, got {values['temperature']}")
    if problems:
        raise RoutingConfigError("; ".join(problems))
    return values
