"""Where a route's time goes: router-request variants sent one at a time (and a few at concurrency 16), each on
screenshots the server has not seen, timed by the client and by vLLM's per-request histograms.

    python -m benchmarks.route_profile --config configs/tiny-cpu.yaml [--requests 24] [--out DIR]

Variants at concurrency 1, each taking one cost out of the router request as lora_router.routing builds it:
    one-token               the request itself (one token, the labels' first-token log-probabilities)
    choice                  choice mode (structured outputs, a few tokens)
    one-token, no logprobs  without logprobs: what asking for the labels' log-probabilities costs
    one-token, no image     the router's prompt without its image: what the image costs (decode, processor,
                            vision encoder, its tokens in the prefill)
    one-token, seen image   the first variant's images again: every cache hits (multimodal inputs, prefix KV), so
                            what is left is HTTP, the API server and one engine step
    one-token, model size   the image already at the size vLLM's processor resizes it to: its decode and resize
    expert, one token       an expert request (the task prompt, no system prompt) with max_tokens 1
At concurrency 16: one-token and choice, twice each, alternating (a difference between two runs of one mode is
order, not mode).

In this process, on the same images: PNG decode and the HF image processor (the API server's image work; this
process shares the machine with vLLM, so it is an estimate). Writes route_profile.json: the setup, and per variant
client p50/p90/p99 and vLLM's mean queue / prefill / decode / end-to-end seconds; the server's log goes to
route_profile_vllm.log, so it can share a folder with a benchmark run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks import environment
from benchmarks.metrics import server_ttft
from benchmarks.pool import BenchItem, ScreenPool
from benchmarks.runner import default_out_dir
from benchmarks.server_metrics import TIMINGS, scrape
from lora_router.configuration import parse_command, run_command
from lora_router.deployment import DeploymentArguments, DeploymentConfig
from lora_router.images import PreparedImage, prepare_image
from lora_router.openai_wire import bearer_headers, chat_request, read_completion, user_turn
from lora_router.percentiles import Percentiles, percentiles
from lora_router.routing import RoutingPolicy, router_request
from serving.launcher import ServerError, VLLMServer
from training.inference import load_processor, pixel_limits
from training.tasks import build_example
from training.tiny_model import resolve_base_model

log = logging.getLogger(__name__)
FILE = "route_profile.json"


@dataclass
class ProfileArguments(DeploymentArguments):
    """The flags of `python -m benchmarks.route_profile`."""

    out: Path | None = field(default=None, metadata={"help": "Folder for route_profile.json (default: "
                                                             "benchmarks/results/<time>/)."})
    requests: int = field(default=24, metadata={"help": "Screenshots per variant at concurrency 1."})
    burst_requests: int = field(default=64, metadata={"help": "Screenshots per run at concurrency 16 (0: none)."})
    seed: int = field(default=1, metadata={"help": "Screenshot seed (the benchmark's default is 0)."})


@dataclass
class VariantMetrics:
    """One variant's requests: the client's latency, vLLM's mean per-request timings, tokens and cache hits."""

    name: str
    concurrency: int
    requests: int
    failed: int
    requests_per_s: float
    client_s: Percentiles
    server_means_s: dict[str, float]
    ttft_s: Percentiles
    mean_prompt_tokens: float | None
    mean_completion_tokens: float | None
    mm_cache_hit_rate: float | None
    prefix_cache_hit_rate: float | None


@dataclass
class LocalTimings:
    """The API server's image work redone in this process on the variants' images."""

    threads: int
    png_bytes_mean: float
    png_decode_s: Percentiles
    hf_image_processor_s: Percentiles


@dataclass
class ProfileResult:
    setup: dict[str, Any]
    local: LocalTimings
    variants: list[VariantMetrics]


Body = Callable[[BenchItem], dict[str, Any]]


async def run_variant(session: aiohttp.ClientSession, url: str, root: str, name: str, items: Sequence[BenchItem],
                      body: Body, concurrency: int) -> VariantMetrics:
    """Send body(item) for every item, `concurrency` at a time; vLLM's /metrics difference over them."""
    latencies: list[float] = []
    prompt_tokens: list[int] = []
    completion_tokens: list[int] = []
    failed = 0
    queue = iter(items)

    async def worker() -> None:
        nonlocal failed
        for item in queue:
            start = time.perf_counter()
            async with session.post(url, json=body(item)) as response:
                data = await response.read()
                if response.status != 200:
                    failed += 1
                    log.warning("%s: %s %s", name, response.status, data[:200])
                    continue
            latencies.append(time.perf_counter() - start)
            completion = read_completion(json.loads(data))
            prompt_tokens.append(completion.prompt_tokens)
            completion_tokens.append(completion.completion_tokens)

    before = await scrape(session, root)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = time.perf_counter() - start
    server = (await scrape(session, root)).minus(before)
    metrics = VariantMetrics(
        name=name, concurrency=concurrency, requests=len(items), failed=failed,
        requests_per_s=len(latencies) / duration, client_s=percentiles(latencies), server_means_s=server.means(),
        ttft_s=server_ttft(server), mean_prompt_tokens=float(np.mean(prompt_tokens)) if prompt_tokens else None,
        mean_completion_tokens=float(np.mean(completion_tokens)) if completion_tokens else None,
        mm_cache_hit_rate=server.ratio("vllm:mm_cache_hits_total", "vllm:mm_cache_queries_total"),
        prefix_cache_hit_rate=server.ratio("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"))
    means = metrics.server_means_s
    log.info("%-24s c=%-2d %5.1f/s  client p50 %5.1f ms  vLLM e2e %5.1f queue %4.1f prefill %5.1f decode %5.1f ms",
             name, concurrency, metrics.requests_per_s, (metrics.client_s.p50 or 0) * 1000,
             *(means.get(t, float("nan")) * 1000 for t in TIMINGS))
    return metrics


def _at_model_size(item: BenchItem, size: tuple[int, int], resample: int) -> BenchItem:
    """The screenshot resized (as the processor would) to the size vLLM's processor gives it."""
    image = build_example(item.kind, item.seed).image.convert("RGB").resize(size, resample)
    prepared = prepare_image(image)
    return dataclasses.replace(item, image=prepared, router_image=prepared)


def local_timings(images: Sequence[PreparedImage], image_processor, threads: int) -> LocalTimings:
    """PNG decode and the HF image processor, as vLLM's API server runs them (on `threads` torch threads: its
    OMP_NUM_THREADS; more threads than free cores made it 10x slower here), on these images."""
    import torch
    from PIL import Image

    torch.set_num_threads(threads)
    sizes, decode, process = [], [], []
    for prepared in images:
        data = prepared.png
        start = time.perf_counter()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        decode.append(time.perf_counter() - start)
        start = time.perf_counter()
        image_processor(images=[image], return_tensors="pt")
        process.append(time.perf_counter() - start)
        sizes.append(len(data))
    return LocalTimings(threads, float(np.mean(sizes)), percentiles(decode), percentiles(process))


async def profile(args: ProfileArguments, deployment: DeploymentConfig, out_dir: Path) -> ProfileResult:
    model_dir = resolve_base_model(deployment.model.path)
    processor = load_processor(model_dir)
    tokenizer = processor.tokenizer
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    low, high = pixel_limits(processor)
    low, high = deployment.engine.min_pixels or low, deployment.engine.max_pixels or high
    pool = ScreenPool(args.seed, {"calendar": 27.0, "claim-window": 3000.0, "provider-select": 3000.0},
                      image_max_pixels=deployment.engine.max_pixels, router_max_pixels=high,
                      expert_max_tokens=None,
                      answer_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                      image_tokens=lambda w, h: 0)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    server = VLLMServer(dataclasses.replace(deployment, engine=dataclasses.replace(deployment.engine, port=0)),
                        log_path=out_dir / "route_profile_vllm.log")
    log.info("starting vLLM ...")
    await server.start()
    try:
        root, url = server.upstream_root, server.upstream_url + "/chat/completions"
        async with aiohttp.ClientSession(headers=bearer_headers(server.upstream_key)) as session:
            async def tokenize(body: dict[str, Any]) -> Any:
                async with session.post(root + "/tokenize", json=body) as response:
                    return await response.json()

            names = server.adapters.public_names()  # vLLM serves versioned names
            policy = await RoutingPolicy.of(deployment, router_name=names[deployment.router.name]).resolved(tokenize)

            def one_token(item: BenchItem) -> dict[str, Any]:
                return router_request(policy.router_name, policy.labels, item.router_image.data_url, "one-token",
                                      policy.first_tokens)

            def choice(item: BenchItem) -> dict[str, Any]:
                return router_request(policy.router_name, policy.labels, item.router_image.data_url, "choice", {})

            def no_logprobs(item: BenchItem) -> dict[str, Any]:
                body = one_token(item)
                for key in ("logprobs", "logprob_token_ids", "return_tokens_as_token_ids"):
                    body.pop(key)
                return body

            def no_image(item: BenchItem) -> dict[str, Any]:
                body = one_token(item)
                body["messages"][-1]["content"] = body["messages"][-1]["content"][1:]  # the text part only
                return body

            def expert(item: BenchItem) -> dict[str, Any]:
                return chat_request(names[item.kind], [user_turn(item.image.data_url, item.prompt)], 1)

            def model_size(item: BenchItem) -> BenchItem:
                w, h = item.image.width, item.image.height
                rh, rw = smart_resize(h, w, factor=factor, min_pixels=low, max_pixels=high)
                return _at_model_size(item, (rw, rh), image_processor.resample)

            # Warm-up: every body kind once, at both concurrencies, unmeasured.
            for body in (one_token, choice, no_logprobs, no_image, expert):
                await run_variant(session, url, root, "warm-up", pool.take(16), body, 16)
            n = args.requests
            first_items = pool.take(n)
            variants = [await run_variant(session, url, root, "one-token", first_items, one_token, 1)]
            variants.append(await run_variant(session, url, root, "choice", pool.take(n), choice, 1))
            variants.append(await run_variant(session, url, root, "one-token, no logprobs", pool.take(n),
                                              no_logprobs, 1))
            variants.append(await run_variant(session, url, root, "one-token, no image", pool.take(n), no_image, 1))
            variants.append(await run_variant(session, url, root, "one-token, seen image", first_items, one_token,
                                              1))
            variants.append(await run_variant(session, url, root, "one-token, model size",
                                              [model_size(i) for i in pool.take(n)], one_token, 1))
            variants.append(await run_variant(session, url, root, "expert, one token", pool.take(n), expert, 1))
            if args.burst_requests:
                for name, body in (("one-token", one_token), ("choice", choice)) * 2:
                    variants.append(await run_variant(session, url, root, name, pool.take(args.burst_requests),
                                                      body, 16))
    finally:
        server.stop()
    local = local_timings([i.image for i in first_items], image_processor,
                          int(server.command.env.get("OMP_NUM_THREADS", "1")))
    log.info("in this process: PNG %.0f KB, decode p50 %.1f ms, HF image processor p50 %.1f ms",
             local.png_bytes_mean / 1000, local.png_decode_s.p50 * 1000, local.hf_image_processor_s.p50 * 1000)
    setup = {"config_path": args.config, "deployment": environment.deployment_dict(deployment),
             "model_dir": model_dir, "versions": environment.versions(),
             "machine": environment.machine(deployment.engine.device), "requests": args.requests,
             "burst_requests": args.burst_requests, "seed": args.seed, "server_argv": server.command.argv,
             "server_env": server.command.env}
    return ProfileResult(setup=setup, local=local, variants=variants)


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(ProfileArguments, argv, prog="python -m benchmarks.route_profile", description=__doc__,
                            yaml_option=False)

    def work() -> int:
        out_dir = args.out or default_out_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        result = asyncio.run(profile(args, args.deployment(), out_dir))
        (out_dir / FILE).write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str) + "\n")
        print(f"profile: {out_dir / FILE}")
        return 0

    return run_command(work, runtime_errors=(ServerError,))


if __name__ == "__main__":
    raise SystemExit(main())
