"""router_client against a real vLLM CPU server: cache reuse, one-token routing, a server killed mid-batch."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from benchmarks.server_metrics import scrape
from router_client.batch import BatchItem, run_batch
from router_client.client import RouterClient
from router_client.config import ClientConfig
from tests.conftest import deployment, start_server
from training.tasks import build_example

pytestmark = pytest.mark.integration

KINDS = ("calendar", "claim-window", "provider-select")
# The killed batch: screenshots, and how many answered before the kill (some are still in flight then).
ITEMS, KILLED_AFTER = 100, 30


def _client_config(server, **overrides) -> ClientConfig:
    # Random stand-in adapters answer no label: send those routes to an expert so items complete.
    defaults = {"base_url": server.base_url, "fallback": "expert:calendar", "expert_max_tokens": 4}
    return ClientConfig.from_deployment(server.config, **{**defaults, **overrides})


def _screens(tmp_path, count: int, seed: int = 0) -> list[BatchItem]:
    items = []
    for i in range(count):
        example = build_example(KINDS[i % 3], seed * 10_000 + i)
        path = tmp_path / f"screen_{i:04d}.png"
        example.image.save(path)
        items.append(BatchItem(custom_id=path.name, image=path))
    return items


async def _metrics(server) -> dict[str, float]:
    async with aiohttp.ClientSession(headers=server.headers) as session:
        return (await scrape(session, server.root_url)).counters


def test_expert_request_reuses_the_router_requests_vision_encoding(served, tmp_path):
    items = _screens(tmp_path, 12, seed=1)

    async def run():
        before = await _metrics(served)
        summary = await run_batch(_client_config(served), items, tmp_path / "out.jsonl", concurrency=4, progress=False)
        return before, await _metrics(served), summary

    before, after, summary = asyncio.run(run())
    assert summary.ok == 12, summary.table()
    queries = after["vllm:mm_cache_queries_total"] - before["vllm:mm_cache_queries_total"]
    hits = after["vllm:mm_cache_hits_total"] - before["vllm:mm_cache_hits_total"]
    # Two requests per unseen screenshot: the router's misses, the expert's hits.
    assert queries == 24 and 0.45 <= hits / queries <= 0.55, (hits, queries)


def test_one_token_mode_generates_exactly_one_token(served, tmp_path):
    async def run():
        async with RouterClient(_client_config(served, router_mode="one-token")) as client:
            return [await client.route(build_example(k, 500 + i).image) for i, k in enumerate(KINDS)]

    decisions = asyncio.run(run())
    assert all(d.mode == "one-token" and d.completion_tokens == 1 for d in decisions)
    assert all(abs(sum(d.probabilities.values()) - 1) < 1e-6 or d.fallback_reason for d in decisions)


def test_server_killed_mid_batch_then_resumed_loses_and_duplicates_nothing(served, tmp_path, adapters_dir):
    """A batch against a server that dies mid-way, then the same command against the session's server of the same
    deployment (a restarted one behaves alike, only slower to get): every id answered exactly once."""
    items = _screens(tmp_path, ITEMS, seed=2)
    output = tmp_path / "results.jsonl"
    config = deployment(adapters_dir, engine={"port": 0, "kv_cache_gib": 1})
    server = start_server(config, tmp_path / "vllm.log", probe=False)
    try:
        async def run_and_kill():
            cfg = _client_config(server, max_retries=1)
            batch = asyncio.create_task(run_batch(cfg, items, output, concurrency=8, progress=False))
            while not output.exists() or len(output.read_text().splitlines()) < KILLED_AFTER:
                await asyncio.sleep(0.2)
            server.stop()  # the engine dies with work in flight
            return await batch

        first = asyncio.run(run_and_kill())
    finally:
        server.stop()
    assert KILLED_AFTER <= first.ok < ITEMS and first.failed == ITEMS - first.ok
    assert set(first.by_error) <= {"APIConnectionError", "APITimeoutError", "InternalServerError"}, first.by_error

    second = asyncio.run(run_batch(_client_config(served), items, output, concurrency=8, progress=False))
    assert second.skipped == first.ok and second.ok == ITEMS - first.ok and second.failed == 0

    lines = [json.loads(line) for line in output.read_text().splitlines()]
    ok_ids = [line["custom_id"] for line in lines if line["status"] == "ok"]
    assert sorted(ok_ids) == sorted(item.custom_id for item in items)  # every id exactly once, none lost
