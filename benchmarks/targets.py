"""The issue's targets and side-by-side comparisons, as ratios of phases measured in the same run.

Phase names are built by runner.phase_name; a target whose phases did not run (a smaller sweep) is reported
as not measured rather than guessed.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.hf_baselines import SINGLE_LOAD, TWO_STAGE_INFERENCE, BaselineResult
from benchmarks.metrics import PhaseMetrics
from benchmarks.server_metrics import GATEWAY_STAGE
from benchmarks.workloads import RequestRecord

# The thresholds for routing and the gateway.
ROUTING_OVERHEAD_MAX = 1.15  # p50 two-stage / p50 expert-only per expert, c=1
GATEWAY_THROUGHPUT_MIN = 0.95  # gateway / client-side two-stage screenshots/s, compare concurrency
GATEWAY_ADDED_MS_MAX = 5.0  # the gateway's own time per request beside its two vLLM calls, c=1


@dataclass
class Target:
    """One target: the measured value, its threshold, and whether it was met (None: informational / not run)."""

    name: str
    measured: float | None
    threshold: str
    met: bool | None
    detail: str
    rounds: list[float | None] = field(default_factory=list)  # the value in each round; `measured` is their median


@dataclass
class Roles:
    """Which phase plays which part in the targets (phase names; empty when that phase did not run)."""

    two_stage_1: str
    router_1: str
    expert_1: str
    two_stage_c: str
    router_c: str
    expert_c: str
    mixed_c: str
    base_c: str
    reduced_route_1: str
    reduced_two_stage_c: str
    gateway_1: str  # through the gateway, twins of two_stage_1's screenshots ("" when no gateway was measured)
    gateway_c: str  # the same at the compare concurrency
    mode: str  # the router mode of the two-stage paths (the gateway's: the same deployment setting)
    mode_pairs: dict[int, tuple[str, str]]  # concurrency -> (router-only in `mode`, router-only in the other mode)
    one_token: list[str]  # phases whose routes use one-token mode
    two_stage_all: list[str]  # full-resolution two-stage phases
    per_expert: dict[str, tuple[str, str]]  # expert -> (two-stage, expert-only) phases at concurrency 1
    resolution_pairs: dict[str, list[tuple[str, str]]]  # router mode -> (full, reduced) router-only phases


@dataclass
class Agreement:
    """Routing of the same screenshots at full and reduced router resolution, in one router mode."""

    mode: str
    pairs: int
    agreement: float | None  # same routed expert (an unroutable answer counts as its own value)
    accuracy_full: float | None  # routed expert == true class
    accuracy_reduced: float | None
    unroutable_full: int
    unroutable_reduced: int


def agreement(mode: str, full: Sequence[RequestRecord], reduced: Sequence[RequestRecord]) -> Agreement:
    """Compare routes of the same screenshots (matched by item index; failed routes left out)."""
    by_index = {r.index: r for r in reduced if r.route_s is not None}
    pairs = [(f, by_index[f.index]) for f in full if f.route_s is not None and f.index in by_index]
    n = len(pairs)

    def frac(hits: int) -> float | None:
        return hits / n if n else None

    return Agreement(
        mode=mode, pairs=n, agreement=frac(sum(f.routed == r.routed for f, r in pairs)),
        accuracy_full=frac(sum(f.routed == f.kind for f, _ in pairs)),
        accuracy_reduced=frac(sum(r.routed == r.kind for _, r in pairs)),
        unroutable_full=sum(f.routed is None for f, _ in pairs),
        unroutable_reduced=sum(r.routed is None for _, r in pairs))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.3g}{unit}"


def paired(records: Sequence[RequestRecord], first: str, second: str) -> list[tuple[float, float]]:
    """(first's, second's) end-to-end seconds of each screenshot sent in both phases (a twin keeps its screenshot's
    index), failures left out."""
    before = {r.index: r.e2e_s for r in records if r.phase == first and r.e2e_s is not None}
    return [(before[r.index], r.e2e_s) for r in records
            if r.phase == second and r.e2e_s is not None and r.index in before]


def per_cpu_s(phase: PhaseMetrics | None, amount: float | None) -> float | None:
    """`amount` (of screenshots, tokens) per CPU second the phase cost the server's processes and the benchmark's
    own: what its work took, whatever else ran on the machine meanwhile; None without the server's CPU time."""
    if phase is None or phase.server_cpu_s is None or amount is None:
        return None
    return _ratio(amount, phase.server_cpu_s + phase.client_cpu_s)


def _cpu_detail(phase: PhaseMetrics | None) -> str:
    if phase is None or phase.server_cpu_s is None or not phase.completed:
        return "n/a"
    return (f"{(phase.server_cpu_s + phase.client_cpu_s) / phase.completed:.3g} CPU s per screenshot (server "
            f"{phase.server_cpu_s:.1f} s + benchmark {phase.client_cpu_s:.1f} s over {phase.duration_s:.1f} s)")


def gateway_own_s(phase: PhaseMetrics | None) -> float | None:
    """The gateway's mean time per request beside its two vLLM calls (its stage histograms: total - route - expert)."""
    means = phase.server_means_s if phase else {}
    stages = [means.get(f"{GATEWAY_STAGE}[{stage}]") for stage in ("total", "route", "expert")]
    return None if None in stages else stages[0] - stages[1] - stages[2]


def gateway_stages_ms(phase: PhaseMetrics | None) -> str:
    """The gateway's mean stage times over a phase, and what is left of its total beside the two vLLM calls."""
    means = phase.server_means_s if phase else {}
    stages = {stage: means.get(f"{GATEWAY_STAGE}[{stage}]") for stage in ("image", "route", "expert", "total")}
    own = gateway_own_s(phase)
    if None in stages.values() or own is None:
        return "gateway stage timings n/a"
    return ("gateway stage means " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in stages.items())
            + f" (its own time beside the two vLLM calls {own * 1000:.1f} ms)")


def evaluate(phases: Mapping[str, PhaseMetrics], roles: Roles, baselines: Sequence[BaselineResult],
             resolution: Sequence[Agreement], records: Sequence[RequestRecord] = ()) -> list[Target]:
    """Every target and comparison, from the phases that ran (and their requests, for paired comparisons)."""

    def get(role: str) -> PhaseMetrics | None:
        return phases.get(getattr(roles, role))

    targets = []
    ts1, r1, e1 = get("two_stage_1"), get("router_1"), get("expert_1")
    chained = sum_p50 = None
    if ts1 and r1 and e1 and None not in (ts1.e2e_s.p50, r1.e2e_s.p50, e1.e2e_s.p50):
        chained, sum_p50 = ts1.e2e_s.p50, r1.e2e_s.p50 + e1.e2e_s.p50
    ratio = _ratio(chained, sum_p50)
    gap = ts1.chain_gap_s.p50 if ts1 else None
    means = _ratio(ts1.e2e_s.mean if ts1 else None,
                   r1.e2e_s.mean + e1.e2e_s.mean if r1 and e1 and None not in (r1.e2e_s.mean, e1.e2e_s.mean) else None)
    targets.append(Target("chaining adds nothing: p50 two-stage / (p50 router-only + p50 expert-only), c=1",
                          ratio, "<= 1.0", None if ratio is None else ratio <= 1.0,
                          f"two-stage p50 {_fmt(chained, ' s')}, router-only + expert-only p50 {_fmt(sum_p50, ' s')}; "
                          f"the same with means {_fmt(means)} (short and long answers make the p50 jumpy); client "
                          f"time between the stages p50 {_fmt(gap, ' s')}"))
    # The same per class, where latencies are not bimodal: router-only (class-blind) from the class-mix phase.
    for expert, (ts_name, ex_name) in roles.per_expert.items():
        ts, ex = phases.get(ts_name), phases.get(ex_name)
        parts = r1.e2e_s.p50 + ex.e2e_s.p50 if r1 and ex and None not in (r1.e2e_s.p50, ex.e2e_s.p50) else None
        ratio = _ratio(ts.e2e_s.p50 if ts else None, parts)
        targets.append(Target(f"chaining for {expert}: p50 two-stage / (p50 router-only + p50 expert-only), c=1",
                              ratio, "<= 1.0", None if ratio is None else ratio <= 1.0,
                              f"{_fmt(ts.e2e_s.p50 if ts else None, ' s')} / {_fmt(parts, ' s')}"))

    tsc, rc, ec = get("two_stage_c"), get("router_c"), get("expert_c")
    ideal = None
    if tsc and rc and ec and rc.screenshots_per_s and ec.screenshots_per_s:
        ideal = 1 / (1 / rc.screenshots_per_s + 1 / ec.screenshots_per_s)
    ratio = _ratio(tsc.screenshots_per_s if tsc else None, ideal)
    targets.append(Target("pipelining adds nothing: two-stage screenshots/s / (1/(1/R + 1/E)), compare concurrency",
                          ratio, ">= 0.95", None if ratio is None else ratio >= 0.95,
                          f"two-stage {_fmt(tsc.screenshots_per_s if tsc else None, '/s')}, R "
                          f"{_fmt(rc.screenshots_per_s if rc else None, '/s')}, E "
                          f"{_fmt(ec.screenshots_per_s if ec else None, '/s')}, 1/(1/R+1/E) {_fmt(ideal, '/s')}"))

    by_name = {b.name: b for b in baselines}
    for baseline, threshold in ((TWO_STAGE_INFERENCE, 30.0), (SINGLE_LOAD, None)):
        hf = by_name.get(baseline)
        ratio = _ratio(tsc.screenshots_per_s if tsc else None, hf.screenshots_per_s if hf else None)
        met = None if ratio is None or threshold is None else ratio >= threshold
        targets.append(Target(f"vLLM multi-LoRA two-stage (compare concurrency) / {baseline} screenshots/s", ratio,
                              f">= {threshold:g}" if threshold else "(informational)", met,
                              f"vLLM {_fmt(tsc.screenshots_per_s if tsc else None, '/s')}, "
                              f"{baseline} {_fmt(hf.screenshots_per_s if hf else None, '/s')}"))
        hf_per_cpu = _ratio(hf.screenshots, hf.cpu_s) if hf else None
        ratio = _ratio(per_cpu_s(tsc, tsc.completed if tsc else None), hf_per_cpu)
        targets.append(Target(f"vLLM multi-LoRA two-stage (compare concurrency) / {baseline} screenshots per CPU "
                              "second", ratio, "(informational)", None,
                              f"vLLM {_cpu_detail(tsc)}; {baseline} {_fmt(_ratio(1, hf_per_cpu))} CPU s per "
                              "screenshot"))

    # On generated tokens/s: LoRA costs per token. Both phases send the same screenshots (twins), interleaved, and
    # write exactly max_tokens each (ignore_eos), so neither is rewarded for stopping early.
    mixed, base = get("mixed_c"), get("base_c")
    ratio = _ratio(mixed.output_tokens_per_s if mixed else None, base.output_tokens_per_s if base else None)
    shots = _ratio(mixed.screenshots_per_s if mixed else None, base.screenshots_per_s if base else None)
    targets.append(Target("all expert adapters mixed / base model without LoRA, generated tokens/s", ratio,
                          ">= 0.9", None if ratio is None else ratio >= 0.9,
                          f"mixed {_fmt(mixed.output_tokens_per_s if mixed else None, ' tok/s')} "
                          f"({_fmt(mixed.mean_expert_completion_tokens if mixed else None)} per request), base "
                          f"{_fmt(base.output_tokens_per_s if base else None, ' tok/s')} "
                          f"({_fmt(base.mean_expert_completion_tokens if base else None)} per request); "
                          f"screenshots/s ratio {_fmt(shots)}"))
    ratio = _ratio(per_cpu_s(mixed, mixed.output_tokens_per_s * mixed.duration_s if mixed else None),
                   per_cpu_s(base, base.output_tokens_per_s * base.duration_s if base else None))
    targets.append(Target("all expert adapters mixed / base model without LoRA, generated tokens per CPU second",
                          ratio, "(informational)", None, f"mixed {_cpu_detail(mixed)}; base {_cpu_detail(base)}"))

    one_token = [phases[n] for n in roles.one_token if n in phases]
    routes = sum(p.routes for p in one_token)
    most = max((p.route_completion_tokens_max or 0 for p in one_token), default=None) if one_token else None
    # Server counters only of phases that ran alone: an interleaved phase shares its group's /metrics difference.
    router_only = [p for p in one_token if p.workload.startswith("router-only") and not p.interleaved_with]
    server_per_route = _ratio(sum(p.server.get("vllm:generation_tokens_total", 0.0) for p in router_only),
                              sum(p.routes for p in router_only))
    targets.append(Target("generated tokens per route in one-token mode (most in any route)", most, "== 1",
                          None if most is None else most == 1 and server_per_route in (None, 1.0),
                          f"{routes} routes; server generation_tokens per route in router-only one-token phases "
                          f"{_fmt(server_per_route)}"))

    two_stage = [phases[n] for n in roles.two_stage_all if n in phases and not phases[n].interleaved_with]
    hits = sum(p.server.get("vllm:mm_cache_hits_total", 0.0) for p in two_stage)
    queries = sum(p.server.get("vllm:mm_cache_queries_total", 0.0) for p in two_stage)
    rate = hits / queries if queries else None
    targets.append(Target("multimodal cache hit rate on two-stage traffic", rate, ">= 0.45",
                          None if rate is None else rate >= 0.45,
                          f"{hits:g} hits / {queries:g} queries over the {len(two_stage)} full-resolution "
                          "two-stage phases that ran alone"))

    for expert, (ts_name, ex_name) in roles.per_expert.items():
        ts, ex = phases.get(ts_name), phases.get(ex_name)
        ratio = _ratio(ts.e2e_s.p50 if ts else None, ex.e2e_s.p50 if ex else None)
        targets.append(Target(f"routing costs little for {expert}: p50 two-stage / p50 expert-only, c=1 (same "
                              "screenshots)", ratio, f"<= {ROUTING_OVERHEAD_MAX:g}",
                              None if ratio is None else ratio <= ROUTING_OVERHEAD_MAX,
                              f"{_fmt(ts.e2e_s.p50 if ts else None, ' s')} / "
                              f"{_fmt(ex.e2e_s.p50 if ex else None, ' s')}; route p50 "
                              f"{_fmt(ts.route_s.p50 if ts else None, ' s')}, expert stage p50 "
                              f"{_fmt(ts.expert_s.p50 if ts else None, ' s')}"))
    targets.append(_mode_target(phases, roles))
    targets += _gateway_targets(phases, roles, records)

    red1, red_c = get("reduced_route_1"), get("reduced_two_stage_c")
    saved = _ratio(red1.e2e_s.p50 if red1 else None, r1.e2e_s.p50 if r1 else None)
    speed = _ratio(red_c.screenshots_per_s if red_c else None, tsc.screenshots_per_s if tsc else None)
    cost = "; ".join(
        f"{a.mode}: agreement with full resolution {_fmt(a.agreement)} over {a.pairs} screenshots, accuracy full "
        f"{_fmt(a.accuracy_full)} vs reduced {_fmt(a.accuracy_reduced)}, unroutable full {a.unroutable_full} vs "
        f"reduced {a.unroutable_reduced}" for a in resolution)
    tokens = (f"router image tokens {red1.mean_router_image_tokens:.0f} vs {r1.mean_router_image_tokens:.0f}"
              if red1 and r1 else "router image tokens n/a")
    mm = _fmt(red_c.mm_cache_hit_rate if red_c else None)
    targets.append(Target("reduced-resolution router: p50 route latency reduced / full, c=1", saved,
                          "(informational)", None,
                          f"{tokens}; two-stage screenshots/s reduced / full at compare concurrency {_fmt(speed)} "
                          f"(mm cache hit rate reduced {mm}); cost: {cost}"))
    return targets


def _mode_target(phases: Mapping[str, PhaseMetrics], roles: Roles) -> Target:
    """The two-stage paths' (and the gateway's) router mode against the other, router-only routes/s."""
    ratios, parts = [], []
    for concurrency, (mine, other) in sorted(roles.mode_pairs.items()):
        a, b = phases.get(mine), phases.get(other)
        if not a or not b:
            continue
        ratio = _ratio(a.screenshots_per_s, b.screenshots_per_s)
        ratios.append(ratio)
        parts.append(f"c={concurrency}: {_fmt(a.screenshots_per_s, '/s')} (p50 {_fmt(a.route_s.p50, ' s')}) vs "
                     f"{_fmt(b.screenshots_per_s, '/s')} (p50 {_fmt(b.route_s.p50, ' s')}) = {_fmt(ratio)}")
    measured = min(ratios) if ratios and None not in ratios else None
    return Target(f"the router mode in use ({roles.mode}) is at least as fast as the other: lowest routes/s ratio "
                  "over the concurrencies measured (router-only)", measured, ">= 1",
                  None if measured is None else measured >= 1.0, "; ".join(parts) or "not measured")


def _gateway_targets(phases: Mapping[str, PhaseMetrics], roles: Roles,
                     records: Sequence[RequestRecord]) -> list[Target]:
    """The gateway's throughput and added latency, against the client-side two-stage phases it was paired with."""
    ts1, gw1 = phases.get(roles.two_stage_1), phases.get(roles.gateway_1)
    tsc, gwc = phases.get(roles.two_stage_c), phases.get(roles.gateway_c)
    absent = "not measured: no gateway (a --base-url run without --gateway-url)"
    ratio = _ratio(gwc.screenshots_per_s if gwc else None, tsc.screenshots_per_s if tsc else None)
    throughput = Target(
        "gateway / client-side two-stage screenshots/s, compare concurrency (same screenshots)", ratio,
        f">= {GATEWAY_THROUGHPUT_MIN:g}", None if ratio is None else ratio >= GATEWAY_THROUGHPUT_MIN,
        absent if not gwc or not tsc else
        f"gateway {_fmt(gwc.screenshots_per_s, '/s')} ({gwc.failed} failed), client-side "
        f"{_fmt(tsc.screenshots_per_s, '/s')} ({tsc.failed} failed); p50 end to end {_fmt(gwc.e2e_s.p50, ' s')} vs "
        f"{_fmt(tsc.e2e_s.p50, ' s')}; {gateway_stages_ms(gwc)}")
    ratio = _ratio(per_cpu_s(gwc, gwc.completed if gwc else None), per_cpu_s(tsc, tsc.completed if tsc else None))
    cost = Target(
        "gateway / client-side two-stage screenshots per CPU second, compare concurrency (same screenshots)", ratio,
        "(informational)", None, absent if not gwc or not tsc else
        f"gateway {_cpu_detail(gwc)}; client-side {_cpu_detail(tsc)}")
    # Measured by the gateway itself: end to end, two runs of vLLM at c=1 differ by tens of ms per screenshot
    # (round medians of paired differences from -36 to +40 ms), which no few rounds can resolve to 5 ms.
    own = gateway_own_s(gw1)
    added = None if own is None else own * 1000
    latency = Target(
        "gateway added latency: its own time per request beside its two vLLM calls (mean of its stage timings), "
        "c=1, ms", added, f"<= {GATEWAY_ADDED_MS_MAX:g} ms", None if added is None else added <= GATEWAY_ADDED_MS_MAX,
        absent if not gw1 else gateway_stages_ms(gw1))
    # What a caller sees, per screenshot (answer lengths differ by class, so a ratio of p50s would jump).
    pairs = paired(records, roles.two_stage_1, roles.gateway_1)
    ratio = float(np.median([gw / cs for cs, gw in pairs])) if pairs else None
    difference = float(np.median([gw - cs for cs, gw in pairs])) if pairs else None
    end_to_end = Target(
        "gateway / client-side two-stage end to end: median per-screenshot ratio, c=1 (same screenshots)", ratio,
        "(informational)", None,
        absent if not gw1 or not ts1 else
        f"over {len(pairs)} screenshots (median difference {_fmt(difference, ' s')}); p50 {_fmt(gw1.e2e_s.p50, ' s')} "
        f"vs {_fmt(ts1.e2e_s.p50, ' s')}; route p50 {_fmt(gw1.route_s.p50, ' s')} (x-route-ms) vs "
        f"{_fmt(ts1.route_s.p50, ' s')} (client)")
    return [throughput, cost, latency, end_to_end]


_COMPARE = {"<=": operator.le, ">=": operator.ge, "==": operator.eq}


def meets(threshold: str, value: float) -> bool | None:
    """Whether `value` meets a threshold as the targets write it ('<= 1.15', '>= 0.95', '<= 5 ms'); None when the
    threshold is informational."""
    match = re.match(r"(<=|>=|==)\s*([-+0-9.eE]+)", threshold)
    return None if match is None else _COMPARE[match[1]](value, float(match[2]))


def over_rounds(rounds: Sequence[Sequence[Target]]) -> list[Target]:
    """Each target over the rounds of the compared phases (every round evaluates the same targets, in order): the
    median of its values, met when the median meets the threshold, with the range in the detail. A target that
    reads only phases run once has one value in every round and keeps its first round's verdict."""
    merged = []
    for same in zip(*rounds):
        first, values = same[0], [t.measured for t in same]
        known = [v for v in values if v is not None]
        if len(set(values)) <= 1 or not known:
            merged.append(dataclasses.replace(first, rounds=values))
            continue
        median = float(np.median(known))
        met = meets(first.threshold, median)
        detail = (f"median of {len(known)} rounds, range {_fmt(min(known))}-{_fmt(max(known))}; "
                  f"first round: {first.detail}")
        merged.append(dataclasses.replace(first, measured=median, met=met, detail=detail, rounds=values))
    return merged
