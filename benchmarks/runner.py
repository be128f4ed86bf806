"""One benchmark run: the plan of phases, closed and open loop load, the peer tool and the baselines.

Phases run one after another on one server, each on screenshots it alone sends, so a phase's /metrics difference is
its own (a phase that re-sends an earlier one's screenshots sends copies the server has not seen: twins, with
reduced-resolution router images where it asks). Phases that a target compares run side by side, because the
machine's load drifts: a group compared on the same screenshots runs interleaved (A | B | C: B and C send twins of
A's), in turns whose order reverses every time, A B C C B A A B C ...: request by request at concurrency 1, at the
compare concurrency C two turns each of a phase's worth of screenshots. A group shares one /metrics difference;
each phase has its own duration and CPU time. The client-side phases talk to vLLM directly; gateway phases send
`model: auto` to the gateway.

    plan  warm-up (every request kind, unmeasured)
          per expert at c=1: expert-only | two-stage                        (routing overhead per expert)
          c=1: router-only | router-only in the other mode | expert-only | two-stage | gateway | router-only at
               reduced resolution (in the first round also in the other mode)
                                                  (modes, chaining, gateway added latency, reduced resolution)
          two-stage sweep below the compare concurrency C
          c=C: router-only | router-only in the other mode | expert-only | two-stage | gateway
                                                                            (modes, pipelining, vs HF, gateway)
               `vllm bench serve` on the expert-only path, then through the gateway (model auto)
          c=C: reduced router-only (same screenshots) in both modes, reduced two-stage
          c=C: adapters mixed | base only, each writing exactly max_tokens     (LoRA's cost per token)
          rounds 2..R of the compared groups, as above
          two-stage sweep above C, then two-stage open loop (Poisson)
    the transformers + PEFT baselines run after each round's compare-concurrency phases, vLLM idle (on a GPU,
          once per round after the server stops).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks import environment, hf_baselines, peer
from benchmarks.config import BenchConfig
from benchmarks.hf_baselines import BaselineResult
from benchmarks.metrics import PhaseMetrics, server_ttft, summarise
from benchmarks.peer import PeerResult
from benchmarks.pool import BenchItem, ScreenPool
from benchmarks.server import Served, ServerProcess
from benchmarks.server_metrics import GATEWAY_STAGE, ServerSnapshot, scrape
from benchmarks.targets import Agreement, Roles, Target, agreement, evaluate, over_rounds
from benchmarks.workloads import (
    ADAPTERS_MIXED,
    BASE_ONLY,
    EXPERT_ONLY,
    GatewayTarget,
    RequestRecord,
    Workload,
    gateway,
    router_only,
    run_request,
    two_stage,
)
from lora_router.deployment import DeploymentConfig
from lora_router.openai_wire import bearer_headers
from lora_router.routing import ROUTER_MODES
from router_client import ClientConfig, RouterClient
from serving.adapters import max_rank_for
from serving.command import cpu_threads
from training.inference import load_processor, pixel_limits
from training.screens import KINDS
from training.tiny_model import resolve_base_model

# Open-loop arrival rate, as a fraction of the best closed-loop two-stage throughput, when none is given.
OPEN_LOOP_LOAD = 0.7
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PhaseSpec:
    """One measured phase: a workload, how many screenshots, and closed loop (concurrency) or open loop."""

    name: str
    workload: Workload
    requests: int
    concurrency: int | None = None  # closed loop; None: open loop (Poisson)
    kind: str | None = None  # every screenshot of this class; None: drawn from the class mix
    reduced_router: bool = False  # router requests get reduced-resolution images
    reuse: str | None = None  # send twins of this earlier phase's screenshots


@dataclass
class Plan:
    """The phases in order, the roles they play in the targets (per round of the compared phases, the first round
    first), and which groups run interleaved (first -> the others, which re-send its screenshots as twins, at the
    same concurrency)."""

    phases: list[PhaseSpec]
    rounds: list[Roles]
    interleaved: dict[str, list[str]]

    @property
    def roles(self) -> Roles:
        return self.rounds[0]


@dataclass
class BenchmarkResult:
    """Everything one run measured; benchmarks.report writes it out."""

    setup: dict[str, Any]
    phases: list[PhaseMetrics]
    records: list[RequestRecord]
    warmup: dict[str, int]
    server_before: dict[str, float]
    server_after: dict[str, float]
    peers: list[PeerResult]  # `vllm bench serve` against vLLM, then against the gateway
    baselines: list[BaselineResult]
    resolution: list[Agreement]  # one per router mode
    targets: list[Target]


def phase_name(workload: Workload, concurrency: int | None, kind: str | None = None, reduced: bool = False,
               round_: int = 1) -> str:
    """E.g. 'two-stage[one-token]@16', 'router-only[choice]+reduced@1', 'expert-only@1/calendar',
    'two-stage[one-token]@poisson', 'gateway[one-token]@16#3' (the third round of a compared phase)."""
    where = "poisson" if concurrency is None else str(concurrency)
    return (f"{workload.name}{'+reduced' if reduced else ''}@{where}{'/' + kind if kind else ''}"
            f"{f'#{round_}' if round_ > 1 else ''}")


def build_plan(bench: BenchConfig, mode: str, kinds: Sequence[str], with_gateway: bool = True) -> Plan:
    """The ordered phases for router `mode` (the other mode is measured beside it) and screenshot `kinds`; the
    gateway phases only `with_gateway`. The compared phases run bench.rounds times: the first round among the
    others, the rest after them, before the sweep above the compare concurrency and the open loop."""
    other = next(m for m in ROUTER_MODES if m != mode)
    ts, ro, ro_other, gw = two_stage(mode), router_only(mode), router_only(other), gateway(mode)
    c = bench.compare_concurrency
    phases: list[PhaseSpec] = []
    interleaved: dict[str, list[str]] = {}

    def add(workload: Workload, concurrency: int | None, requests: int, kind: str | None = None,
            reduced: bool = False, reuse: str | None = None, round_: int = 1) -> str:
        name = phase_name(workload, concurrency, kind, reduced, round_)
        if all(p.name != name for p in phases):
            phases.append(PhaseSpec(name, workload, requests, concurrency, kind, reduced, reuse))
        return name

    def one_round(r: int, first: Roles | None) -> Roles:
        """Round `r`'s phases; the first round (`first` None) also runs the phases measured once."""

        def join(first_name: str, workload: Workload, reduced: bool = False) -> str:
            """`workload` on twins of phase `first_name`'s screenshots (or, `reduced`, on them with reduced router
            images), interleaved with its group: the same work under the same load."""
            spec = next(p for p in phases if p.name == first_name)
            name = add(workload, spec.concurrency, spec.requests, spec.kind, reduced, reuse=first_name, round_=r)
            interleaved.setdefault(first_name, []).append(name)
            return name

        per_expert: dict[str, tuple[str, str]] = {}
        if bench.per_expert_requests:
            for kind in kinds:
                expert = add(EXPERT_ONLY, 1, bench.per_expert_requests, kind, round_=r)
                per_expert[kind] = (join(expert, ts), expert)  # the ratio is what routing adds
        n1, nc = bench.requests_at(1), bench.requests_at(c)
        grouped_c = 2 * turn_size(bench, c)  # groups interleaved at c: two turns each
        router_1 = add(ro, 1, n1, round_=r)
        other_1, expert_1, two_stage_1 = join(router_1, ro_other), join(router_1, EXPERT_ONLY), join(router_1, ts)
        gateway_1 = join(router_1, gw) if with_gateway else ""  # a few ms are measured here
        once = first is None
        reduced_route_1 = join(router_1, ro, reduced=True)  # the saving is a few ms: measured in the group
        reduced_other_1 = join(router_1, ro_other, reduced=True) if once else ""
        if once:
            for k in bench.concurrencies:
                if 1 < k < c:
                    add(ts, k, bench.requests_at(k))
        router_c = add(ro, c, grouped_c, round_=r)
        other_c, expert_c, two_stage_c = join(router_c, ro_other), join(router_c, EXPERT_ONLY), join(router_c, ts)
        gateway_c = join(router_c, gw) if with_gateway else ""
        reduced_route_c = add(ro, c, grouped_c, reduced=True, reuse=router_c) if once else ""
        reduced_other_c = add(ro_other, c, grouped_c, reduced=True, reuse=other_c) if once else ""
        reduced_two_stage_c = add(ts, c, nc, reduced=True) if once else first.reduced_two_stage_c
        mixed_c = add(ADAPTERS_MIXED, c, grouped_c, round_=r)
        base_c = join(mixed_c, BASE_ONLY)
        compared = dict(
            two_stage_1=two_stage_1, router_1=router_1, expert_1=expert_1, two_stage_c=two_stage_c,
            router_c=router_c, expert_c=expert_c, mixed_c=mixed_c, base_c=base_c, gateway_1=gateway_1,
            gateway_c=gateway_c, mode_pairs={1: (router_1, other_1), c: (router_c, other_c)}, per_expert=per_expert,
            reduced_route_1=reduced_route_1)
        if not once:
            return dataclasses.replace(first, **compared)
        return Roles(
            **compared, reduced_two_stage_c=reduced_two_stage_c, mode=mode,
            one_token=[], two_stage_all=[],
            resolution_pairs={mode: [(router_1, reduced_route_1), (router_c, reduced_route_c)],
                              other: [(other_1, reduced_other_1), (other_c, reduced_other_c)]})

    rounds = [one_round(1, None)]
    rounds += [one_round(r, rounds[0]) for r in range(2, bench.rounds + 1)]
    for k in bench.concurrencies:
        if k > c:
            add(ts, k, bench.requests_at(k))
    if bench.poisson_requests:
        add(ts, None, bench.poisson_requests)
    one_token_routes = [p.name for p in phases if p.workload.route_mode == "one-token"]
    two_stage_all = [p.name for p in phases if p.workload == ts and not p.reduced_router]
    rounds = [dataclasses.replace(roles, one_token=one_token_routes, two_stage_all=two_stage_all) for roles in rounds]
    return Plan(phases=phases, rounds=rounds, interleaved=interleaved)


async def closed_loop(client: RouterClient, workload: Workload, items: Sequence[BenchItem], concurrency: int,
                      phase: str, gateway: GatewayTarget | None = None,
                      since: float | None = None) -> tuple[list[RequestRecord], float]:
    """`concurrency` workers, each sending its next screenshot as soon as its last one is answered; records' start
    times count from `since` (perf_counter; default: now)."""
    records: list[RequestRecord] = []
    queue = iter(items)
    start = time.perf_counter()

    async def worker() -> None:
        for item in queue:  # one iterator shared by the workers: every item is sent once
            records.append(await run_request(client, workload, item, phase, start if since is None else since,
                                             gateway))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(items)))))
    return sorted(records, key=lambda r: r.index), time.perf_counter() - start


# One side of an interleaved group: the workload, its screenshots, the phase name.
Side = tuple[Workload, Sequence[BenchItem], str]


@dataclass
class SideResult:
    """What one side of an interleaved group measured over its own turns."""

    records: list[RequestRecord] = dataclasses.field(default_factory=list)
    duration_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float | None = 0.0  # None: the server's CPU time is not known (started elsewhere)


def turn_size(bench: BenchConfig, concurrency: int) -> int:
    """Screenshots one side of an interleaved group sends per turn: one at concurrency 1 (request by request), else
    as many as a phase of its own at that concurrency sends, so each turn is such a phase."""
    return 1 if concurrency == 1 else bench.requests_at(concurrency)


async def interleaved(client: RouterClient, gateway: GatewayTarget | None, sides: Sequence[Side],
                      concurrency: int = 1, turn: int = 1,
                      meter: Callable[[], tuple[float, float | None]] = lambda: (0.0, 0.0)) -> list[SideResult]:
    """Phases in turns of `turn` screenshots, closed loop at `concurrency`: the i-th turn of each, in an order that
    reverses every time (A B C C B A A B C ...), so all meet the same machine load, a steady drift included. Each
    side's duration is the sum of its turns' times; `meter()` (client and server CPU seconds so far) is read around
    every turn."""
    results = [SideResult() for _ in sides]
    start = time.perf_counter()
    for i, at in enumerate(range(0, max(len(items) for _, items, _ in sides), turn)):
        for side in (range(len(sides)) if i % 2 == 0 else reversed(range(len(sides)))):
            workload, items, phase = sides[side]
            if not items[at:at + turn]:
                continue
            result, (client_cpu, server_cpu) = results[side], meter()
            records, duration = await closed_loop(client, workload, items[at:at + turn], concurrency, phase,
                                                  gateway, since=start)
            client_after, server_after = meter()
            result.records += records
            result.duration_s += duration
            result.client_cpu_s += client_after - client_cpu
            spent = _minus(server_after, server_cpu)
            result.server_cpu_s = None if result.server_cpu_s is None or spent is None else result.server_cpu_s + spent
    return results


async def open_loop(client: RouterClient, workload: Workload, items: Sequence[BenchItem], rate: float,
                    rng: random.Random, phase: str) -> tuple[list[RequestRecord], float]:
    """Screenshots sent at Poisson arrival times of `rate` per second, however many are already in flight."""
    start = time.perf_counter()
    at = 0.0
    tasks = []
    for item in items:
        at += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(run_request(client, workload, item, phase, start)))
    records = await asyncio.gather(*tasks)
    return sorted(records, key=lambda r: r.index), time.perf_counter() - start


class _Run:
    """State of one run against one server: the client, the gateway (if any), the screenshot pool, the /metrics
    session (vLLM's, with the client's key)."""

    def __init__(self, bench: BenchConfig, client: RouterClient, gateway: GatewayTarget | None, pool: ScreenPool,
                 session: aiohttp.ClientSession, server_cpu: Callable[[], float | None] = lambda: None):
        self.bench = bench
        self.server_cpu = server_cpu  # CPU seconds of the server's processes so far (None: started elsewhere)
        self.client = client
        self.gateway = gateway
        self.pool = pool
        self.session = session
        self.phases: dict[str, PhaseMetrics] = {}
        self.records: list[RequestRecord] = []
        self.items: dict[str, list[BenchItem]] = {}

    async def snapshot(self, with_gateway: bool = False) -> ServerSnapshot:
        """vLLM's /metrics; with the gateway's stage timings (from its own /metrics) when asked."""
        snap = await scrape(self.session, self.client.config.server_root)
        if with_gateway and self.gateway is not None:
            own = await scrape(self.gateway.session, self.gateway.base_url.removesuffix("/v1"))
            snap.histograms.update({k: v for k, v in own.histograms.items() if k.startswith(GATEWAY_STAGE)})
        return snap

    async def warm_up(self, plan: Plan) -> dict[str, int]:
        """Unmeasured screenshots per distinct request kind of the plan: `warmup_requests` at once, then as many as
        the compare concurrency at once. The engine's first large batches are slow (the route profile saw 27 routes/s
        in its first burst of 16 against 44-48 later), and the first measured phase at that concurrency (router-only
        in the mode in use, compared with the other mode) must not pay for them."""
        kinds = {(p.workload, p.reduced_router) for p in plan.phases}
        sizes = (self.bench.warmup_requests, self.bench.compare_concurrency) if self.bench.warmup_requests else ()
        sent = failed = 0
        for workload, reduced in sorted(kinds, key=lambda k: (k[0].name, k[1])):
            for size in sizes:
                items = self.pool.take(size)
                if reduced:
                    items = self.pool.reduced(items)
                records, _ = await closed_loop(self.client, workload, items, size, "warm-up", self.gateway)
                sent += len(records)
                failed += sum(not r.ok for r in records)
        return {"screenshots": sent, "failed": failed}

    def take(self, spec: PhaseSpec) -> list[BenchItem]:
        """The phase's screenshots: new ones, or twins of an earlier phase's; with reduced router images if the
        phase asks."""
        items = self.pool.twins(self.items[spec.reuse]) if spec.reuse else self.pool.take(spec.requests, spec.kind)
        if spec.reduced_router:
            items = self.pool.reduced(items)
        self.items[spec.name] = items
        return items

    async def run_interleaved(self, group: Sequence[PhaseSpec]) -> None:
        """Phases at one concurrency, interleaved in turns; all get the group's /metrics difference, load and
        retries, and each its own duration and CPU time."""
        concurrency = group[0].concurrency
        if concurrency is None or any(spec.concurrency != concurrency for spec in group):
            raise ValueError(f"{', '.join(s.name for s in group)}: interleaved phases need one closed-loop concurrency")
        sides = [(spec.workload, self.take(spec), spec.name) for spec in group]
        load_before, retries = os.getloadavg()[0], self.client.stats.retries
        before = await self.snapshot(with_gateway=True)
        results = await interleaved(self.client, self.gateway, sides, concurrency, turn_size(self.bench, concurrency),
                                    lambda: (_cpu_s(resource.RUSAGE_SELF), self.server_cpu()))
        server = (await self.snapshot(with_gateway=True)).minus(before)
        load, retries = (load_before, os.getloadavg()[0]), self.client.stats.retries - retries
        for spec, result in zip(group, results):
            others = ", ".join(other.name for other in group if other is not spec)
            self._add(spec, summarise(spec.name, spec.workload.name, result.records, result.duration_s, server, load,
                                      retries, result.client_cpu_s, concurrency, None, spec.kind,
                                      spec.reduced_router, interleaved_with=others, server_cpu_s=result.server_cpu_s),
                      result.records)

    async def run_phase(self, spec: PhaseSpec) -> PhaseMetrics:
        items = self.take(spec)
        load_before, retries, cpu = os.getloadavg()[0], self.client.stats.retries, _cpu_s(resource.RUSAGE_SELF)
        server_cpu = self.server_cpu()
        via_gateway = spec.workload.via_gateway
        before = await self.snapshot(via_gateway)
        rate = None
        if spec.concurrency is None:
            rate = self.bench.request_rate or OPEN_LOOP_LOAD * max(
                (p.screenshots_per_s for p in self.phases.values()
                 if p.workload == spec.workload.name and not p.reduced_router), default=1.0)
            rng = random.Random(f"{self.bench.seed}:arrivals:{spec.name}")
            records, duration = await open_loop(self.client, spec.workload, items, rate, rng, spec.name)
        else:
            records, duration = await closed_loop(self.client, spec.workload, items, spec.concurrency, spec.name,
                                                  self.gateway)
        server = (await self.snapshot(via_gateway)).minus(before)
        metrics = summarise(spec.name, spec.workload.name, records, duration, server,
                            (load_before, os.getloadavg()[0]), self.client.stats.retries - retries,
                            _cpu_s(resource.RUSAGE_SELF) - cpu, spec.concurrency, rate, spec.kind,
                            spec.reduced_router, server_cpu_s=_minus(self.server_cpu(), server_cpu))
        self._add(spec, metrics, records)
        return metrics

    def _add(self, spec: PhaseSpec, metrics: PhaseMetrics, records: list[RequestRecord]) -> None:
        self.phases[spec.name] = metrics
        self.records += records
        log.info("%-42s %3d/%-3d ok  %6.2f screenshots/s  p50 %s  load %.1f", spec.name, metrics.completed,
                 metrics.screenshots, metrics.screenshots_per_s, _ms(metrics.e2e_s.p50), metrics.load_after)

    async def run_peers(self, tokenizer: str, model: str, out_dir: Path) -> list[PeerResult]:
        """`vllm bench serve` at the compare concurrency on the expert-only path, then (on twins of the same
        screenshots) through the gateway."""
        items = self.pool.take(self.bench.peer_requests)
        results = [await self._run_peer("vllm", items, self.client.config.server_root, self.client.config.api_key,
                                        model, [self.client.config.served(e) for e in self.client.config.labels],
                                        tokenizer, out_dir, peer.RESULT_FILE)]
        if self.gateway is not None:
            results.append(await self._run_peer(
                "gateway", self.pool.twins(items), self.gateway.base_url.removesuffix("/v1"), self.gateway.api_key,
                self.gateway.model, [], tokenizer, out_dir, peer.GATEWAY_RESULT_FILE))
        return results

    async def _run_peer(self, target: str, items: Sequence[BenchItem], root_url: str, api_key: str | None,
                        model: str, experts: Sequence[str], tokenizer: str, out_dir: Path,
                        result_file: str) -> PeerResult:
        output_len = max(1, round(float(np.mean([i.max_tokens for i in items]))))
        concurrency = self.bench.compare_concurrency
        with tempfile.TemporaryDirectory() as tmp:
            dataset = Path(tmp) / "screens.jsonl"
            peer.write_dataset(items, dataset)
            command = peer.bench_command(
                root_url=root_url, model=model, tokenizer=tokenizer, experts=experts, dataset=dataset,
                num_prompts=len(items), max_concurrency=concurrency, output_len=output_len, seed=self.bench.seed,
                result_dir=out_dir, result_file=result_file)
            with_gateway = target == "gateway"
            before, cpu = await self.snapshot(with_gateway), _cpu_s(resource.RUSAGE_CHILDREN)
            code, result, tail = await peer.run_peer(command, api_key, out_dir / result_file,
                                                     timeout_s=self.bench.timeout_s * 4)
            server, cpu = (await self.snapshot(with_gateway)).minus(before), _cpu_s(resource.RUSAGE_CHILDREN) - cpu
        log.info("vllm bench serve (%s): exit %s, %.2f requests/s", target, code,
                 result.get("request_throughput", float("nan")))
        return PeerResult(target=target, command=command, num_prompts=len(items), max_concurrency=concurrency,
                          output_len=output_len, returncode=code, result=result, server=server.counters,
                          server_ttft_s=server_ttft(server), server_means_s=server.means(), client_cpu_s=cpu,
                          log_tail=tail)


def _cpu_s(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its finished children (RUSAGE_CHILDREN)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _ms(seconds: float | None) -> str:
    return "   n/a" if seconds is None else f"{seconds * 1000:6.0f} ms"


def _check_mix(bench: BenchConfig, deployment: DeploymentConfig) -> list[str]:
    kinds = [k for k, w in bench.class_mix.items() if w > 0]
    unknown = [k for k in kinds if k not in deployment.labels or k not in KINDS]
    if unknown:
        raise ValueError(f"class_mix names {unknown}: every class must be an expert of the deployment "
                         f"({', '.join(deployment.labels)}) and a screen generator kind ({', '.join(KINDS)})")
    return kinds


def image_token_counter(processor, deployment: DeploymentConfig):
    """(width, height) -> image tokens, as the server's processor resizes (engine pixel limits win)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    low, high = pixel_limits(processor)
    low, high = deployment.engine.min_pixels or low, deployment.engine.max_pixels or high

    def count(width: int, height: int) -> int:
        h, w = smart_resize(height, width, factor=factor, min_pixels=low, max_pixels=high)
        return (h // factor) * (w // factor)

    return count


def _token_stats(values: Sequence[int]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "min": int(min(values)), "max": int(max(values))} if values else {}


def _setup(bench: BenchConfig, deployment: DeploymentConfig, config_path: str | None, model_dir: str,
           server: Served | None, base_url: str, gateway_url: str | None, threads: int | None, mode: str,
           client_config: ClientConfig, run: _Run) -> dict[str, Any]:
    """What the report records about the run's setup."""
    ranks = [a["rank"] for a in environment.adapters(deployment)]
    command = server.command if server else None
    return {
        "config_path": config_path,
        "deployment": environment.deployment_dict(deployment),
        "bench": dataclasses.asdict(bench),
        "model_dir": model_dir,
        "versions": environment.versions(),
        "machine": environment.machine(deployment.engine.device),
        "adapters": environment.adapters(deployment),
        "max_loras": deployment.engine.max_loras or len(deployment.adapters),
        "max_lora_rank": deployment.engine.max_lora_rank or (max_rank_for(max(ranks)) if ranks else None),
        "server": {"base_url": base_url, "gateway_url": gateway_url, "started_by_benchmark": server is not None,
                   "argv": command.argv if command else None,
                   "env": command.env if command else None},
        "cpu_threads": threads,
        "router_mode": mode,
        "client": {"fallback": "base (unroutable answers then run the true expert)",
                   "max_retries": client_config.max_retries, "timeout_s": bench.timeout_s},
        "image_tokens": _token_stats([r.image_tokens for r in run.records]),
        "reduced_router_image_tokens": _token_stats(
            [r.router_image_tokens for r in run.records if run.phases[r.phase].reduced_router]),
        "ttft_source": "vLLM /metrics histogram vllm:time_to_first_token_seconds, per phase (client does not stream)",
    }


async def run_benchmark(bench: BenchConfig, deployment: DeploymentConfig, out_dir: Path,
                        config_path: str | None = None) -> BenchmarkResult:
    """Run every phase, the peer tool and the baselines; start (and stop) a server unless bench.base_url is set.

    The client-side phases talk to vLLM itself (the started server's upstream, with its internal key; or
    bench.base_url), the gateway phases to the gateway (the started server's; or bench.gateway_url, else none).
    """
    kinds = _check_mix(bench, deployment)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_base_model(deployment.model.path)
    processor = load_processor(model_dir)
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()[0]
    on_cpu = deployment.engine.device == "cpu"
    if bench.cpu_threads:
        # Through the deployment: the server command's environment sets OMP_NUM_THREADS from engine.cpu_threads.
        deployment = dataclasses.replace(
            deployment, engine=dataclasses.replace(deployment.engine, cpu_threads=bench.cpu_threads))
    if bench.router_mode:
        # Through the deployment too, so the gateway the benchmark starts routes in the same mode as the client.
        deployment = dataclasses.replace(deployment, client={**deployment.client, "router_mode": bench.router_mode})
    process: ServerProcess | None = None
    server: Served | None = None
    if bench.base_url is None:
        engine = dataclasses.replace(deployment.engine, port=0)
        process = ServerProcess(dataclasses.replace(deployment, engine=engine), out_dir / "vllm.log")
        log.info("starting vLLM and the gateway (in their own process) ...")
        server = await process.start()
    # What the command passed to the vLLM it started; for a server started elsewhere, the deployment's setting.
    threads = int(server.command.env["OMP_NUM_THREADS"]) if server and on_cpu else cpu_threads(deployment.engine)
    try:
        base_url = bench.base_url or server.upstream_url
        gateway_url = server.base_url if server else bench.gateway_url
        if gateway_url is None:
            log.warning("no gateway phases: --base-url names a running server and no --gateway-url was given")
        client_config = ClientConfig.from_deployment(
            deployment, base_url=base_url, fallback="base", timeout_s=bench.timeout_s,
            read_timeout_s=bench.timeout_s,
            **({"api_key": server.upstream_key, "served_names": server.served_names} if server else {}))
        tokenizer = processor.tokenizer
        pool = ScreenPool(
            bench.seed, {k: bench.class_mix[k] for k in kinds}, image_max_pixels=client_config.max_pixels,
            router_max_pixels=bench.router_max_pixels, expert_max_tokens=bench.expert_max_tokens,
            answer_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
            image_tokens=image_token_counter(processor, deployment))
        async with RouterClient(client_config) as client, \
                aiohttp.ClientSession(headers=bearer_headers(client_config.api_key)) as session, \
                aiohttp.ClientSession(headers=bearer_headers(deployment.engine.api_key),
                                      timeout=aiohttp.ClientTimeout(total=bench.timeout_s)) as gateway_session:
            mode = client.mode
            gateway = None if gateway_url is None else GatewayTarget(
                gateway_session, gateway_url.rstrip("/"), deployment.gateway.auto_model, deployment.engine.api_key)
            plan = build_plan(bench, mode, kinds, with_gateway=gateway is not None)
            run = _Run(bench, client, gateway, pool, session, process.cpu_s if process else lambda: None)
            hf_items = pool.take(bench.hf_requests)
            baselines = None
            if hf_items and on_cpu:
                log.info("loading the transformers + PEFT baselines ...")
                baselines = hf_baselines.Baselines(model_dir, processor, deployment, hf_items, "cpu", threads)
            # On a CPU each round of the baselines runs right after that round's compare-concurrency phases, as
            # every compared group does: the machine's speed drifts over a run, and vLLM idles meanwhile. (On a GPU
            # vLLM holds the memory the model needs: after the server stops.)
            baseline_after = {roles.two_stage_c: i for i, roles in enumerate(plan.rounds)}
            baseline_rounds: list[list[BaselineResult]] = [[] for _ in plan.rounds]
            before = await run.snapshot()
            warmup = await run.warm_up(plan)
            peers = []
            specs = {spec.name: spec for spec in plan.phases}
            for spec in plan.phases:
                if spec.name in run.phases:
                    continue  # ran interleaved with an earlier one
                group = [spec, *(specs[name] for name in plan.interleaved.get(spec.name, []))]
                if len(group) > 1:
                    await run.run_interleaved(group)
                else:
                    await run.run_phase(spec)
                names = {member.name for member in group}
                if plan.roles.two_stage_c in names and bench.peer_requests:
                    # Right after our phases at the compare concurrency, so it sees the same machine load.
                    peers = await run.run_peers(model_dir, deployment.model.served_name, out_dir)
                for name in names & baseline_after.keys() if baselines is not None else ():
                    log.info("transformers + PEFT baselines, round %d ...", baseline_after[name] + 1)
                    baseline_rounds[baseline_after[name]] = baselines.run(baseline_after[name] + 1)
            after = await run.snapshot()
    finally:
        if process is not None:
            process.stop()
    if hf_items and not on_cpu:
        log.info("transformers + PEFT baselines, %d rounds ...", len(plan.rounds))
        baselines = hf_baselines.Baselines(model_dir, processor, deployment, hf_items, "cuda", threads)
        baseline_rounds = [baselines.run(i + 1) for i in range(len(plan.rounds))]
    resolution = [agreement(m, [r for r in run.records if r.phase in {full for full, _ in pairs}],
                            [r for r in run.records if r.phase in {reduced for _, reduced in pairs}])
                  for m, pairs in plan.roles.resolution_pairs.items()]
    targets = over_rounds([evaluate(run.phases, roles, hf, resolution, run.records)
                           for roles, hf in zip(plan.rounds, baseline_rounds)])
    setup = _setup(bench, deployment, config_path, model_dir, server, base_url, gateway_url,
                   threads if on_cpu else None, mode, client_config, run)
    setup.update(started_utc=started.isoformat(timespec="seconds"),
                 finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 load_average_1m={"start": load_start, "end": os.getloadavg()[0]})
    return BenchmarkResult(setup=setup, phases=list(run.phases.values()), records=run.records, warmup=warmup,
                           server_before=before.counters, server_after=after.counters, peers=peers,
                           baselines=[b for hf in baseline_rounds for b in hf], resolution=resolution,
                           targets=targets)


def default_out_dir(suffix: str = "", root: Path = Path(__file__).parent / "results") -> Path:
    """benchmarks/results/<YYYY-MM-DD_HHMMSS><suffix>/ (local time)."""
    return root / (datetime.now().strftime("%Y-%m-%d_%H%M%S") + suffix)
