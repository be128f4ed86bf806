"""Benchmarks: the pieces without a server (metrics parsing, the plan, the target arithmetic on known inputs,
twin screenshots, the peer tool's input, the random 8B writer on a scaled-down shape), and a smoke run against a
real tiny server and its gateway (report shape, every request accounted for; no timing asserted)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import peer, random_8b
from benchmarks.compare import main as compare_main
from benchmarks.compare import rows as compare_rows
from benchmarks.config import BenchConfig
from benchmarks.metrics import PhaseMetrics, summarise
from benchmarks.pool import ScreenPool
from benchmarks.report import write_report
from benchmarks.runner import build_plan, interleaved, phase_name, run_benchmark, turn_size
from benchmarks.server_metrics import GATEWAY_STAGE, ServerSnapshot, parse_metrics
from benchmarks.targets import Roles, Target, evaluate, meets, over_rounds, paired
from benchmarks.workloads import EXPERT_ONLY, RequestRecord, gateway, router_only, two_stage
from router_client import PreparedImage

METRICS = """\
# HELP vllm:mm_cache_hits_total Multi-modal cache hits
vllm:mm_cache_hits_total{engine="0",model_name="base"} 3.0
vllm:mm_cache_hits_total{engine="1",model_name="base"} 2.0
vllm:mm_cache_queries_total{engine="0",model_name="base"} 10.0
vllm:mm_cache_hits_created{engine="0",model_name="base"} 1.7e+09
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="base"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="base"} 6.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="base"} 8.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="base"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="base"} 8.0
"""


def test_metrics_are_summed_over_engines_and_differenced():
    before = parse_metrics(METRICS)
    assert before.counters["vllm:mm_cache_hits_total"] == 5.0
    assert before.counters["vllm:generation_tokens_total"] == 0.0  # absent counters read as zero
    after = parse_metrics(METRICS.replace("} 3.0", "} 7.0").replace("} 10.0", "} 18.0"))
    delta = after.minus(before)
    assert delta.counters["vllm:mm_cache_hits_total"] == 4.0
    assert delta.ratio("vllm:mm_cache_hits_total", "vllm:mm_cache_queries_total") == 0.5
    assert delta.ttft_count == 0 and delta.ttft_quantile(0.5) is None


def test_ttft_quantiles_interpolate_inside_buckets():
    snap = parse_metrics(METRICS)
    assert snap.ttft_quantile(0.25) == pytest.approx(0.1)  # rank 2 is the top of the first bucket
    assert snap.ttft_quantile(0.5) == pytest.approx(0.3)  # rank 4: halfway through (0.1, 0.5]
    assert snap.ttft_quantile(0.99) == pytest.approx(0.5)  # in +Inf: the last finite bound


GATEWAY_METRICS = """\
# TYPE lora_router_gateway_stage_seconds histogram
lora_router_gateway_stage_seconds_bucket{le="+Inf",stage="image"} 4.0
lora_router_gateway_stage_seconds_count{stage="image"} 4.0
lora_router_gateway_stage_seconds_sum{stage="image"} 0.002
lora_router_gateway_stage_seconds_count{stage="route"} 4.0
lora_router_gateway_stage_seconds_sum{stage="route"} 0.2
vllm:request_prefill_time_seconds_count{engine="0",model_name="base"} 8.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="base"} 0.16
vllm:e2e_request_latency_seconds_count{engine="0",model_name="base"} 8.0
vllm:e2e_request_latency_seconds_sum{engine="0",model_name="base"} 0.8
"""


def test_timing_histograms_give_per_request_means_per_phase():
    before = parse_metrics(GATEWAY_METRICS)
    assert before.means() == pytest.approx({
        "lora_router_gateway_stage_seconds[image]": 0.0005, "lora_router_gateway_stage_seconds[route]": 0.05,
        "vllm:request_prefill_time_seconds": 0.02, "vllm:e2e_request_latency_seconds": 0.1})
    after = parse_metrics(GATEWAY_METRICS.replace("} 4.0", "} 6.0").replace("} 0.2", "} 0.26"))
    delta = after.minus(before)
    assert delta.means()["lora_router_gateway_stage_seconds[route]"] == pytest.approx(0.03)  # 0.06 s over 2 more routes
    assert "vllm:request_prefill_time_seconds" not in delta.means()  # nothing observed in between


def test_plan_puts_compared_phases_side_by_side_and_names_them_once():
    bench = BenchConfig(concurrencies=[1, 4, 16, 32], compare_concurrency=16, per_expert_requests=2)
    plan = build_plan(bench, "one-token", ["calendar", "claim-window"])
    names = [p.name for p in plan.phases]
    assert len(names) == len(set(names))
    roles = plan.roles
    for role in ("two_stage_1", "router_1", "expert_1", "two_stage_c", "router_c", "expert_c", "mixed_c", "base_c",
                 "reduced_route_1", "reduced_two_stage_c"):
        assert getattr(roles, role) in names, role
    for spec in plan.phases:
        if spec.reuse:
            assert names.index(spec.reuse) < names.index(spec.name)
    assert phase_name(two_stage("one-token"), 32) in names and names[-1] == phase_name(two_stage("one-token"), None)
    assert set(roles.per_expert) == {"calendar", "claim-window"}
    assert all("one-token" in n for n in roles.one_token)
    specs = {p.name: p for p in plan.phases}
    # Groups compared on the same screenshots run interleaved, each phase after the first on twins of its screenshots:
    # per expert (routing overhead), and at c=1 and c=16 the router modes, expert-only, two-stage and the gateway; at
    # c=1 also router-only at reduced resolution (in the first round in both modes).
    reduced_other_1 = phase_name(router_only("choice"), 1, reduced=True)
    groups = {first: others for r in plan.rounds for first, others in {
        **{ex: [ts] for ts, ex in r.per_expert.values()},
        r.router_1: [r.mode_pairs[1][1], r.expert_1, r.two_stage_1, r.gateway_1, r.reduced_route_1,
                     *([reduced_other_1] if r is plan.roles else [])],
        r.router_c: [r.mode_pairs[16][1], r.expert_c, r.two_stage_c, r.gateway_c],
        r.mixed_c: [r.base_c]}.items()}
    assert plan.interleaved == groups
    for first, others in plan.interleaved.items():
        at = names.index(first)
        assert names[at:at + 1 + len(others)] == [first, *others]
        assert all(specs[o].reuse == first and specs[o].reduced_router == ("+reduced" in o) and specs[o].concurrency
                   == specs[first].concurrency and specs[o].requests == specs[first].requests for o in others)
    assert roles.resolution_pairs["choice"][0] == (roles.mode_pairs[1][1], reduced_other_1)
    assert (roles.gateway_1, roles.gateway_c) == (phase_name(gateway("one-token"), 1),
                                                  phase_name(gateway("one-token"), 16))
    assert roles.mode_pairs == {1: (roles.router_1, phase_name(router_only("choice"), 1)),
                                16: (roles.router_c, phase_name(router_only("choice"), 16))}
    # At the compare concurrency a group runs two turns each, each turn a phase's worth of screenshots.
    assert turn_size(bench, 1) == 1 and turn_size(bench, 16) == bench.requests_at(16) == 64
    assert {specs[n].requests for n in (roles.router_c, roles.expert_c, roles.gateway_c, roles.mixed_c)} == {128}
    assert specs[roles.mixed_c].workload.exact_tokens and specs[roles.base_c].workload.exact_tokens
    without = build_plan(bench, "one-token", ["calendar", "claim-window"], with_gateway=False)
    assert not any(p.workload.via_gateway for p in without.phases)
    assert without.roles.gateway_1 == without.roles.gateway_c == ""


def test_compared_phases_run_in_every_round_and_the_rest_once():
    bench = BenchConfig(concurrencies=[1, 4, 16, 32], compare_concurrency=16, per_expert_requests=2, rounds=3)
    plan = build_plan(bench, "one-token", ["calendar"])
    names = [p.name for p in plan.phases]
    assert len(names) == len(set(names)) and len(plan.rounds) == 3
    compared = ("two_stage_1", "router_1", "expert_1", "two_stage_c", "router_c", "expert_c", "mixed_c", "base_c",
                "gateway_1", "gateway_c", "reduced_route_1")
    for r, roles in enumerate(plan.rounds, start=1):
        for role in compared:
            name = getattr(roles, role)
            assert name in names and name.endswith(f"#{r}") == (r > 1), (r, role, name)
        assert [roles.mode_pairs[k][1] for k in (1, 16)] == [
            phase_name(router_only("choice"), k, round_=r) for k in (1, 16)]
        # Measured once: reduced resolution at the compare concurrency (it reads vLLM's counters) and in the other
        # router mode, and what every round reads.
        assert roles.reduced_two_stage_c == plan.roles.reduced_two_stage_c
        assert roles.resolution_pairs == plan.roles.resolution_pairs
        assert roles.two_stage_all == plan.roles.two_stage_all and roles.two_stage_c in roles.two_stage_all
    assert [n for n in names if "+reduced" in n and "#" in n] == [r.reduced_route_1 for r in plan.rounds[1:]]
    # Later rounds after the first, before the sweep above the compare concurrency and the open loop.
    last_round = max(names.index(getattr(r, role)) for r in plan.rounds for role in compared)
    assert last_round < names.index(phase_name(two_stage("one-token"), 32)) < names.index(
        phase_name(two_stage("one-token"), None))


def _target(measured, threshold="<= 1.15", met=None):
    return Target("routing costs little", measured, threshold, met, "detail")


def test_a_target_over_rounds_is_judged_on_its_median_and_shows_its_range():
    # Rounds 1.10, 1.30, 1.12, 1.20, 1.05: the median 1.12 meets <= 1.15, though two rounds do not.
    rounds = [[_target(v, met=v <= 1.15), _target(2.0, ">= 0.45", True), _target(0.5, "(informational)")]
              for v in (1.10, 1.30, 1.12, 1.20, 1.05)]
    overhead, once, info = over_rounds(rounds)
    assert overhead.measured == pytest.approx(1.12) and overhead.met is True
    assert overhead.rounds == [1.10, 1.30, 1.12, 1.20, 1.05]
    assert "median of 5 rounds, range 1.05-1.3" in overhead.detail
    assert (once.measured, once.met, once.detail) == (2.0, True, "detail")  # phases run once: as measured
    assert info.met is None
    worse = over_rounds([[_target(v)] for v in (1.16, 1.30, 1.10)])[0]
    assert worse.measured == pytest.approx(1.16) and worse.met is False
    assert meets("<= 5 ms", 4.0) and not meets(">= 0.95", 0.9) and meets("== 1", 1) and meets("(informational)", 1) is None


class _OrderClient:
    """Answers run_expert at once and notes which screenshot (by its prompt) asked."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def run_expert(self, expert, image, prompt, max_tokens, extra_body=None):
        self.calls.append(prompt)
        return type("Result", (), {"latency_s": 0.0, "prompt_tokens": 1, "completion_tokens": 1})()


def _screenshots(side: str, n: int) -> list[SimpleNamespace]:
    return [SimpleNamespace(index=i, kind="calendar", prompt=f"{side}{i}", max_tokens=2, image=None,
                            image_tokens=1, router_image_tokens=1) for i in range(n)]


def test_interleaved_phases_reverse_their_order_every_turn():
    client = _OrderClient()
    a, b = asyncio.run(interleaved(client, None, [(EXPERT_ONLY, _screenshots("a", 3), "a"),
                                                  (EXPERT_ONLY, _screenshots("b", 3), "b")]))
    assert client.calls == ["a0", "b0", "b1", "a1", "a2", "b2"]
    assert [r.phase for r in a.records] == ["a"] * 3 and [r.index for r in b.records] == [0, 1, 2]
    assert all(r.ok for r in a.records + b.records) and a.duration_s >= 0
    client = _OrderClient()
    asyncio.run(interleaved(client, None, [(EXPERT_ONLY, _screenshots(side, 2), side) for side in "abc"]))
    assert client.calls == ["a0", "b0", "c0", "c1", "b1", "a1"]


def test_interleaved_turns_at_a_concurrency_alternate_and_count_each_side_s_cpu():
    client, readings = _OrderClient(), iter(range(100))

    def meter():  # 1 CPU second of the benchmark and 10 of the server between two readings
        t = next(readings)
        return float(t), 10.0 * t

    a, b = asyncio.run(interleaved(client, None, [(EXPERT_ONLY, _screenshots("a", 5), "a"),
                                                  (EXPERT_ONLY, _screenshots("b", 5), "b")], concurrency=2, turn=2,
                                   meter=meter))
    assert client.calls == ["a0", "a1", "b0", "b1", "b2", "b3", "a2", "a3", "a4", "b4"]
    assert [r.index for r in a.records] == [0, 1, 2, 3, 4] == [r.index for r in b.records]
    assert (a.client_cpu_s, a.server_cpu_s) == (b.client_cpu_s, b.server_cpu_s) == (3.0, 30.0)  # 3 turns each
    a, _ = asyncio.run(interleaved(client, None, [(EXPERT_ONLY, _screenshots("a", 2), "a"),
                                                  (EXPERT_ONLY, _screenshots("b", 2), "b")], meter=lambda: (0.0, None)))
    assert a.server_cpu_s is None  # a server started elsewhere: its CPU time is not known


def _record(phase: str, index: int, e2e: float, route: float | None = 0.04) -> RequestRecord:
    return RequestRecord(phase=phase, index=index, kind="calendar", start_s=0.0, e2e_s=e2e, route_s=route,
                         expert_s=None, routed="calendar", route_mode="one-token", fallback_reason=None,
                         expert="calendar", route_prompt_tokens=None, route_completion_tokens=None,
                         expert_prompt_tokens=60, expert_completion_tokens=20, max_tokens=21, image_tokens=27,
                         router_image_tokens=27, ok=True, error=None)


def _phase(name: str, records: list[RequestRecord], duration_s: float, concurrency: int,
           workload: str = "two-stage[one-token]") -> PhaseMetrics:
    return summarise(name, workload, records, duration_s, ServerSnapshot(), (0.0, 0.0), 0, 0.0, concurrency)


def _targets(phases: list[PhaseMetrics], records: list[RequestRecord] = ()) -> tuple[Roles, dict[str, Target]]:
    bench = BenchConfig(concurrencies=[1, 16], compare_concurrency=16, per_expert_requests=2)
    roles = build_plan(bench, "one-token", ["calendar"]).roles
    return roles, {t.name.split(":")[0]: t for t in evaluate({p.name: p for p in phases}, roles, [], [], records)}


def test_gateway_targets_compare_it_with_the_client_side_two_stage_phases():
    roles, _ = _targets([])
    client_1 = [_record(roles.two_stage_1, i, e) for i, e in enumerate([0.200, 0.210, 0.300])]
    gateway_1 = [_record(roles.gateway_1, i, e) for i, e in enumerate([0.204, 0.216, 0.303])]
    # The gateway's stage histograms: 0.2062 s in all, 0.04 + 0.163 s of it in its two vLLM calls.
    stages = {f"{GATEWAY_STAGE}[{k}]": v for k, v in
              {"image": 0.001, "route": 0.040, "expert": 0.163, "total": 0.2062}.items()}
    phases = [_phase(roles.two_stage_1, client_1, 1.0, 1),
              dataclasses.replace(_phase(roles.gateway_1, gateway_1, 1.0, 1), server_means_s=stages),
              _phase(roles.two_stage_c, client_1 * 4, 1.0, 16), _phase(roles.gateway_c, gateway_1 * 4, 1.25, 16)]
    _, targets = _targets(phases, client_1 + gateway_1)
    latency = targets["gateway added latency"]
    assert latency.measured == pytest.approx(3.2)  # 206.2 - 40 - 163 ms
    assert latency.met is True and "its own time beside the two vLLM calls 3.2 ms" in latency.detail
    end_to_end = targets["gateway / client-side two-stage end to end"]
    assert end_to_end.measured == pytest.approx(1.02)  # per screenshot 1.02, 1.0286 and 1.01
    assert end_to_end.detail.startswith("over 3 screenshots (median difference 0.004 s); p50 0.216 s vs 0.21 s")
    throughput = targets["gateway / client-side two-stage screenshots/s, compare concurrency (same screenshots)"]
    assert throughput.measured == pytest.approx(0.8)  # 12 in 1.25 s against 12 in 1 s
    assert throughput.met is False
    _, absent = _targets(phases[:1] + phases[2:3])
    assert absent["gateway added latency"].met is None and "no gateway" in absent["gateway added latency"].detail
    assert absent["gateway / client-side two-stage end to end"].measured is None


def test_the_c16_pairs_are_also_compared_per_cpu_second_of_the_server_and_the_benchmark():
    from benchmarks.hf_baselines import TWO_STAGE_INFERENCE, BaselineResult

    roles, _ = _targets([])
    # The gateway phase took longer on the clock (another tenant) but the same CPU: 12 screenshots, 6 CPU s each.
    client = dataclasses.replace(_phase(roles.two_stage_c, [_record(roles.two_stage_c, i, 0.2) for i in range(12)],
                                        1.0, 16), server_cpu_s=5.0, client_cpu_s=1.0)
    gateway = dataclasses.replace(_phase(roles.gateway_c, [_record(roles.gateway_c, i, 0.2) for i in range(12)],
                                         1.5, 16), server_cpu_s=5.5, client_cpu_s=0.5)
    mixed = dataclasses.replace(_phase(roles.mixed_c, [_record(roles.mixed_c, i, 0.2) for i in range(12)], 1.0, 16,
                                       "adapters-mixed"), server_cpu_s=3.0, client_cpu_s=1.0)
    base = dataclasses.replace(_phase(roles.base_c, [_record(roles.base_c, i, 0.2) for i in range(12)], 2.0, 16,
                                      "base-only"), server_cpu_s=4.0, client_cpu_s=1.0)
    hf = BaselineResult(name=TWO_STAGE_INFERENCE, device="cpu", dtype="float32", threads=2, screenshots=4,
                        duration_s=2.0, screenshots_per_s=2.0, seconds_per_screenshot=[0.5] * 4, output_tokens=80,
                        routing_accuracy=1.0, cpu_s=4.0)
    targets = {t.name: t for t in evaluate({p.name: p for p in (client, gateway, mixed, base)}, roles, [hf], [])}
    wall = targets["gateway / client-side two-stage screenshots/s, compare concurrency (same screenshots)"]
    cost = targets["gateway / client-side two-stage screenshots per CPU second, compare concurrency (same screenshots)"]
    assert wall.measured == pytest.approx(1 / 1.5) and cost.measured == pytest.approx(1.0) and cost.met is None
    assert "0.5 CPU s per screenshot (server 5.5 s + benchmark 0.5 s over 1.5 s)" in cost.detail
    vllm_hf = targets[f"vLLM multi-LoRA two-stage (compare concurrency) / {TWO_STAGE_INFERENCE} screenshots per "
                      "CPU second"]
    assert vllm_hf.measured == pytest.approx((12 / 6) / (4 / 4.0))
    tokens = targets["all expert adapters mixed / base model without LoRA, generated tokens per CPU second"]
    assert tokens.measured == pytest.approx((12 * 20 / 4.0) / (12 * 20 / 5.0))
    # A server started elsewhere: its CPU time is unknown, so is the ratio.
    elsewhere = {t.name: t for t in evaluate({roles.two_stage_c: dataclasses.replace(client, server_cpu_s=None),
                                              roles.gateway_c: gateway}, roles, [], [])}
    assert elsewhere[cost.name].measured is None


def test_a_process_tree_s_cpu_time_counts_its_children():
    import subprocess
    import sys

    from benchmarks.server import process_tree_cpu_s

    burn = ("import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
            "print(1, flush=True)\nimport sys; sys.stdin.read()")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys; c = subprocess.Popen([sys.executable, "
                               f"'-c', {burn!r}], stdout=sys.stdout, stdin=subprocess.PIPE); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline() == "1\n"  # the child has burnt its 0.3 s and waits
        assert process_tree_cpu_s(parent.pid) >= 0.3
    finally:
        parent.kill()
        parent.wait()
    assert process_tree_cpu_s(parent.pid) == 0.0  # gone


def test_paired_matches_screenshots_by_index_and_skips_failures():
    a = [_record("a", 0, 0.1), _record("a", 1, 0.2), _record("a", 2, 0.3)]
    b = [_record("b", 1, 0.25), _record("b", 0, 0.1), dataclasses.replace(_record("b", 2, 0.9), e2e_s=None)]
    assert paired(a + b, "a", "b") == [(0.2, 0.25), (0.1, 0.1)]
    assert paired(a, "a", "b") == []


def test_one_token_routes_are_checked_on_the_server_only_where_a_phase_has_its_own_metrics():
    roles, _ = _targets([])
    mine, other = roles.mode_pairs[16]
    reduced = roles.resolution_pairs["one-token"][0][1]

    def phase(name: str, workload: str, generated: float, interleaved_with: str | None = None) -> PhaseMetrics:
        records = [dataclasses.replace(_record(name, i, 0.1), route_completion_tokens=1) for i in range(4)]
        return dataclasses.replace(_phase(name, records, 1.0, 16, workload), interleaved_with=interleaved_with,
                                   server={"vllm:generation_tokens_total": generated})

    name = "generated tokens per route in one-token mode (most in any route)"
    # The pair's counters hold the choice mode's tokens too (3 a route): not held against one-token mode.
    pair = [phase(mine, "router-only[one-token]", 16.0, other), phase(other, "router-only[choice]", 16.0, mine)]
    _, targets = _targets([*pair, phase(reduced, "router-only[one-token]", 4.0)])
    assert targets[name].met is True and "per route in router-only one-token phases 1" in targets[name].detail
    _, targets = _targets([*pair, phase(reduced, "router-only[one-token]", 8.0)])  # 2 tokens a route on its own
    assert targets[name].measured == 1 and targets[name].met is False


def test_the_multimodal_cache_hit_rate_is_read_from_two_stage_phases_that_ran_alone():
    roles, _ = _targets([])
    swept = phase_name(two_stage("one-token"), 4)

    def phase(name: str, hits: float, queries: float, interleaved_with: str | None = None) -> PhaseMetrics:
        return dataclasses.replace(_phase(name, [_record(name, 0, 0.5)], 1.0, 16), interleaved_with=interleaved_with,
                                   server={"vllm:mm_cache_hits_total": hits, "vllm:mm_cache_queries_total": queries})

    # A group's counters hold its router-only and expert-only requests too, which never hit: left out.
    grouped = phase(roles.two_stage_c, 10.0, 100.0, roles.router_c)
    roles = dataclasses.replace(roles, two_stage_all=[roles.two_stage_c, swept])
    targets = {t.name: t for t in evaluate({p.name: p for p in (grouped, phase(swept, 8.0, 16.0))}, roles, [], [])}
    rate = targets["multimodal cache hit rate on two-stage traffic"]
    assert rate.measured == pytest.approx(0.5) and rate.met is True and "the 1 full-resolution" in rate.detail


def test_routing_cost_per_expert_and_the_router_mode_targets():
    roles, _ = _targets([])
    ts_name, ex_name = roles.per_expert["calendar"]
    expert = [_record(ex_name, i, e, route=None) for i, e in enumerate([0.20, 0.25, 0.30])]
    routed = [_record(ts_name, i, e) for i, e in enumerate([0.24, 0.29, 0.33])]
    mine_1, other_1 = roles.mode_pairs[1]
    mine_c, other_c = roles.mode_pairs[16]
    routers = [_phase(mine_1, [_record(mine_1, 0, 0.05)] * 20, 1.0, 1, "router-only[one-token]"),
               _phase(other_1, [_record(other_1, 0, 0.09)] * 10, 1.0, 1, "router-only[choice]"),
               _phase(mine_c, [_record(mine_c, 0, 0.5)] * 30, 1.0, 16, "router-only[one-token]"),
               _phase(other_c, [_record(other_c, 0, 0.5)] * 36, 1.0, 16, "router-only[choice]")]
    _, targets = _targets([_phase(ex_name, expert, 1.0, 1, "expert-only"), _phase(ts_name, routed, 1.0, 1),
                           *routers])
    overhead = targets["routing costs little for calendar"]
    assert overhead.measured == pytest.approx(0.29 / 0.25) and overhead.met is False  # 1.16 > 1.15
    mode = next(t for name, t in targets.items() if name.startswith("the router mode in use (one-token)"))
    assert mode.measured == pytest.approx(30 / 36) and mode.met is False  # 2.0 at c=1, 0.83 at c=16
    assert "c=1:" in mode.detail and "c=16:" in mode.detail


def test_twins_are_the_same_screenshots_in_new_bytes():
    pool = ScreenPool(0, {"calendar": 1.0, "provider-select": 1.0}, image_max_pixels=None, router_max_pixels=20_000,
                      expert_max_tokens=None, answer_tokens=len, image_tokens=lambda w, h: w * h // 1024)
    items = pool.take(2)
    twins, second = pool.twins(items), pool.twins(items)  # two copies of each, as a group of interleaved phases sends
    for item, *copies in zip(items, twins, second):
        for k, twin in enumerate(copies, start=1):
            assert (twin.index, twin.kind, twin.seed, twin.prompt, twin.max_tokens, twin.image_tokens, twin.copy) == (
                item.index, item.kind, item.seed, item.prompt, item.max_tokens, item.image_tokens, k)
            assert twin.router_image is twin.image
            original, copy = (_pixels(p) for p in (item.image, twin.image))
            assert original.size == copy.size
            changed = [xy for xy in ((0, 0), (1, 0), (0, 1), (copy.width - 1, copy.height - 1))
                       if original.getpixel(xy) != copy.getpixel(xy)]
            assert changed == [(k - 1, 0)]  # the k-th copy nudges a pixel of its own
        assert len({image.data_url for image in (item.image, *(c.image for c in copies))}) == 3
    # Their reduced router images are new beside the original's and each other's too, at the same size.
    for item, *copies in zip(pool.reduced(items), pool.reduced(twins), pool.reduced(second)):
        assert len({i.router_image.data_url for i in (item, *copies)}) == 3
        assert {(i.router_image.width, i.router_image_tokens) for i in copies} == {
            (item.router_image.width, item.router_image_tokens)}


def _pixels(image: PreparedImage):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(image.png)).convert("RGB")


def test_peer_dataset_carries_our_images_first_and_the_command_is_vllm_bench_serve(tmp_path):
    item = type("Item", (), {"image": PreparedImage("data:image/png;base64,AAAA", 4, 4, "x"), "prompt": "Do it."})
    path = tmp_path / "d.jsonl"
    peer.write_dataset([item, item], path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                   {"type": "text", "text": "Do it."}]
    cmd = peer.bench_command(root_url="http://h:1", model="base", tokenizer="/m", experts=["a", "b"], dataset=path,
                             num_prompts=2, max_concurrency=2, output_len=7, seed=0, result_dir=tmp_path)
    assert cmd[1:3] == ["-m", "benchmarks.peer"]
    for flag, value in (("--dataset-name", "custom_image"), ("--backend", "openai-chat"),
                        ("--custom-output-len", "7"), ("--max-concurrency", "2")):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--lora-modules") + 1:cmd.index("--lora-modules") + 3] == ["a", "b"]
    # Through the gateway: model auto, no LoRA names (the gateway routes), its own result file.
    cmd = peer.bench_command(root_url="http://h:2", model="auto", tokenizer="/m", experts=[], dataset=path,
                             num_prompts=2, max_concurrency=2, output_len=7, seed=0, result_dir=tmp_path,
                             result_file=peer.GATEWAY_RESULT_FILE)
    assert "--lora-modules" not in cmd and cmd[cmd.index("--model") + 1] == "auto"
    assert cmd[cmd.index("--result-filename") + 1] == peer.GATEWAY_RESULT_FILE


def test_random_model_on_a_scaled_down_shape_loads_and_passes_serving_checks(tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from lora_router.deployment import load_config

    path = random_8b.build(tmp_path, random_8b.SMALL_SHAPE, rank=4, seed=0,
                           base_config=random_8b.configs_dir() / "qwen3-vl-8b.yaml", shard_bytes=300_000)
    deployment = load_config(path)  # build() already ran serving's adapter checks on it
    assert deployment.model.path == str(tmp_path / "model")
    assert [a.name for a in deployment.adapters] == ["router", "calendar", "claim-window", "provider-select"]
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"], vision["depth"]) == (128, 2, 2048, 2)
    assert text["rope_parameters"]["mrope_section"] == [12, 10, 10]
    # Qwen's special tokens follow the regular tokens in Qwen's order, as in the real tokenizer.
    assert (config["vision_start_token_id"], config["image_token_id"], text["eos_token_id"]) == (2009, 2012, 2002)
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path / "model"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert float(model.model.language_model.norm.weight.detach().float().mean()) == 1.0
    PeftModel.from_pretrained(model, str(tmp_path / "adapters" / "calendar"))
    assert AutoProcessor.from_pretrained(str(tmp_path / "model")).tokenizer.convert_tokens_to_ids("<|im_end|>") == 2002


def test_gpu_8b_trains_a_router_and_runs_both_baselines_on_the_scaled_down_shape(tmp_path):
    """The GPU script's whole path on a CPU: random model, routing dataset, the project's trainer, baselines."""
    from benchmarks import gpu_8b

    out = tmp_path / "out"
    assert gpu_8b.main(["--work", str(tmp_path / "work"), "--out", str(out), "--small", "True", "--steps", "3",
                        "--warmup_steps", "1", "--batch_size", "2", "--screenshots", "1"]) == 0
    result = json.loads((out / "gpu_8b.json").read_text())
    training = result["training"]
    assert training["steps"] == 3 and training["step_s"]["count"] == 2  # the warm-up step left out
    assert training["loss_first"] > 0 and training["peak_memory_gib"] is None  # no GPU here
    assert (training["bf16"], training["base_dtype"]) == (False, "float32")  # bf16 and its base only on CUDA
    assert (tmp_path / "work" / "router" / "adapter_model.safetensors").is_file()
    baselines = result["baselines"]
    assert [b["name"] for b in baselines] == ["hf-two-stage-inference", "hf-single-load"]
    assert all(b["screenshots"] == 1 and b["output_tokens"] > 0 for b in baselines)
    assert "| step p50 s |" in (out / "gpu_8b.md").read_text()
    # A second run reuses the model it wrote (the 8B one took 4 minutes to write) and makes its dataset afresh.
    weights = next((tmp_path / "work" / "model").glob("*.safetensors"))
    written = weights.stat().st_mtime_ns
    assert gpu_8b.main(["--work", str(tmp_path / "work"), "--out", str(out), "--small", "True", "--steps", "2",
                        "--warmup_steps", "1", "--batch_size", "2", "--screenshots", "0"]) == 0
    assert weights.stat().st_mtime_ns == written
    rerun = json.loads((out / "gpu_8b.json").read_text())
    assert rerun["training"]["steps"] == 2 and rerun["baselines"] == []


@pytest.mark.parametrize("flags, problem", [
    (["--steps", "3", "--warmup_steps", "3"], "warmup_steps (3) must be below steps (3)"),
    (["--batch_size", "0", "--screenshots", "-1"], "batch_size must be >= 1, got 0; screenshots must be >= 0, got -1"),
])
def test_gpu_8b_refuses_bad_settings_naming_each(tmp_path, flags, problem, capsys):
    from benchmarks import gpu_8b

    with pytest.raises(SystemExit) as exit_:
        gpu_8b.main(["--work", str(tmp_path), *flags])
    assert exit_.value.code == 2 and problem in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_the_default_shape_is_qwen3_vl_8b():
    shape = random_8b.Qwen3VLShape()
    tokenizer = random_8b.build_tokenizer(shape)
    assert len(tokenizer) == 151669
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                        "<|image_pad|>", "</think>")] == [151643, 151645, 151652,
                                                                                         151655, 151668]
    shapes = random_8b.weight_shapes(random_8b.build_config(shape, tokenizer))
    assert sum(random_8b._numel(s) for s in shapes.values()) == pytest.approx(8.767e9, rel=1e-3)
    assert shapes["model.language_model.embed_tokens.weight"] == (151936, 4096)
    assert shapes["model.language_model.layers.35.mlp.gate_proj.weight"] == (12288, 4096)
    assert shapes["model.language_model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.visual.blocks.26.mlp.linear_fc1.weight"] == (4304, 1152)


@pytest.mark.integration
def test_smoke_run_accounts_for_every_request(served, tmp_path):
    # The session server's gateway for both: client-side phases through its forwarding, gateway phases as model auto.
    bench = BenchConfig(base_url=served.base_url, gateway_url=served.base_url, concurrencies=[1, 2], min_requests=2,
                        requests_per_slot=1,
                        per_expert_requests=1, compare_concurrency=2, warmup_requests=1, request_rate=4.0,
                        poisson_requests=2, class_mix={"calendar": 1, "claim-window": 1}, expert_max_tokens=4,
                        peer_requests=2, hf_requests=1, rounds=2)
    result = asyncio.run(run_benchmark(bench, served.config, tmp_path))
    paths = write_report(result, tmp_path)

    plan = build_plan(bench, result.setup["router_mode"], ["calendar", "claim-window"])
    by_name = {p.name: p for p in result.phases}
    assert list(by_name) == [spec.name for spec in plan.phases]
    for spec in plan.phases:
        phase = by_name[spec.name]
        records = [r for r in result.records if r.phase == spec.name]
        assert phase.screenshots == len(records) == spec.requests
        assert phase.completed + phase.failed == spec.requests
    assert len(result.records) == sum(spec.requests for spec in plan.phases)
    # No screenshot is sent twice, except as twins (some with reduced router images), on purpose.
    reusing = {spec.name: spec.reuse for spec in plan.phases if spec.reuse}
    fresh = [r.index for r in result.records if r.phase not in reusing]
    assert len(fresh) == len(set(fresh))
    for name, source in reusing.items():
        assert {r.index for r in result.records if r.phase == name} == {
            r.index for r in result.records if r.phase == source}
    assert result.warmup["screenshots"] == len({(s.workload, s.reduced_router) for s in plan.phases}) * (
        bench.warmup_requests + bench.compare_concurrency)
    # Mixed adapters and the base model write exactly max_tokens each (ignore_eos), so they compare the same work.
    exact = [r for r in result.records if r.phase in (plan.roles.mixed_c, plan.roles.base_c) and r.ok]
    assert exact and all(r.expert_completion_tokens == r.max_tokens == 4 for r in exact)
    gateway_phases = (plan.roles.gateway_1, plan.roles.gateway_c)
    gateway_records = [r for r in result.records if r.phase in gateway_phases]
    assert len(gateway_records) == 2 + 4  # at c=2: two turns of 2 each
    for r in gateway_records:
        if r.ok:  # what the gateway's x-route-* headers said
            assert r.route_s > 0 and r.route_mode == result.setup["router_mode"]
            assert r.expert in ("calendar", "claim-window", "provider-select")
        else:  # a random stand-in router's answer that names no expert, under the session server's fallback 'error'
            assert r.error.startswith("GatewayRequestError: 422: route refused"), r.error

    data = json.loads(paths["json"].read_text())
    expected = {"setup", "phases", "targets", "resolution", "baselines", "peers", "server", "warmup", "requests"}
    assert expected <= set(data)
    assert data["server"]["before"].keys() == data["server"]["after"].keys()
    assert len(data["requests"]) == len(result.records)
    assert {t["name"].split(":")[0] for t in data["targets"]} >= {
        "chaining adds nothing", "pipelining adds nothing", "gateway added latency",
        "gateway / client-side two-stage screenshots/s, compare concurrency (same screenshots)"}
    # Both baselines once per round of the compared phases, each round's ratio against that round's vLLM phase.
    assert [(b["name"], b["round"]) for b in data["baselines"]] == [
        ("hf-two-stage-inference", 1), ("hf-single-load", 1), ("hf-two-stage-inference", 2), ("hf-single-load", 2)]
    hf = next(t for t in data["targets"] if t["name"].endswith("/ hf-two-stage-inference screenshots/s"))
    assert len(hf["rounds"]) == 2 and None not in hf["rounds"]
    # Every request of both runs answered (through the gateway, a refused route counts as failed).
    assert [(p["target"], p["returncode"], p["result"]["completed"] + p["result"]["failed"])
            for p in data["peers"]] == [("vllm", 0, 2), ("gateway", 0, 2)]
    assert {a.mode for a in result.resolution} == {"choice", "one-token"}
    assert 0 < sum(a.pairs for a in result.resolution) <= sum(by_name[name].screenshots for name in reusing)
    markdown = paths["markdown"].read_text()
    for section in ("## Targets", "## Phases", "## Where the time goes", "## vLLM /metrics counters",
                    "`vllm bench serve` through the gateway"):
        assert section in markdown
    for kind in ("latency", "throughput"):
        assert paths[kind].read_bytes()[:4] == b"\x89PNG"
    assert Path(tmp_path / peer.RESULT_FILE).exists() and Path(tmp_path / peer.GATEWAY_RESULT_FILE).exists()


def test_the_failover_windows_count_each_request_once_by_when_it_started(tmp_path):
    from benchmarks.failover import FailoverMetrics, _window, markdown, plot

    requests = [{"start_s": s, "e2e_s": 0.5, "status": status, "replica": replica}
                for s, status, replica in [(0.1, 200, "a"), (0.6, 200, "b"), (1.2, 502, None), (1.5, 200, "a"),
                                           (3.1, 200, "b"), (3.4, 200, "a")]]
    windows = [_window("before", 0.0, 1.0, requests), _window("during", 1.0, 3.0, requests),
               _window("after", 3.0, 5.0, requests)]
    assert [(w.requests, w.failed) for w in windows] == [(2, 0), (2, 1), (2, 0)]
    assert [w.screenshots_per_s for w in windows] == [2.0, 0.5, 1.0]
    metrics = FailoverMetrics(concurrency=2, killed_at=1.0, marked_down_at=1.4, restarted_at=2.5, marked_up_at=3.0,
                              windows=windows, requests=requests)
    assert metrics.failed == 1
    table = markdown(metrics)
    assert "| during | 2.0 | 2 | 1 | 0.50 |" in table and "marked B down 0.4 s later" in table
    plot(metrics, tmp_path / "failover.png")
    assert (tmp_path / "failover.png").stat().st_size > 10_000


def test_two_runs_compared_target_by_target_within_the_tolerance(tmp_path):
    def run(name: str, values: dict, rounds: dict | None = None) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps({"targets": [
            {"name": n, "measured": v, "threshold": "<= 5 ms" if n == "added" else ">= 0.95",
             "rounds": (rounds or {}).get(n)} for n, v in values.items()]}))
        return folder

    first = run("a", {"gateway / client-side": 0.95, "mode": 1.20, "not run": None, "only first": 1.0, "added": -1.9},
                {"gateway / client-side": [0.9, 0.95, 1.0], "mode": [1.2, 1.2, 1.2]})
    close = run("b", {"gateway / client-side": 0.99, "mode": 1.10, "not run": None, "added": 2.5},
                {"gateway / client-side": [0.8, 0.99, 1.3], "mode": [1.1, 1.1, 1.1]})
    assert compare_main([str(first), str(close)]) == 0
    table = (close / "compare.md").read_text()
    assert "| gateway / client-side | 0.95 | 0.99 | +4.2% | yes | 3: 0.9-1 | 3: 0.8-1.3 |" in table
    assert "| only first | 1 | - | - | - | - | - | - |" in table
    assert "| added | -1.9 | 2.5 | +4.4 ms | yes | - | - | - |" in table  # a difference near 0: compared in ms
    rows = {r.name: r for r in compare_rows(*(json.loads((f / "report.json").read_text()) for f in (first, close)))}
    # Rounds that never move need one; a spread as wide as the benchmark's c=16 pairs needs many more than 5.
    assert rows["mode"].rounds_needed(0.1) == 1 and "| mode | 1.2 | 1.1 | -8.3% | yes | 3: 1.2-1.2 | 3: 1.1-1.1 | 1 |" \
        in table
    assert rows["gateway / client-side"].rounds_needed(0.1) > rows["gateway / client-side"].rounds_needed(0.3) > 5
    assert rows["added"].rounds_needed(0.1) is None
    apart = run("c", {"gateway / client-side": 0.70, "mode": 1.20})
    assert compare_main([str(first), str(apart), "--tolerance", "0.1"]) == 1
    assert "| gateway / client-side | 0.95 | 0.7 | -26.3% | **no** | 3: 0.9-1 | - | - |" in (
        apart / "compare.md").read_text()
    assert compare_main([str(first), str(tmp_path / "missing")]) == 1


@pytest.mark.parametrize("settings, message", [
    ({"family": "vaporwave"}, "family must be one of"),
    ({"recipe": "full"}, "recipe must be one of lm, tower, got 'full'"),
    ({"labelled": 0}, "must be >= 1"),
    ({"replay_per_class": 0}, "replay_per_class must be >= 1"),
    ({"warm_epochs": 0.0}, "warm_epochs > 0"),
])
def test_bad_learning_loop_settings_are_refused_naming_them(settings, message):
    from benchmarks.learning_loop import LoopConfig

    with pytest.raises(ValueError, match=message):
        LoopConfig(**settings)


def test_the_played_reviewer_labels_unlabelled_captures_with_the_truth_up_to_the_most(tmp_path):
    from benchmarks.learning_loop import review
    from lora_router.capture import CaptureItem, CaptureStore

    store = CaptureStore(tmp_path / "captures", max_items=100, max_age_s=1e9, max_bytes=1 << 30)
    for n, label in enumerate(["calendar", None, None, None, None]):
        store.add(CaptureItem(id=f"r{n}", captured_at=1e9 + n, router="router@1", expert="calendar", confidence=0.9,
                              probabilities={}, fallback=None, reasons=["random"], size=3, label=label), b"png")
    truth = {"r0": "calendar", "r1": "claim-window", "r2": "provider-select", "r4": "calendar"}  # r3: unknown
    assert review(store, truth, most=3) == 2  # r0 was labelled already: room for two more, in order
    assert {i.id: i.label for i in store.items().values()} == {
        "r0": "calendar", "r1": "claim-window", "r2": "provider-select", "r3": None, "r4": None}


def test_until_waits_for_the_condition_and_names_what_it_waited_for():
    from benchmarks.server import until
    from lora_router.configuration import CommandError

    calls = []

    async def third_time() -> bool:
        calls.append(1)
        return len(calls) == 3

    asyncio.run(until(third_time, "the third call"))
    assert len(calls) == 3

    async def never() -> bool:
        return False

    with pytest.raises(CommandError, match=r"waited 0.1 s for the balancer"):
        asyncio.run(until(never, "the balancer", deadline_s=0.1))
