"""One replica over two nodes, on loopback: a head (`python -m serving`: gateway, vLLM's API server, global rank 0)
and a worker (`python -m serving --headless --start-rank 1`: rank 1, no API server) as two processes standing for
two nodes, tiny default, one engine each. Requests pinned to each global rank answer there; an expert added
through the head's admin API answers on both ranks; killing the worker turns the head's /health to 503 and the
head exits 1 naming the rank, as documented (serving.worker): vLLM does not notice a remote engine that died, so
the head's launcher sends each worker rank a one-token request every few seconds; a replica over nodes restarts
whole.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest
import yaml

from lora_router.images import prepare_image
from serving.launcher import free_port
from tests.conftest import EXPERTS, deployment_data
from tests.test_gateway_integration import _messages
from tests.test_supervisor_integration import MARK, Service, _health
from training.random_adapter import make_random_adapter
from training.tasks import build_example

pytestmark = pytest.mark.integration

ADMIN = "admin-key"
SCREENS = 4
# How often the head sends each worker rank a one-token request, and how long it waits for the answer.
CHECK_EVERY_S, CHECK_TIMEOUT_S = 2.0, 5.0


def _per_engine(text: str, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                engine = s.labels.get("engine", "?")
                out[engine] = out.get(engine, 0) + s.value
    return out


async def _engine_counts(session: aiohttp.ClientSession, head: Service, name: str) -> dict[str, float]:
    async with session.get(head.root_url + "/metrics") as r:
        return _per_engine(await r.text(), name)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


@pytest.fixture(scope="module")
def nodes(tmp_path_factory, adapters_dir, tiny_model_dir):
    """The worker node's process and the head's Service; both ended afterwards, whatever the tests did."""
    folder = tmp_path_factory.mktemp("nodes")
    extra = folder / "extra"
    make_random_adapter(str(tiny_model_dir), extra / "chandra-ocr", seed=9, b_std=0.2)
    data = deployment_data(
        adapters_dir,
        engine={"port": 0, "kv_cache_gib": 1, "cpu_threads": 1, "data_parallel_size": 2, "data_parallel_size_local": 1,
                "data_parallel_address": "127.0.0.1", "data_parallel_rpc_port": free_port(), "max_loras": 5,
                "max_lora_rank": 16, "startup_timeout_s": 600},
        gateway={"admin_api_key": ADMIN, "adapter_dirs": [str(extra)], "rank_check_interval_s": CHECK_EVERY_S,
                 "rank_check_timeout_s": CHECK_TIMEOUT_S}, client={"router_mode": "choice"})
    (folder / "worker").mkdir()
    config = folder / "worker" / "deployment.yaml"
    config.write_text(yaml.safe_dump(data))
    with (folder / "worker" / "serving.err").open("wb") as err:
        worker = subprocess.Popen(
            [sys.executable, "-m", "serving", "--config", str(config), "--headless", "--start-rank", "1", "--log",
             str(folder / "worker" / "vllm.log")], stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, MARK: "worker"})
    (folder / "head").mkdir()
    try:
        head = Service(folder / "head", data)
    except BaseException:
        _end(worker)
        raise
    yield {"worker": worker, "head": head, "extra": extra}
    head.stop()
    _end(worker)


def _end(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_screenshots_one_at_a_time_alternate_between_the_head_s_and_the_worker_s_rank(nodes):
    head: Service = nodes["head"]

    names = ("vllm:request_success_total", "vllm:mm_cache_hits_total")

    async def run():
        async with aiohttp.ClientSession() as session:
            before = [await _engine_counts(session, head, name) for name in names]
            for i in range(SCREENS):
                url = prepare_image(build_example(EXPERTS[i % 3], 3000 + i).image).data_url
                body = {"model": "auto", "messages": _messages(url), "max_tokens": 2, "temperature": 0}
                async with session.post(head.base_url + "/chat/completions", json=body) as r:
                    assert r.status == 200, await r.text()
            return [_delta(await _engine_counts(session, head, name), was) for name, was in zip(names, before)]

    answered, hits = asyncio.run(run())
    # Both stages of each screenshot on one engine, screenshots taking turns: two requests for each of half the
    # screenshots on each global rank (the head's rank checks, one-token text requests, may add to "1").
    assert answered["0"] == SCREENS and answered["1"] >= SCREENS, answered
    # vLLM counts image-cache hits in its front end and files them under whichever engine answers next, so only
    # their sum is exact: every expert request found the image its router request had prepared.
    assert sum(hits.values()) == SCREENS, hits


def test_an_expert_added_through_the_head_answers_on_both_ranks(nodes):
    head: Service = nodes["head"]
    path = str(nodes["extra"] / "chandra-ocr")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    url = prepare_image(build_example("calendar", 3100).image).data_url
    body = {"model": "chandra-ocr", "messages": _messages(url), "max_tokens": 2, "temperature": 0}

    async def run():
        async with aiohttp.ClientSession() as session:
            async with session.post(head.root_url + "/admin/adapters", headers=auth,
                                    json={"name": "chandra-ocr", "path": path}) as r:
                added = r.status, await r.json()
            before = await _engine_counts(session, head, "vllm:request_success_total")
            statuses = []
            for _ in range(2):  # one at a time: idle engines take turns
                async with session.post(head.base_url + "/chat/completions", json=body) as r:
                    statuses.append((r.status, await r.text()))
            return added, statuses, _delta(await _engine_counts(session, head, "vllm:request_success_total"), before)

    (status, added), statuses, answered = asyncio.run(run())
    assert status == 200, added
    assert [s for s, _ in statuses] == [200, 200], statuses
    # One each; the head's rank check (a one-token request to the worker's rank every CHECK_EVERY_S) may add to "1".
    assert answered["0"] == 1 and answered["1"] >= 1, answered


def test_killing_the_worker_turns_the_head_unhealthy_and_ends_it_naming_why(nodes):
    head: Service = nodes["head"]
    worker: subprocess.Popen = nodes["worker"]
    victims = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    for p in victims:  # the node is gone: its processes at once, no clean shutdown
        p.kill()
    started = time.monotonic()

    async def unhealthy():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() - started < 120:
                try:
                    if (await _health(session, head))[0] == 503:
                        return time.monotonic() - started
                except aiohttp.ClientError:  # the head already exited
                    return time.monotonic() - started
                await asyncio.sleep(0.2)
            return None

    seconds = asyncio.run(unhealthy())
    assert seconds is not None, "the head's /health stayed 200 for 2 minutes after its worker died"
    assert seconds <= CHECK_EVERY_S + CHECK_TIMEOUT_S + 5
    code = head.process.wait(timeout=300)
    err = head.stderr()
    assert code == 1, err[-3000:]
    error = [line for line in err.splitlines() if line.startswith("error: ")][-1]
    assert "lost global rank 1 (a worker node's engine)" in error, error
    assert "engines span nodes" in error and "restart the whole replica" in error, error
    assert head.vllm_processes() == []
    print(f"\nworker killed: head unhealthy after {seconds:.1f} s, exited 1: {error[:200]}")
