"""RouterClient against a scripted fake vLLM: retries, timeouts, status errors, fallbacks, router modes,
request shapes, routing through the gateway, and ClientConfig built from the deployment config."""

from __future__ import annotations

import math
import re

import pytest
from PIL import Image

from lora_router.deployment import ConfigError, load_config
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from router_client import _constants
from router_client.client import RouterClient, prepare_image
from router_client.config import ClientConfig
from router_client.errors import (
    APIConnectionError,
    APIResponseError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientConfigError,
    InternalServerError,
    LowConfidenceError,
    NotFoundError,
    RateLimitError,
    UnknownExpertError,
)
from router_client.types import ToolCall
from tests.fake_vllm import LABELS, FakeVLLM, Fault, fake_vllm  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Backoff in milliseconds, so retry tests take no time (Retry-After is still honoured)."""
    monkeypatch.setattr(_constants, "INITIAL_RETRY_DELAY_S", 0.01)
    monkeypatch.setattr(_constants, "MAX_RETRY_DELAY_S", 0.02)


def config(fake: FakeVLLM, **overrides) -> ClientConfig:
    values = dict(base_url=fake.base_url, router_name="router", labels=list(LABELS),
                  expert_prompts={label: f"Do the {label} task." for label in LABELS}, max_retries=2)
    return ClientConfig(**{**values, **overrides})


def screenshot(color=(200, 30, 30), size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, color)


def screenshot_data_url() -> str:
    return prepare_image(screenshot()).data_url


async def test_5xx_then_success_is_retried(fake_vllm):
    fake_vllm.faults.extend([Fault(status=503), Fault(status=500)])
    async with RouterClient(config(fake_vllm)) as client:
        decision = await client.route(screenshot())
    assert decision.expert == "calendar"
    assert len(fake_vllm.chat_requests("router")) == 3
    assert client.stats.retries == 2 and client.stats.routes == 1 and not client.stats.errors


async def test_429_waits_retry_after(fake_vllm):
    fake_vllm.faults.append(Fault(status=429, headers={"Retry-After": "1"}))
    async with RouterClient(config(fake_vllm)) as client:
        decision = await client.route(screenshot())
    first, second = fake_vllm.chat_requests("router")
    assert decision.expert == "calendar" and client.stats.retries == 1
    # The jittered backoff is patched to milliseconds: a second's gap is the server's Retry-After.
    assert second.at - first.at >= 0.9


async def test_stall_past_read_timeout_raises_timeout_after_retries(fake_vllm):
    fake_vllm.faults.extend([Fault(stall_s=3), Fault(stall_s=3)])
    async with RouterClient(config(fake_vllm, read_timeout_s=0.2, max_retries=1)) as client:
        with pytest.raises(APITimeoutError):
            await client.route(screenshot())
    assert len(fake_vllm.chat_requests("router")) == 2
    assert client.stats.retries == 1 and client.stats.errors == {"APITimeoutError": 1}


async def test_connection_reset_is_retried(fake_vllm):
    fake_vllm.faults.append(Fault(reset=True))
    async with RouterClient(config(fake_vllm)) as client:
        decision = await client.route(screenshot())
    assert decision.expert == "calendar"
    assert len(fake_vllm.chat_requests("router")) == 2 and client.stats.retries == 1


async def test_connection_refused_is_an_api_connection_error(fake_vllm):
    async with RouterClient(config(fake_vllm, base_url="http://127.0.0.1:9/v1", router_mode="choice",
                                   max_retries=1)) as client:
        with pytest.raises(APIConnectionError):
            await client.route(screenshot())
    assert client.stats.retries == 1


async def test_400_is_not_retried_and_carries_status_request_id_and_body(fake_vllm):
    fake_vllm.faults.append(Fault(status=400, message="image too large"))
    async with RouterClient(config(fake_vllm)) as client:
        with pytest.raises(BadRequestError) as caught:
            await client.route(screenshot())
    error = caught.value
    assert error.status_code == 400
    assert error.request_id and error.request_id.startswith("req-")
    assert error.body["error"]["message"] == "image too large"
    assert "image too large" in str(error)
    assert len(fake_vllm.chat_requests("router")) == 1 and client.stats.retries == 0


@pytest.mark.parametrize("status, error_class, attempts", [
    (401, AuthenticationError, 1),
    (404, NotFoundError, 1),
    (422, APIStatusError, 1),
    (429, RateLimitError, 3),
    (502, InternalServerError, 3),
])
async def test_status_errors_by_class_and_retry_policy(fake_vllm, status, error_class, attempts):
    fake_vllm.faults.extend([Fault(status=status)] * 3)
    async with RouterClient(config(fake_vllm)) as client:
        with pytest.raises(error_class) as caught:
            await client.route(screenshot())
    assert type(caught.value) is error_class and caught.value.status_code == status
    assert len(fake_vllm.chat_requests("router")) == attempts


async def test_api_key_is_sent_as_bearer(fake_vllm):
    fake_vllm.api_key = "secret"
    async with RouterClient(config(fake_vllm, api_key="secret")) as client:
        await client.route(screenshot())
    assert fake_vllm.chat_requests()[0].headers["Authorization"] == "Bearer secret"
    with pytest.raises(AuthenticationError):  # auto mode asks /tokenize on entry
        async with RouterClient(config(fake_vllm, api_key="wrong")):
            pass


@pytest.mark.parametrize("case, fallback, min_confidence, answer, outcome", [
    ("unknown, error", "error", 0.0, "weather", UnknownExpertError),
    ("unknown, base", "base", 0.0, "weather", "base"),
    ("unknown, expert", "expert:claim-window", 0.0, "weather", "claim-window"),
    ("low, error", "error", 0.95, "calendar", LowConfidenceError),
    ("low, base", "base", 0.95, "calendar", "base"),
    ("low, expert", "expert:provider-select", 0.95, "calendar", "provider-select"),
    ("confident", "base", 0.5, "calendar", "calendar"),
])
async def test_fallback_policy(fake_vllm, case, fallback, min_confidence, answer, outcome):
    fake_vllm.route = lambda png: answer
    fake_vllm.choice_probability = 0.9
    cfg = config(fake_vllm, router_mode="choice", fallback=fallback, min_confidence=min_confidence)
    async with RouterClient(cfg) as client:
        if isinstance(outcome, type):
            with pytest.raises(outcome):
                await client.process(screenshot())
            assert not fake_vllm.chat_requests("base") and len(fake_vllm.chat_requests()) == 1
            assert client.stats.errors == {outcome.__name__: 1}
            return
        result = await client.process(screenshot())
    assert result.decision.expert == outcome and result.result.expert == outcome
    assert result.decision.raw == answer
    expert_request = fake_vllm.chat_requests(outcome)[0]
    prompt = expert_request.body["messages"][-1]["content"][1]["text"]
    if outcome == "calendar":
        assert result.decision.fallback_reason is None and not client.stats.fallbacks
    else:
        reason = "unknown_label" if answer == "weather" else "low_confidence"
        assert result.decision.fallback_reason == reason and client.stats.fallbacks == {reason: 1}
    assert prompt == (cfg.base_prompt if outcome == "base" else f"Do the {outcome} task.")


async def test_choice_mode_request_and_confidence_from_non_canonical_tokens(fake_vllm):
    # The constrained decoder may spell a label in several tokens; confidence is their joint probability.
    fake_vllm.tokens["claim-window"] = ["cl", "aim", "-", "win", "dow"]
    fake_vllm.route = lambda png: "claim-window"
    fake_vllm.choice_probability = 0.8
    async with RouterClient(config(fake_vllm, router_mode="choice")) as client:
        decision = await client.route(screenshot())
    body = fake_vllm.chat_requests("router")[0].body
    assert body["structured_outputs"] == {"choice": list(LABELS)}
    assert body["logprobs"] is True and body["temperature"] == 0
    assert body["max_tokens"] > max(len(label) for label in LABELS)
    assert decision.mode == "choice" and decision.expert == "claim-window"
    assert decision.confidence == pytest.approx(0.8)
    assert decision.probabilities == {"claim-window": pytest.approx(0.8)}
    assert not [r for r in fake_vllm.requests if r.path == "/tokenize"]


async def test_one_token_mode_reads_every_label_from_one_token(fake_vllm):
    # provider-select's first token is far less likely (-30) than the others, yet still counted.
    fake_vllm.first_token_logprobs = {"The": -1.5, "calendar": -2.0, "claim-window": -1.0}
    async with RouterClient(config(fake_vllm, router_mode="one-token")) as client:
        decision = await client.route(screenshot())
    body = fake_vllm.chat_requests("router")[0].body
    assert body["max_tokens"] == 1 and body["logprobs"] is True
    assert sorted(body["logprob_token_ids"]) == sorted(client._first_token_ids.values())
    assert "structured_outputs" not in body
    assert decision.mode == "one-token" and decision.expert == "claim-window"
    assert decision.completion_tokens == 1
    weights = {"calendar": math.exp(-2.0), "claim-window": math.exp(-1.0), "provider-select": math.exp(-30.0)}
    total = sum(weights.values())
    assert decision.confidence == pytest.approx(weights["claim-window"] / total)
    assert decision.probabilities == {k: pytest.approx(w / total) for k, w in weights.items()}


async def test_one_token_mode_low_confidence_names_the_chosen_label(fake_vllm):
    fake_vllm.first_token_logprobs = {"The": -1.5, "calendar": -1.1, "claim-window": -1.0}
    async with RouterClient(config(fake_vllm, router_mode="one-token", min_confidence=0.9)) as client:
        with pytest.raises(LowConfidenceError) as caught:
            await client.route(screenshot())
    assert caught.value.expert == "claim-window" and caught.value.confidence < 0.6


async def test_one_token_mode_whose_greedy_token_starts_no_label_is_unknown(fake_vllm):
    fake_vllm.first_token_logprobs = {"The": -0.1, "calendar": -2.0, "claim-window": -1.0}
    async with RouterClient(config(fake_vllm, router_mode="one-token", fallback="base")) as client:
        decision = await client.route(screenshot())
    assert decision.fallback_reason == "unknown_label" and decision.expert == "base" and decision.raw == "The"


async def test_auto_picks_one_token_when_first_tokens_differ(fake_vllm):
    async with RouterClient(config(fake_vllm, router_mode="auto")) as client:
        assert client.mode == "one-token"
        assert client.first_tokens == {label: label for label in LABELS}
        decision = await client.route(screenshot())
    tokenize = [r.body for r in fake_vllm.requests if r.path == "/tokenize"]
    assert sorted(b["prompt"] for b in tokenize) == sorted(LABELS)
    assert all(b["model"] == "router" and b["add_special_tokens"] is False and b["return_token_strs"] is True
               for b in tokenize)
    assert decision.mode == "one-token"


async def test_auto_picks_choice_when_first_tokens_collide(fake_vllm):
    fake_vllm.tokens.update({"calendar": ["c", "alendar"], "claim-window": ["c", "laim", "-", "window"]})
    async with RouterClient(config(fake_vllm, router_mode="auto")) as client:
        assert client.mode == "choice"
        decision = await client.route(screenshot())
    assert decision.mode == "choice" and "structured_outputs" in fake_vllm.chat_requests("router")[0].body
    with pytest.raises(ClientConfigError, match="both start with token 'c'"):
        async with RouterClient(config(fake_vllm, router_mode="one-token")):
            pass


async def test_process_sends_identical_image_bytes_and_the_trained_prompts(fake_vllm):
    async with RouterClient(config(fake_vllm, router_mode="choice")) as client:
        result = await client.process(screenshot(size=(300, 200)), prompt="Click on March 14, 2026.")
    (router,), (expert,) = fake_vllm.chat_requests("router"), fake_vllm.chat_requests("calendar")
    system, user = router.body["messages"]
    assert system == {"role": "system", "content": router_system_prompt(list(LABELS))}
    assert [part["type"] for part in user["content"]] == ["image_url", "text"]
    assert user["content"][1]["text"] == ROUTER_USER_PROMPT
    (expert_user,) = expert.body["messages"]
    assert [part["type"] for part in expert_user["content"]] == ["image_url", "text"]
    assert expert_user["content"][1]["text"] == "Click on March 14, 2026."
    assert user["content"][0]["image_url"]["url"] == expert_user["content"][0]["image_url"]["url"]
    assert expert.body["temperature"] == 0
    assert result.result.tool_call == ToolCall("click", {"x": 10, "y": 20})
    assert result.timings.total_s >= result.timings.route_s + result.timings.expert_s


async def test_run_expert_adds_extra_body_fields_to_the_request(fake_vllm):
    async with RouterClient(config(fake_vllm)) as client:
        await client.run_expert("calendar", screenshot(), max_tokens=7, extra_body={"ignore_eos": True})
        await client.run_expert("calendar", screenshot(), max_tokens=7)
    with_extra, without = fake_vllm.chat_requests("calendar")
    assert with_extra.body["ignore_eos"] is True and with_extra.body["max_tokens"] == 7
    assert "ignore_eos" not in without.body and without.body["max_tokens"] == 7


async def test_process_via_gateway_is_one_auto_request_read_into_the_same_result(fake_vllm):
    fake_vllm.route = lambda png: "claim-window"
    fake_vllm.faults.append(Fault(stall_s=0.01))  # a call longer than the route the fake reports (1.5 ms)
    async with RouterClient(config(fake_vllm, router_mode="choice")) as client:
        result = await client.process_via_gateway(screenshot(), "Click on Ann.")
        default = await client.process_via_gateway(screenshot())
    assert [r.body["model"] for r in fake_vllm.chat_requests()] == ["auto", "auto"]
    with_prompt, without = (r.body["messages"] for r in fake_vllm.chat_requests())
    assert with_prompt[-1]["content"][1] == {"type": "text", "text": "Click on Ann."}
    # No text part: the gateway adds the routed expert's default prompt.
    assert [part["type"] for part in without[-1]["content"]] == ["image_url"]
    decision = result.decision
    assert (decision.expert, decision.confidence, decision.mode, decision.fallback_reason) == (
        "claim-window", 0.9, "choice", None)
    assert decision.probabilities == {"claim-window": 0.9} and decision.latency_s == pytest.approx(0.0015)
    assert (decision.raw, decision.prompt_tokens, decision.completion_tokens) == ("claim-window", 90, 1)
    assert result.result.expert == "claim-window" and result.result.tool_call == ToolCall("click", {"x": 10, "y": 20})
    assert result.result.completion_tokens == 3 and default.decision.expert == "claim-window"
    assert result.timings.total_s >= result.timings.route_s + result.timings.expert_s
    assert client.stats.routes == 2 and not client.stats.errors


async def test_process_via_gateway_names_a_server_that_is_no_gateway(fake_vllm):
    fake_vllm.auto_model = None
    async with RouterClient(config(fake_vllm, router_mode="choice")) as client:
        with pytest.raises(NotFoundError, match="auto"):
            await client.process_via_gateway(screenshot())
        # A server that answers `auto` as a plain model: no routing object to read.
        fake_vllm.models = (*fake_vllm.models, "auto")
        with pytest.raises(APIResponseError, match="no usable routing object.*routing gateway"):
            await client.process_via_gateway(screenshot())
    assert client.stats.errors == {"NotFoundError": 1, "APIResponseError": 1}


async def test_chat_completion_sends_the_body_as_is_and_keeps_status_and_headers(fake_vllm):
    body = {"model": "calendar", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": screenshot_data_url()}}]}], "max_tokens": 5, "seed": 7}
    async with RouterClient(config(fake_vllm, router_mode="choice")) as client:
        answer = await client.chat_completion(body)
        with pytest.raises(NotFoundError) as caught:
            await client.chat_completion({**body, "model": "weather"})
    assert fake_vllm.chat_requests()[0].body == body
    assert answer.status_code == 200 and answer.body["model"] == "calendar"
    assert answer.request_id == "req-1" and answer.headers["X-Request-ID"] == "req-1"
    assert caught.value.status_code == 404 and caught.value.request_id == "req-2"


async def test_unknown_expert_fails_before_any_request(fake_vllm):
    async with RouterClient(config(fake_vllm, router_mode="choice")) as client:
        with pytest.raises(UnknownExpertError, match="weather"):
            await client.run_expert("weather", screenshot())
    assert not fake_vllm.requests


@pytest.mark.parametrize("text, expected", [
    ('{"name": "click", "arguments": {"x": 1, "y": 2}}', ToolCall("click", {"x": 1, "y": 2})),
    ('<tool_call>{"name": "click", "arguments": "{\\"x\\": 1}"}</tool_call>', ToolCall("click", {"x": 1})),
    ('```json\n{"name": "type", "arguments": {}}\n```', ToolCall("type", {})),
    ('{"claimant": "Ann Lee"}', None),
    ("Click on the day.", None),
])
def test_tool_call_parsing(text, expected):
    assert ToolCall.parse(text) == expected


def test_client_config_from_deployment():
    dep = load_config("configs/tiny-cpu.yaml")
    cfg = ClientConfig.from_deployment(dep, base_url="http://10.0.0.5:8000/v1", min_confidence=0.5)
    assert cfg.labels == dep.labels and cfg.router_name == dep.router.name
    assert cfg.base_name == dep.model.served_name
    assert cfg.expert_prompts == {e.name: e.prompt for e in dep.experts}
    assert cfg.server_root == "http://10.0.0.5:8000" and cfg.min_confidence == 0.5
    assert cfg.auto_model == dep.gateway.auto_model == "auto"
    assert ClientConfig.from_deployment(dep).base_url == "http://127.0.0.1:8000/v1"
    assert RouterClient(cfg).config is cfg
    wildcard = load_config("configs/tiny-cpu.yaml", ["engine.host=0.0.0.0", "engine.port=8123"])
    assert ClientConfig.from_deployment(wildcard).base_url == "http://127.0.0.1:8123/v1"


@pytest.mark.parametrize("overrides, message", [
    ({"nope": 1}, "unknown ClientConfig field(s): nope"),
    ({"fallback": "expert:weather"}, "names no expert"),
    ({"router_mode": "fast"}, "router_mode must be one of"),
    ({"min_confidence": 2}, "min_confidence must be within 0-1"),
    ({"base_url": "localhost:8000"}, "base_url must start with http"),
])
def test_client_config_errors(overrides, message):
    dep = load_config("configs/tiny-cpu.yaml")
    with pytest.raises(ClientConfigError, match=re.escape(message)):
        ClientConfig.from_deployment(dep, **overrides)


@pytest.mark.parametrize("setting, message", [
    ("client.retries=3", "unknown key(s) in client: retries"),
    ("client.labels=[a]", "unknown key(s) in client: labels"),
    ("client.fallback=expert:weather", "client.fallback 'expert:weather' names no expert"),
    ("client.router_mode=fast", "client.router_mode must be one of"),
    ("client.min_confidence=high", "client.min_confidence must be a number"),
])
def test_a_bad_client_section_is_refused_when_the_deployment_loads(setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/tiny-cpu.yaml", [setting])


def test_the_client_section_reaches_the_client_config():
    engine = "engine.max_pixels=5000"
    cfg = ClientConfig.from_deployment(load_config("configs/tiny-cpu.yaml", [engine, "client.timeout_s=7",
                                                                             "client.max_pixels=1000"]))
    assert (cfg.timeout_s, cfg.max_pixels) == (7.0, 1000)  # the section wins over what the engine section implies
    assert ClientConfig.from_deployment(load_config("configs/tiny-cpu.yaml", [engine])).max_pixels == 5000


def test_port_zero_needs_base_url():
    dep = load_config("configs/tiny-cpu.yaml", ["engine.port=0"])
    with pytest.raises(ClientConfigError, match="pass base_url"):
        ClientConfig.from_deployment(dep)
    assert ClientConfig.from_deployment(dep, base_url="http://127.0.0.1:5000/v1").base_url.endswith(":5000/v1")
