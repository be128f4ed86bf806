"""The routing gateway in front of a real vLLM CPU server, called with the official `openai` client."""

from __future__ import annotations

import asyncio
import base64
import io
import time

import aiohttp
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from lora_router.images import prepare_image
from router_client.client import RouterClient
from router_client.config import ClientConfig
from tests.conftest import EXPERTS, deployment, start_server
from training.tasks import build_example

pytestmark = pytest.mark.integration

KEY = "gw-key"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, adapters_dir):
    """vLLM + gateway; choice routing so every route names a label, small limits to reach 413 and 429."""
    log = tmp_path_factory.mktemp("logs") / "vllm-gateway.log"
    config = deployment(adapters_dir, engine={"port": 0, "kv_cache_gib": 1, "api_key": KEY},
                        gateway={"max_body_mb": 2, "max_image_pixels": 1_000_000, "max_in_flight": 4,
                                 "max_queue": 4},
                        client={"router_mode": "choice"})
    server = start_server(config, log, probe=False)
    yield server
    server.stop()


def _data_url(image: Image.Image) -> str:
    return prepare_image(image).data_url


def _messages(url: str, text: str | None = "Describe this screen.") -> list[dict]:
    content: list[dict] = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)


def _counters(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def _metrics(server) -> dict[tuple, float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(server.root_url + "/metrics") as r:
            return _counters(await r.text())


def test_auto_answers_with_the_expert_the_client_routes_to(gw):
    client = _client(gw)
    cfg = ClientConfig.from_deployment(gw.config, base_url=gw.base_url, router_mode="choice")
    for i, kind in enumerate(EXPERTS):
        image = build_example(kind, 900 + i).image
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=_messages(_data_url(image)), max_tokens=6, temperature=0)
        completion = raw.parse()
        expert = raw.headers["x-route-expert"]

        async def route():
            async with RouterClient(cfg) as rc:
                return await rc.route(image)

        assert expert == asyncio.run(route()).expert
        assert completion.model == expert and expert in EXPERTS
        assert 0 < float(raw.headers["x-route-confidence"]) <= 1 and float(raw.headers["x-route-ms"]) > 0
        routing = completion.model_extra["routing"]
        assert routing["expert"] == expert and routing["mode"] == "choice"
        # The router's own answer and its cost come along, so a gateway-routed batch line records them too.
        assert routing["router_text"] == expert and routing["router_prompt_tokens"] > 0
        assert routing["router_completion_tokens"] >= 1


def test_streaming_yields_the_same_text_as_the_plain_call(gw):
    image_url = _data_url(build_example("calendar", 950).image)

    async def both():
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
        plain = await client.chat.completions.create(model="auto", messages=_messages(image_url), max_tokens=8,
                                                     temperature=0)
        pieces = []
        stream = await client.chat.completions.create(model="auto", messages=_messages(image_url), max_tokens=8,
                                                      temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        return plain.choices[0].message.content, "".join(pieces)

    plain, streamed = asyncio.run(both())
    assert plain and streamed == plain


def test_models_list_auto_and_every_served_model(gw):
    ids = {m.id for m in _client(gw).models.list()}
    assert {"auto", "base", "router", *EXPERTS} <= ids


def test_a_named_expert_through_the_gateway_equals_vllm_directly(gw):
    body = {"model": "calendar", "messages": _messages(_data_url(build_example("calendar", 960).image)),
            "max_tokens": 8, "temperature": 0}
    served = gw.gateway.names.served("calendar")  # vLLM serves the version, callers name the expert

    async def both():
        async with aiohttp.ClientSession() as session:
            async with session.post(gw.base_url + "/chat/completions", json=body, headers=gw.headers) as r:
                via = await r.json()
            async with session.post(gw.upstream_url + "/chat/completions", json={**body, "model": served},
                                    headers=gw.upstream_headers) as r:
                direct = await r.json()
        return via, direct

    via, direct = asyncio.run(both())
    assert via["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert served.startswith("calendar@") and via["model"] == direct["model"] == served


def _png(size) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


GOOD = _png((64, 48))


@pytest.mark.parametrize("case, body, headers, status, words", [
    ("no image", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}, None, 400, "no image"),
    ("two images", {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": GOOD}}, {"type": "image_url", "image_url": {"url": GOOD}}]}]},
     None, 400, "2 images"),
    ("undecodable image", {"model": "auto", "messages": _messages(
        "data:image/png;base64," + base64.b64encode(b"not a png").decode())}, None, 400, "not an image"),
    ("image over the pixel cap", {"model": "auto", "messages": _messages(_png((1200, 1000)))}, None, 400,
     "too many pixels"),
    ("network image URL", {"model": "auto", "messages": _messages("http://169.254.169.254/x.png")}, None, 400,
     "refused"),
    ("malformed body", b"{not json", None, 400, "not valid JSON"),
    ("no key", {"model": "auto", "messages": _messages(GOOD)}, {}, 401, "API key"),
    ("wrong key", {"model": "auto", "messages": _messages(GOOD)}, {"Authorization": "Bearer nope"}, 401,
     "API key"),
    ("unknown model", {"model": "no-such-expert", "messages": _messages(GOOD)}, None, 404, "no-such-expert"),
    ("body over the size cap", {"model": "auto", "messages": _messages(GOOD), "pad": "x" * 3_000_000}, None, 413,
     "limit"),
])
def test_bad_requests_get_their_status_and_a_message_naming_the_problem(gw, case, body, headers, status, words):
    async def send():
        async with aiohttp.ClientSession() as session:
            kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
            async with session.post(gw.base_url + "/chat/completions", **kwargs,
                                    headers=gw.headers if headers is None else headers) as r:
                return r.status, await r.json()

    got, answer = asyncio.run(send())
    assert got == status, answer
    assert set(answer["error"]) >= {"message", "type", "param", "code"}
    assert words in answer["error"]["message"], answer


def test_metrics_count_what_was_sent_per_expert_and_outcome(gw):
    client = _client(gw)
    before = asyncio.run(_metrics(gw))
    experts = []
    for i in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=_messages(_data_url(build_example(EXPERTS[i % 3], 970 + i).image)),
            max_tokens=2, temperature=0)
        experts.append(raw.headers["x-route-expert"])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "no image"}])
    after = asyncio.run(_metrics(gw))

    def delta(expert, outcome):
        key = ("lora_router_gateway_requests_total", (("expert", expert), ("model", "auto"), ("outcome", outcome)))
        return after.get(key, 0) - before.get(key, 0)

    for expert in set(experts):
        assert delta(expert, "ok") == experts.count(expert)
    assert delta("none", "bad_request") == 1


def test_over_the_queue_limit_callers_get_429_with_retry_after(gw):
    body = {"model": "auto", "messages": _messages(GOOD), "max_tokens": 64, "temperature": 0}

    async def burst():
        async with aiohttp.ClientSession(headers=gw.headers) as session:
            async def one():
                async with session.post(gw.base_url + "/chat/completions", json=body) as r:
                    return r.status, r.headers.get("Retry-After")
            return await asyncio.gather(*(one() for _ in range(16)))

    answers = asyncio.run(burst())
    statuses = [s for s, _ in answers]
    assert statuses.count(429) >= 1 and statuses.count(200) >= 8, statuses  # 4 in flight + 4 queued
    assert all(retry for s, retry in answers if s == 429)


def test_a_caller_leaving_mid_stream_cancels_the_upstream_request(gw):
    body = {"model": "auto", "messages": _messages(_data_url(build_example("calendar", 990).image)),
            "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}

    async def running() -> float:
        return sum(v for (name, _), v in (await _metrics(gw)).items() if name == "vllm:num_requests_running")

    async def run():
        async with aiohttp.ClientSession(headers=gw.headers) as session:
            async with session.post(gw.base_url + "/chat/completions", json=body) as r:
                assert r.status == 200
                await r.content.readany()  # the first event: the expert is generating
                during = await running()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if await running() == 0:
                return during, True
            await asyncio.sleep(0.5)
        return during, False

    during, stopped = asyncio.run(run())
    assert during == 1, "the streamed request was not running in vLLM"
    assert stopped, "vLLM still runs the request of a caller that left"
