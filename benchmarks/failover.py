"""The failover phase: two replicas of the deployment (each gateway + vLLM in a process of its own, as
`lora-router serve` runs) behind the shipped balancer, a steady `auto` load at one concurrency, and replica B's vLLM
killed (SIGKILL) mid-run; B's launcher restarts it and the balancer takes B back once it is warm.

    python -m benchmarks.failover --config configs/tiny-cpu.yaml [--failover_window_s 20] [--failover_concurrency 8]

Screenshots/s, failed requests and latency p50/p90/p99 before the kill, during (the kill until the balancer has B
back) and after; when the balancer's own health check marked B down and up; a timeline plot. `benchmarks.load`
runs it as its last phase; alone it writes failover.json, failover.md and failover.png under
benchmarks/results/<stamp>-failover/.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from benchmarks.server import ServerProcess, until
from lora_router.configuration import check_types, parse_command, run_command
from lora_router.deployment import DeploymentArguments, DeploymentConfig
from lora_router.images import prepare_image
from lora_router.openai_wire import bearer_headers
from lora_router.percentiles import Percentiles, percentiles
from serving.balancer import Balancer
from serving.launcher import free_port
from training.tasks import build_example

log = logging.getLogger(__name__)

WINDOWS = ("before", "during", "after")
JSON_NAME, MARKDOWN_NAME, PNG_NAME = "failover.json", "failover.md", "failover.png"


@dataclass
class FailoverConfig:
    """The failover phase's settings."""

    failover_window_s: float = field(default=20.0, metadata={
        "help": "Seconds of load before the kill, and after the balancer has the replica back (0: no failover "
                "phase in benchmarks.load)."})
    failover_concurrency: int = field(default=8, metadata={"help": "Requests in flight through the balancer."})
    failover_max_tokens: int = field(default=16, metadata={"help": "Longest expert answer per request."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.failover_window_s < 0 or self.failover_concurrency < 1:
            raise ValueError("failover_window_s must be >= 0 and failover_concurrency >= 1")


@dataclass
class Window:
    """Requests started in one window of the run."""

    name: str
    seconds: float
    requests: int
    failed: int
    screenshots_per_s: float
    latency: Percentiles


@dataclass
class FailoverMetrics:
    """What the failover phase measured; times in seconds from the start of the load."""

    concurrency: int
    killed_at: float
    marked_down_at: float | None  # the balancer's health check first failed on the replica
    restarted_at: float  # the replica's vLLM was restarted and warm again
    marked_up_at: float | None  # the balancer's health check passed on it again
    windows: list[Window]
    requests: list[dict]  # each: start_s, e2e_s, status, replica

    @property
    def failed(self) -> int:
        return sum(window.failed for window in self.windows)


async def _load(session: aiohttp.ClientSession, url: str, bodies: list[dict], concurrency: int, t0: float,
                stop: asyncio.Event, requests: list[dict]) -> None:
    async def caller(first: int) -> None:
        n = first
        while not stop.is_set():
            started = time.time()
            try:
                async with session.post(url + "/v1/chat/completions", json=bodies[n % len(bodies)]) as r:
                    await r.read()
                    status, replica = r.status, r.headers.get("X-Replica")
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, replica = type(exc).__name__, None
            requests.append({"start_s": started - t0, "e2e_s": time.time() - started, "status": status,
                             "replica": replica})
            n += concurrency

    await asyncio.gather(*(caller(i) for i in range(concurrency)))


async def run_failover(deployment: DeploymentConfig, config: FailoverConfig, out_dir: Path) -> FailoverMetrics:
    """Start two replicas and the balancer, run the load, kill replica B's vLLM, measure; stop everything."""
    deployment = dataclasses.replace(deployment, engine=dataclasses.replace(deployment.engine, port=0))
    kinds = [e.name for e in deployment.experts]
    urls = [prepare_image(build_example(kinds[i % len(kinds)], 90_000 + i).image,
                          max_pixels=deployment.engine.max_pixels).data_url for i in range(4 * config.failover_concurrency)]
    # No text part: the gateway adds the routed expert's own prompt, as for a caller that sends a bare screenshot.
    bodies = [{"model": deployment.gateway.auto_model, "max_tokens": config.failover_max_tokens, "temperature": 0,
               "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
              for url in urls]
    replicas = [ServerProcess(deployment, out_dir / f"vllm-replica-{name}.log") for name in "ab"]
    log.info("failover phase: starting two replicas (in processes of their own) ...")
    try:
        served = await asyncio.gather(*(replica.start() for replica in replicas))
        hosts = [s.base_url.split("//")[1].split("/")[0] for s in served]
        with Balancer(hosts, f"127.0.0.1:{free_port()}", out_dir / "balancer.log") as balancer:
            return await _measure(config, bodies, balancer, replicas[1], served[1].base_url, hosts[1],
                                  deployment.engine.api_key)
    finally:
        for replica in replicas:
            replica.stop()


async def _measure(config: FailoverConfig, bodies: list[dict], balancer: Balancer, victim: ServerProcess,
                   victim_url: str, victim_host: str, api_key: str | None) -> FailoverMetrics:
    requests: list[dict] = []
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers=bearer_headers(api_key), timeout=timeout) as session:
        async def healthy(url: str) -> bool:
            try:
                async with session.get(url.removesuffix("/v1") + "/health") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await until(lambda: healthy(balancer.url), "the balancer")
        t0 = time.time()
        load = asyncio.create_task(_load(session, balancer.url, bodies, config.failover_concurrency, t0, stop, requests))
        await asyncio.sleep(config.failover_window_s)
        killed = time.time()
        log.info("failover phase: killing replica B's vLLM under load")
        victim.kill_vllm()
        await until(lambda: _not(healthy(victim_url)), "replica B to notice its vLLM died", 30)
        await until(lambda: healthy(victim_url), "replica B's vLLM to be restarted and warm")
        restarted = time.time()
        # B was down from the kill on: the first time the balancer marked it up since is its rejoining.
        await until(lambda: _true(balancer.marked(victim_host, up=True, after=killed) is not None),
                     "the balancer to take replica B back", 60)
        back = balancer.marked(victim_host, up=True, after=killed)
        await asyncio.sleep(config.failover_window_s)
        stop.set()
        await load
    down = balancer.marked(victim_host, up=False, after=killed)
    bounds = {"before": (0.0, killed - t0), "during": (killed - t0, back - t0),
              "after": (back - t0, back - t0 + config.failover_window_s)}
    windows = [_window(name, *bounds[name], requests) for name in WINDOWS]
    return FailoverMetrics(concurrency=config.failover_concurrency, killed_at=killed - t0,
                           marked_down_at=None if down is None else down - t0, restarted_at=restarted - t0,
                           marked_up_at=back - t0, windows=windows, requests=requests)


async def _true(value: bool) -> bool:
    return value


async def _not(condition) -> bool:
    return not await condition


def _window(name: str, start: float, end: float, requests: list[dict]) -> Window:
    inside = [r for r in requests if start <= r["start_s"] < end]
    ok = [r["e2e_s"] for r in inside if r["status"] == 200]
    seconds = max(end - start, 1e-9)
    return Window(name=name, seconds=round(seconds, 2), requests=len(inside), failed=len(inside) - len(ok),
                  screenshots_per_s=len(ok) / seconds, latency=percentiles(ok))


def to_json(metrics: FailoverMetrics, deployment: DeploymentConfig, config: FailoverConfig) -> dict:
    return {"setup": {"failover": dataclasses.asdict(config), "model": deployment.model.path,
                      "experts": [e.name for e in deployment.experts],
                      "balancer": "Caddy, configs/balancer/Caddyfile"},
            **dataclasses.asdict(metrics), "failed": metrics.failed}


def markdown(metrics: FailoverMetrics) -> str:
    ms = lambda s: "-" if s is None else f"{s * 1000:.0f}"
    at = lambda s: "-" if s is None else f"{s:.1f} s"
    rows = [f"| {w.name} | {w.seconds:.1f} | {w.requests} | {w.failed} | {w.screenshots_per_s:.2f} | "
            f"{ms(w.latency.p50)} | {ms(w.latency.p90)} | {ms(w.latency.p99)} |" for w in metrics.windows]
    down = None if metrics.marked_down_at is None else metrics.marked_down_at - metrics.killed_at
    return "\n".join([
        f"## Failover: two replicas behind the balancer, c={metrics.concurrency}, replica B's vLLM killed", "",
        "| window | seconds | requests | failed | screenshots/s | p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        f"Killed at {at(metrics.killed_at)}; the balancer marked B down {at(down)} later; B's vLLM was restarted and "
        f"warm at {at(metrics.restarted_at)}; the balancer took B back at {at(metrics.marked_up_at)}. "
        f"Failed requests: {metrics.failed}.", ""])


def plot(metrics: FailoverMetrics, path: Path) -> None:
    """Answers per second over the run, by replica, with the kill and the balancer's decisions marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max((r["start_s"] + r["e2e_s"] for r in metrics.requests), default=1.0)
    bins = range(int(end) + 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for replica in sorted({r["replica"] for r in metrics.requests if r["replica"]}):
        done = [int(r["start_s"] + r["e2e_s"]) for r in metrics.requests if r["replica"] == replica
                and r["status"] == 200]
        ax.plot(list(bins), [done.count(b) for b in bins], label=f"answered by {replica}")
    failed = [r["start_s"] for r in metrics.requests if r["status"] != 200]
    if failed:
        ax.plot(failed, [0] * len(failed), "rx", label="failed")
    for x, label, style in ((metrics.killed_at, "B's vLLM killed", "r--"),
                            (metrics.marked_down_at, "balancer: B down", "k:"),
                            (metrics.restarted_at, "B restarted", "g--"), (metrics.marked_up_at, "balancer: B up", "k-.")):
        if x is not None:
            ax.axvline(x, color=style[0], linestyle=style[1:], label=label)
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("screenshots answered per second")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(metrics: FailoverMetrics, deployment: DeploymentConfig, config: FailoverConfig,
                 out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(json.dumps(to_json(metrics, deployment, config), indent=1) + "\n")
    (out_dir / MARKDOWN_NAME).write_text(markdown(metrics))
    plot(metrics, out_dir / PNG_NAME)


@dataclass
class FailoverArguments(DeploymentArguments):
    """The flags of `python -m benchmarks.failover`."""

    out: Path | None = field(default=None, metadata={
        "help": "Output folder (default: benchmarks/results/<stamp>-failover)."})


def failover(args: FailoverArguments, config: FailoverConfig) -> int:
    from benchmarks.runner import default_out_dir

    deployment = args.deployment()
    out = args.out or default_out_dir("-failover")
    metrics = asyncio.run(run_failover(deployment, config, out))
    write_report(metrics, deployment, config, out)
    print(markdown(metrics))
    log.info("wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args, config = parse_command([FailoverArguments, FailoverConfig], argv, prog="python -m benchmarks.failover",
                                 description=__doc__, yaml_option=False)
    return run_command(lambda: failover(args, config))


if __name__ == "__main__":
    raise SystemExit(main())
