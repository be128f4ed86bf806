"""A real vLLM CPU server: tiny base model, router and three experts, started from a deployment config."""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_router.openai_wire import chat_request, read_completion, user_turn
from serving.launcher import ServerError, VLLMServer
from serving.probe import probe_image
from tests.conftest import EXPERTS, deployment, start_server

pytestmark = pytest.mark.integration


async def _chat(server: VLLMServer, model: str, image_url: str, text: str = "Describe this screen.",
                headers: dict | None = None) -> tuple[int, dict]:
    body = chat_request(model, [user_turn(image_url, text)], max_tokens=8)
    async with aiohttp.ClientSession(headers=server.headers if headers is None else headers) as session:
        async with session.post(server.base_url + "/chat/completions", json=body) as r:
            return r.status, await r.json()


def test_models_lists_base_and_every_adapter(served):
    async def models():
        async with aiohttp.ClientSession(headers=served.headers) as session:
            async with session.get(served.base_url + "/models") as r:
                return {m["id"] for m in (await r.json())["data"]}

    assert {"base", "router", *EXPERTS} <= asyncio.run(models())


def test_base_model_answers_an_image_request(served):
    status, body = asyncio.run(_chat(served, "base", probe_image(seed=11)))
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] > 300  # 640x480 screenshot = 300 image tokens plus the text
    assert body["choices"][0]["message"]["content"]


def test_each_adapter_answers_by_name_and_differently_from_base(served):
    image = probe_image(seed=12)
    names = ["base", "router", *EXPERTS]

    async def all_answers():
        # One at a time: batch composition changes bf16 rounding, which flips near-tied greedy tokens of a
        # random model, so only answers computed alone compare exactly.
        async with aiohttp.ClientSession(headers=served.headers) as session:
            return [await served.ask(session, n, image, "Describe this screen.") for n in names]

    answers = dict(zip(names, asyncio.run(all_answers())))
    assert all(answers[n].text for n in names)
    # Different greedy text, or different first-token log-probabilities: the adapter changed the model.
    assert not any(answers[n].same_as(answers["base"]) for n in names[1:]), answers


async def _first_token(session: aiohttp.ClientSession, server: VLLMServer, model: str, image_url: str, salt: str,
                       max_tokens: int = 1) -> dict[str, float]:
    """The first token's top-5 log-probabilities of a greedy request straight to vLLM; `salt` keeps vLLM's prefix
    cache from lending one request's KV to another."""
    body = chat_request(server.gateway.names.served(model), [user_turn(image_url, "Describe this screen.")],
                        max_tokens, logprobs=True, top_logprobs=5, ignore_eos=True, cache_salt=salt)
    async with session.post(server.upstream_url + "/chat/completions", json=body, headers=server.upstream_headers) as r:
        assert r.status == 200, await r.text()
        completion = read_completion(await r.json())
    return completion.logprobs[0].top_logprobs


def _gap(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest difference between two top-5 log-probability sets (a token missing from one counts as -30)."""
    return max(abs(a.get(t, -30.0) - b.get(t, -30.0)) for t in a.keys() | b.keys())


def test_base_requests_batched_beside_every_adapter_answer_as_the_base_alone(served):
    """Every LoRA slot of the session's server is in use. vLLM's CPU LoRA ops read a base token's LoRA from the last
    slot, so a base request batched beside adapter requests got the last adapter's answer (and the admin API's probe
    refused good adapters as no-ops); serving/vllm_plugin.py makes them leave base tokens alone."""
    image = probe_image(seed=13)
    names = ["router", *EXPERTS]

    async def running(session: aiohttp.ClientSession) -> float:
        async with session.get(served.root_url + "/metrics") as r:
            text = await r.text()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "vllm:num_requests_running")

    async def answers():
        async with aiohttp.ClientSession() as session:
            # Long adapter requests decode while the base request's prompt is computed: one batch holds them all.
            long = [asyncio.create_task(_first_token(session, served, n, image, f"long-{n}", max_tokens=400))
                    for n in names]
            deadline = time.monotonic() + 60
            while await running(session) < len(names):
                assert time.monotonic() < deadline, "vLLM did not start running the adapter requests"
                await asyncio.sleep(0.02)
            batched = await _first_token(session, served, "base", image, "batched")
            running_meanwhile = sum(not t.done() for t in long)
            await asyncio.gather(*long)
            alone = {n: await _first_token(session, served, n, image, "alone") for n in ["base", *names]}
            return batched, running_meanwhile, alone

    batched, running_meanwhile, alone = asyncio.run(answers())
    assert running_meanwhile == len(names), "the adapter requests ended before the base request was answered"
    nearest = min(_gap(alone[n], alone["base"]) for n in names)
    # Batching moves bf16 rounding a little; an adapter's delta moves the answer far more than that.
    assert _gap(batched, alone["base"]) < nearest / 10, (nearest, _gap(batched, alone["base"]))


@pytest.mark.parametrize("case, headers, status", [
    ("no key", {}, 401),
    ("wrong key", {"Authorization": "Bearer nope"}, 401),
])
def test_requests_without_the_api_key_are_refused(served, case, headers, status):
    got, _ = asyncio.run(_chat(served, "calendar", probe_image(seed=13), headers=headers))
    assert got == status


def test_unknown_adapter_is_a_404_naming_the_model(served):
    status, body = asyncio.run(_chat(served, "no-such-expert", probe_image(seed=14)))
    assert status == 404 and "no-such-expert" in body["error"]["message"]


def test_first_request_after_ready_is_not_a_cold_start(served):
    """The warm-up paid vLLM's first-request cost: request 1 is within 3x the median of the next ten."""
    names = ["router", *EXPERTS]

    async def timed():
        times = []
        for i in range(11):  # unseen images, so no cache flatters the later requests
            start = time.perf_counter()
            status, body = await _chat(served, names[i % len(names)], probe_image(seed=100 + i))
            assert status == 200, body
            times.append(time.perf_counter() - start)
        return times

    times = asyncio.run(timed())
    assert times[0] <= 3 * statistics.median(times[1:]), times


def test_noop_adapter_is_caught_by_the_probe(tmp_path, adapters_dir, tiny_model_dir):
    from training.random_adapter import make_random_adapter

    make_random_adapter(str(tiny_model_dir), tmp_path / "noop", zero_b=True)
    config = deployment(adapters_dir, router=None,
                        experts=[{"name": "calendar", "path": str(adapters_dir / "calendar")},
                                 {"name": "noop", "path": str(tmp_path / "noop")}])
    with pytest.raises(ServerError, match=r"\['noop'\] answer the probe exactly as the base model"):
        start_server(config, tmp_path / "vllm.log")


def test_vllm_dying_at_start_reports_its_own_error(tmp_path):
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no_such_architecture"}')
    config = deployment(tmp_path, model={"path": str(broken), "served_name": "base"}, router=None, experts=[])
    server = VLLMServer(config, log_path=tmp_path / "vllm.log")
    with pytest.raises(ServerError, match="vLLM exited with code") as info:
        asyncio.run(server.start())
    assert "no_such_architecture" in str(info.value)
    assert server.process is None or server.process.poll() is not None
