"""A soak run: the deployment (gateway + vLLM in a process of its own, as `lora-router serve` runs) under a steady
`auto` load for many minutes, with a few bad requests mixed in, watching what grows.

    python -m benchmarks.soak --config configs/tiny-cpu.yaml --minutes 20 [--concurrency 16] [--bad_fraction 0.02]

Records the resident memory of the gateway's process and of vLLM's (all its processes) every few seconds, every
request's status and latency; reports per minute the requests, failed good requests, bad requests not answered with
their 4xx, and the good requests' p50/p99; and, after the warm-up, the memory growth of each (median of the first
minute against the last) and the last minute's p99 against the first's. Writes soak.json, soak.md and soak.png
under benchmarks/results/<stamp>-soak/. Not part of the suite: it runs for as long as it is told.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.server import ServerProcess
from lora_router.configuration import check_types, parse_command, run_command
from lora_router.deployment import DeploymentArguments, DeploymentConfig
from lora_router.images import prepare_image
from lora_router.openai_wire import bearer_headers
from lora_router.percentiles import percentiles
from training.tasks import build_example

log = logging.getLogger(__name__)

JSON_NAME, MARKDOWN_NAME, PNG_NAME = "soak.json", "soak.md", "soak.png"
# Seconds between progress lines in the log.
_PROGRESS_S = 30.0


@dataclass
class SoakConfig:
    """The soak run's settings."""

    minutes: float = field(default=20.0, metadata={"help": "How long the load runs, warm-up included."})
    warmup_minutes: float = field(default=3.0, metadata={
        "help": "Minutes at the start left out of the memory and latency comparisons (caches fill, pools grow; on "
                "2 cores throughput climbed for the first four minutes)."})
    concurrency: int = field(default=16, metadata={"help": "Requests in flight at every moment."})
    bad_fraction: float = field(default=0.02, metadata={
        "help": "Share of requests that are bad on purpose (corrupt image, unknown model, no image, not JSON), each "
                "expected to get its 4xx; spread evenly, not drawn at random."})
    max_tokens: int = field(default=16, metadata={"help": "Longest expert answer per good request."})
    sample_every_s: float = field(default=5.0, metadata={"help": "Seconds between two memory samples."})
    screenshots: int = field(default=64, metadata={"help": "Distinct screenshots the good requests cycle through."})

    def __post_init__(self) -> None:
        check_types(self)
        problems = [f"{name} must be > 0" for name in ("minutes", "sample_every_s")
                    if getattr(self, name) <= 0]
        if not 0 <= self.warmup_minutes < self.minutes - 1:
            problems.append("warmup_minutes must leave at least two minutes to compare")
        if self.concurrency < 1 or self.screenshots < 1 or self.max_tokens < 1:
            problems.append("concurrency, screenshots and max_tokens must be >= 1")
        if not 0 <= self.bad_fraction < 1:
            problems.append("bad_fraction must be in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class BadRequest:
    """A request that must be refused with `status`, and never disturb the good ones."""

    name: str
    body: bytes
    status: int


def bad_requests(auto_model: str, image_url: str) -> list[BadRequest]:
    def chat(model: str, content: list) -> bytes:
        return json.dumps({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}]}).encode()

    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n not a picture").decode()
    return [BadRequest("corrupt image", chat(auto_model, [{"type": "image_url", "image_url": {"url": corrupt}}]), 400),
            BadRequest("unknown model", chat("no-such-expert", [{"type": "image_url", "image_url": {"url": image_url}}]),
                       404),
            BadRequest("no image", chat(auto_model, [{"type": "text", "text": "Which expert?"}]), 400),
            BadRequest("not JSON", b'{"model": "auto", "messages": [', 400)]


@dataclass
class SoakMetrics:
    """What the soak run measured; times in seconds from the start of the load."""

    seconds: float
    requests: list[dict]  # each: start_s, e2e_s, kind ("good" or a bad request's name), status, ok
    memory: list[dict]  # each: t_s, gateway_mb, vllm_mb
    per_minute: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


async def run_soak(deployment: DeploymentConfig, config: SoakConfig, out_dir: Path) -> SoakMetrics:
    """Start the deployment in a child process, load it for config.minutes, stop it; the raw measurements."""
    deployment = dataclasses.replace(deployment, engine=dataclasses.replace(deployment.engine, port=0))
    kinds = [e.name for e in deployment.experts]
    urls = [prepare_image(build_example(kinds[i % len(kinds)], 70_000 + i).image,
                          max_pixels=deployment.engine.max_pixels).data_url for i in range(config.screenshots)]
    good = [json.dumps({"model": deployment.gateway.auto_model, "max_tokens": config.max_tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": u}}]}]}
                       ).encode() for u in urls]
    bad = bad_requests(deployment.gateway.auto_model, urls[0])
    server = ServerProcess(deployment, out_dir / "vllm.log")
    log.info("soak: starting the deployment (gateway and vLLM in a process of their own) ...")
    try:
        served = await server.start()
        return await _load(served.base_url, deployment.engine.api_key, server.pid, good, bad, config)
    finally:
        server.stop()


async def _load(base_url: str, api_key: str | None, server_pid: int, good: list[bytes], bad: list[BadRequest],
                config: SoakConfig) -> SoakMetrics:
    requests: list[dict] = []
    memory: list[dict] = []
    every_bad = round(1 / config.bad_fraction) if config.bad_fraction else 0
    counter = iter(range(10**12))
    t0 = time.time()
    deadline = t0 + config.minutes * 60
    headers = {**bearer_headers(api_key), "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def caller() -> None:
            while time.time() < deadline:
                n = next(counter)
                request = bad[(n // every_bad) % len(bad)] if every_bad and n % every_bad == every_bad - 1 else None
                started = time.time()
                try:
                    async with session.post(base_url + "/chat/completions",
                                            data=request.body if request else good[n % len(good)]) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                requests.append({"start_s": round(started - t0, 3), "e2e_s": round(time.time() - started, 4),
                                 "kind": request.name if request else "good", "status": status,
                                 "ok": status == (request.status if request else 200)})

        async def sampler() -> None:
            last_line = 0.0
            while time.time() < deadline:
                memory.append({"t_s": round(time.time() - t0, 1), **_resident_mb(server_pid)})
                if time.time() - last_line >= _PROGRESS_S:
                    last_line = time.time()
                    failed = sum(1 for r in requests if r["kind"] == "good" and not r["ok"])
                    log.info("soak: %.1f of %g min, %d requests, %d good failed, gateway %.0f MB, vLLM %.0f MB",
                             (time.time() - t0) / 60, config.minutes, len(requests), failed,
                             memory[-1]["gateway_mb"], memory[-1]["vllm_mb"])
                await asyncio.sleep(config.sample_every_s)

        await asyncio.gather(sampler(), *(caller() for _ in range(config.concurrency)))
    return SoakMetrics(seconds=round(time.time() - t0, 1), requests=requests, memory=memory)


def _resident_mb(server_pid: int) -> dict[str, float]:
    """Resident memory of the server's own process (the gateway) and of all it started (vLLM's processes)."""
    import psutil

    def rss(process: psutil.Process) -> int:
        try:
            return process.memory_info().rss
        except psutil.NoSuchProcess:
            return 0

    def name(process: psutil.Process) -> str:
        try:
            return process.name()  # vLLM names its own: VLLM::EngineCore, VLLM::Worker; the API server is python
        except psutil.NoSuchProcess:
            return "gone"

    gateway = psutil.Process(server_pid)
    children = gateway.children(recursive=True)
    by_process: dict[str, float] = {}
    for child in children:
        by_process[name(child)] = by_process.get(name(child), 0.0) + rss(child) / 2**20
    return {"gateway_mb": round(rss(gateway) / 2**20, 1),
            "vllm_mb": round(sum(by_process.values()), 1),
            "vllm_by_process_mb": {k: round(v, 1) for k, v in sorted(by_process.items())}}


def summarize(metrics: SoakMetrics, config: SoakConfig) -> SoakMetrics:
    """Fill per_minute and summary: the per-minute table, and the after-warm-up comparisons."""
    minutes = int(metrics.seconds // 60)
    for minute in range(minutes):
        inside = [r for r in metrics.requests if minute * 60 <= r["start_s"] < (minute + 1) * 60]
        good = [r for r in inside if r["kind"] == "good"]
        latency = percentiles([r["e2e_s"] for r in good if r["ok"]])
        metrics.per_minute.append({
            "minute": minute + 1, "requests": len(inside), "good": len(good),
            "good_failed": sum(1 for r in good if not r["ok"]),
            "bad": len(inside) - len(good), "bad_not_refused_as_expected": sum(
                1 for r in inside if r["kind"] != "good" and not r["ok"]),
            "screenshots_per_s": round(sum(1 for r in good if r["ok"]) / 60, 2),
            "p50_s": latency.p50, "p99_s": latency.p99})
    warm = int(config.warmup_minutes)
    first, last = metrics.per_minute[warm], metrics.per_minute[-1]

    def window(start_s: float, key: str) -> float:
        return statistics.median(s[key] for s in metrics.memory if start_s <= s["t_s"] < start_s + 60)

    growth = {}
    for key in ("gateway_mb", "vllm_mb"):
        before, after = window(warm * 60, key), window(minutes * 60 - 60, key)
        growth[key.removesuffix("_mb")] = {"first_mb": before, "last_mb": after,
                                           "growth_pct": round(100 * (after - before) / before, 2)}
    # Which of vLLM's processes grew, the same way (not a target: where to look when the sum grows).
    names = sorted({n for s in metrics.memory for n in s.get("vllm_by_process_mb", {})})
    by_process = {}
    for n in names:
        def mb(start_s: float, n: str = n) -> float:
            return statistics.median(s["vllm_by_process_mb"].get(n, 0.0) for s in metrics.memory
                                     if start_s <= s["t_s"] < start_s + 60)
        by_process[n] = {"first_mb": mb(warm * 60), "last_mb": mb(minutes * 60 - 60)}
    good_failed = sum(m["good_failed"] for m in metrics.per_minute)
    # Informational beside the one-minute target: a minute's p99 rests on its few slowest requests, so the two
    # halves after the warm-up, each pooled, say whether latency drifted.
    half = warm * 60 + (minutes - warm) * 30
    halves = [percentiles([r["e2e_s"] for r in metrics.requests if r["kind"] == "good" and r["ok"]
                           and lo <= r["start_s"] < hi]).p99 for lo, hi in ((warm * 60, half), (half, minutes * 60))]
    p99_change = (round(100 * (last["p99_s"] - first["p99_s"]) / first["p99_s"], 1)
                  if first["p99_s"] and last["p99_s"] is not None else None)
    metrics.summary = {
        "requests": len(metrics.requests), "good_failed": good_failed,
        "bad": sum(m["bad"] for m in metrics.per_minute),
        "bad_not_refused_as_expected": sum(m["bad_not_refused_as_expected"] for m in metrics.per_minute),
        "memory_growth": growth, "vllm_by_process": by_process, "p99_first_s": first["p99_s"],
        "p99_last_s": last["p99_s"],
        "p99_change_pct": p99_change, "p99_halves_s": halves,
        "targets": {"memory growth <= 5% (gateway and vLLM)": all(g["growth_pct"] <= 5 for g in growth.values()),
                    "0 failed good requests": good_failed == 0,
                    "last minute's p99 within 20% of the first's": p99_change is not None and abs(p99_change) <= 20}}
    return metrics


def markdown(metrics: SoakMetrics, config: SoakConfig) -> str:
    s = metrics.summary
    ms = lambda v: "-" if v is None else f"{v * 1000:.0f}"
    rows = [f"| {m['minute']} | {m['requests']} | {m['good_failed']} | {m['bad']} | {m['bad_not_refused_as_expected']} "
            f"| {m['screenshots_per_s']:.2f} | {ms(m['p50_s'])} | {ms(m['p99_s'])} |" for m in metrics.per_minute]
    growth = s["memory_growth"]
    change = "-" if s["p99_change_pct"] is None else f"{s['p99_change_pct']:+.1f}"
    return "\n".join([
        f"## Soak: {metrics.seconds / 60:.1f} minutes of `auto` load at c={config.concurrency}, "
        f"{100 * config.bad_fraction:g}% bad requests", "",
        "| minute | requests | good failed | bad | bad not refused as expected | screenshots/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"After the {config.warmup_minutes:g}-minute warm-up (median of the first minute against the last): gateway "
        f"{growth['gateway']['first_mb']:.0f} -> {growth['gateway']['last_mb']:.0f} MB "
        f"({growth['gateway']['growth_pct']:+.1f}%), vLLM {growth['vllm']['first_mb']:.0f} -> "
        f"{growth['vllm']['last_mb']:.0f} MB ({growth['vllm']['growth_pct']:+.1f}%); p99 {ms(s['p99_first_s'])} -> "
        f"{ms(s['p99_last_s'])} ms ({change}%). Requests {s['requests']}, failed good "
        f"{s['good_failed']}, bad {s['bad']} (not refused as expected: {s['bad_not_refused_as_expected']}).",
        f"p99 over each half after the warm-up, pooled: {ms(s['p99_halves_s'][0])} -> {ms(s['p99_halves_s'][1])} ms.",
        "vLLM by process: " + ", ".join(f"{n} {g['first_mb']:.0f} -> {g['last_mb']:.0f} MB"
                                        for n, g in s["vllm_by_process"].items()) + ".", "",
        *(f"- {'met' if met else 'MISSED'}: {target}" for target, met in s["targets"].items()), ""])


def plot(metrics: SoakMetrics, config: SoakConfig, path: Path) -> None:
    """Resident memory over time, and the good requests' p50/p99 per minute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lat) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = [s["t_s"] / 60 for s in metrics.memory]
    # Two linear scales: a few percent of growth must show on each, and vLLM's footprint is 50x the gateway's.
    mem.plot(t, [s["vllm_mb"] for s in metrics.memory], color="tab:orange", label="vLLM (all its processes)")
    mem.set_ylabel("vLLM resident memory, MB")
    gateway = mem.twinx()
    gateway.plot(t, [s["gateway_mb"] for s in metrics.memory], color="tab:blue", label="gateway")
    gateway.set_ylabel("gateway resident memory, MB")
    gateway.set_ylim(0, max(s["gateway_mb"] for s in metrics.memory) * 1.5)
    gateway.legend(fontsize=8, loc="center right")
    minutes = [m["minute"] - 0.5 for m in metrics.per_minute]
    for key, label in (("p50_s", "p50"), ("p99_s", "p99")):
        lat.plot(minutes, [m[key] for m in metrics.per_minute], marker="o", label=label)
    lat.set_ylabel("good requests' latency, s")
    lat.set_xlabel("minutes since the load started")
    for ax in (mem, lat):
        ax.axvspan(0, config.warmup_minutes, color="0.9", label="warm-up" if ax is mem else None)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(metrics: SoakMetrics, deployment: DeploymentConfig, config: SoakConfig, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    setup = {"soak": dataclasses.asdict(config), "model": deployment.model.path,
             "experts": [e.name for e in deployment.experts], "router_mode": deployment.client.router_mode}
    # Not every request (tens of thousands): the minutes, the memory samples and the summary say what a soak found.
    kept = {k: v for k, v in dataclasses.asdict(metrics).items() if k != "requests"}
    (out_dir / JSON_NAME).write_text(json.dumps({"setup": setup, **kept}, indent=1) + "\n")
    (out_dir / MARKDOWN_NAME).write_text(markdown(metrics, config))
    plot(metrics, config, out_dir / PNG_NAME)


@dataclass
class SoakArguments(DeploymentArguments):
    """The flags of `python -m benchmarks.soak`."""

    out: Path | None = field(default=None, metadata={
        "help": "Output folder (default: benchmarks/results/<stamp>-soak)."})


def soak(args: SoakArguments, config: SoakConfig) -> int:
    from benchmarks.runner import default_out_dir

    deployment = args.deployment()
    out = args.out or default_out_dir("-soak")
    metrics = summarize(asyncio.run(run_soak(deployment, config, out)), config)
    write_report(metrics, deployment, config, out)
    print(markdown(metrics, config))
    log.info("wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, config = parse_command([SoakArguments, SoakConfig], argv, prog="python -m benchmarks.soak",
                                 description=__doc__, yaml_option=False)
    return run_command(lambda: soak(args, config))


if __name__ == "__main__":
    raise SystemExit(main())
