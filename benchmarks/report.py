"""Writes a BenchmarkResult: report.json (everything, every request), report.md (tables) and two PNG plots.

    latency.png     two-stage latency percentiles (end to end, route, expert) against concurrency
    throughput.png  screenshots/s against concurrency: two-stage, router-only, expert-only, 1/(1/R + 1/E)
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from benchmarks.metrics import PhaseMetrics
from benchmarks.peer import PeerResult
from benchmarks.runner import BenchmarkResult
from benchmarks.server_metrics import COUNTERS, GATEWAY_STAGE, TIMINGS
from lora_router.percentiles import Percentiles

JSON_NAME, MARKDOWN_NAME, LATENCY_PNG, THROUGHPUT_PNG = "report.json", "report.md", "latency.png", "throughput.png"


def write_report(result: BenchmarkResult, out_dir: Path) -> dict[str, Path]:
    """Write the four files into out_dir; returns their paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME, "markdown": out_dir / MARKDOWN_NAME,
             "latency": out_dir / LATENCY_PNG, "throughput": out_dir / THROUGHPUT_PNG}
    paths["json"].write_text(json.dumps(to_json(result), indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown(result))
    _plot_latency(result, paths["latency"])
    _plot_throughput(result, paths["throughput"])
    return paths


def to_json(result: BenchmarkResult) -> dict:
    """The whole result as plain data; requests last (they are the bulk)."""
    data = dataclasses.asdict(result)
    data["server"] = {"before": result.server_before, "after": result.server_after,
                      "delta": {k: result.server_after.get(k, 0.0) - v for k, v in result.server_before.items()}}
    del data["server_before"], data["server_after"]
    data["requests"] = data.pop("records")
    return data


def _s(value: float | None, scale: float = 1000.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _pct(p: Percentiles) -> str:
    return "-" if p.p50 is None else f"{_s(p.p50)} / {_s(p.p90)} / {_s(p.p99)}"


def _ttft(p: Percentiles) -> str:
    return "-" if p.mean is None else f"{_s(p.mean)} ({_s(p.p50)} / {_s(p.p99)})"


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _range(values: Sequence[float | None]) -> str:
    """'n: low-high' over the rounds' values, '-' for a target measured once."""
    known = [v for v in values if v is not None]
    return f"{len(known)}: {min(known):.3f}-{max(known):.3f}" if len(set(values)) > 1 and known else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown(result: BenchmarkResult) -> str:
    """The report as markdown tables."""
    setup = result.setup
    out = [f"# lora-router benchmark, {setup['started_utc']}\n"]
    machine, versions = setup["machine"], setup["versions"]
    adapters = ", ".join(f"{a['name']} (r{a['rank']}{', random' if a['random_stand_in'] else ''})"
                         for a in setup["adapters"])
    image, reduced = setup["image_tokens"], setup["reduced_router_image_tokens"]
    rows = [
        ("config", setup["config_path"] or "(given as an object)"),
        ("model", f"{setup['deployment']['model']['path']} -> {setup['model_dir']}"),
        ("machine", f"{machine['cpu']}, {machine['cpu_cores']} cores"
                    + (f", {machine['gpu']}" if "gpu" in machine else "")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
        ("adapters", adapters),
        ("max_loras / max_lora_rank", f"{setup['max_loras']} / {setup['max_lora_rank']}"),
        ("CPU threads (vLLM worker, baselines)", str(setup["cpu_threads"]) if setup["server"]["started_by_benchmark"]
         else f"{setup['cpu_threads']} (baselines; the external server's own setting applies to vLLM)"),
        ("image tokens (full)", f"mean {image.get('mean', 0):.0f}, {image.get('min')}-{image.get('max')}"),
        ("router image tokens (reduced)",
         f"mean {reduced.get('mean', 0):.0f}, {reduced.get('min')}-{reduced.get('max')}" if reduced else "-"),
        ("router mode", setup["router_mode"]),
        ("client-side phases", setup["server"]["base_url"]
         + (" (vLLM itself, its internal key)" if setup["server"]["started_by_benchmark"] else "")),
        ("gateway phases", f"{setup['server']['gateway_url']} (model auto)" if setup["server"]["gateway_url"]
         else "skipped: a --base-url run without --gateway-url"),
        ("client", f"fallback {setup['client']['fallback']}, retries {setup['client']['max_retries']}"),
        ("TTFT", setup["ttft_source"]),
        ("warm-up", f"{result.warmup['screenshots']} screenshots, {result.warmup['failed']} failed (not measured)"),
        ("load average (1 min)", f"{setup['load_average_1m']['start']:.1f} at start, "
                                 f"{setup['load_average_1m']['end']:.1f} at end"),
    ]
    out.append(_table(("setup", ""), rows))

    out.append("\n## Targets (ratios within this run)\n\nA target over phases run in every round is the median "
               "over the rounds, judged on that median; the range is the rounds' lowest and highest value.\n\n")
    out.append(_table(("target", "measured", "rounds (range)", "threshold", "met", "detail"), [
        (t.name, _f(t.measured, 3), _range(t.rounds), t.threshold, {True: "yes", False: "**no**", None: "-"}[t.met],
         t.detail) for t in result.targets]))

    out.append("\n## Phases\n\nLatencies in ms as p50 / p90 / p99, over successful requests. TTFT in ms from "
               "vLLM's /metrics histogram over all requests of the phase (router and expert alike): the exact mean, "
               "then p50 / p99 interpolated inside its coarse buckets. Tokens are means per request. Phases marked "
               "*(interleaved)* ran in turns with their pair on twins of its screenshots (request by request at "
               "concurrency 1); their TTFT, cache and load columns cover both.\n\n")
    out.append(_table(
        ("phase", "ok/sent", "errors", "retries", "screenshots/s", "route", "expert", "end to end",
         "TTFT mean (p50 / p99)",
         "tokens in route/expert", "tokens out expert", "routing acc.", "unroutable", "mm cache hits", "load"),
        [(p.name + (" *(interleaved)*" if p.interleaved_with else ""), f"{p.completed}/{p.screenshots}", ", ".join(f"{k} {v}" for k, v in p.errors.items()) or "-",
          str(p.retries), _f(p.screenshots_per_s), _pct(p.route_s), _pct(p.expert_s), _pct(p.e2e_s), _ttft(p.ttft_s),
          f"{_f(p.mean_route_prompt_tokens, 0)}/{_f(p.mean_expert_prompt_tokens, 0)}",
          _f(p.mean_expert_completion_tokens, 1), _f(p.routing_accuracy), str(p.unroutable),
          _f(p.mm_cache_hit_rate), f"{p.load_before:.1f}->{p.load_after:.1f}")
         for p in result.phases]))

    out.append(_timings_section(result))
    out.append(_modes_section(result))

    out.append("\n## Reduced-resolution router (same screenshots, router-only phases)\n\n")
    out.append(_table(("router mode", "screenshots", "agreement", "accuracy full", "accuracy reduced",
                       "unroutable full", "unroutable reduced"),
                      [(a.mode, a.pairs, _f(a.agreement), _f(a.accuracy_full), _f(a.accuracy_reduced),
                        a.unroutable_full, a.unroutable_reduced) for a in result.resolution]))

    if result.baselines:
        out.append("\n## transformers + PEFT baselines (one screenshot at a time)\n\n")
        out.append(_table(("baseline", "round", "device / dtype / threads", "screenshots", "screenshots/s",
                           "s per screenshot (mean)", "output tokens", "routing acc."),
                          [(b.name, b.round, f"{b.device} / {b.dtype} / {b.threads}", b.screenshots,
                            _f(b.screenshots_per_s, 3),
                            _f(sum(b.seconds_per_screenshot) / len(b.seconds_per_screenshot)), b.output_tokens,
                            _f(b.routing_accuracy)) for b in result.baselines]))

    for peer in result.peers:
        out.append(_peer_section(result, peer))

    out.append("\n## vLLM /metrics counters (everything this run sent: warm-up, phases, the peer tool)\n\n")
    out.append(_table(("counter", "before", "after", "difference"), [
        (name, f"{result.server_before.get(name, 0):g}", f"{result.server_after.get(name, 0):g}",
         f"{result.server_after.get(name, 0) - result.server_before.get(name, 0):g}") for name in COUNTERS]))
    return "".join(out)


def _modes_section(result: BenchmarkResult) -> str:
    """Router-only phases side by side: choice vs one-token, full vs reduced resolution."""
    routers = sorted((p for p in result.phases if p.workload.startswith("router-only") and p.kind is None),
                     key=lambda p: (p.concurrency or 0, p.reduced_router, p.workload))
    rows = []
    for p in routers:
        generated = p.server.get("vllm:generation_tokens_total", 0.0)
        rows.append((p.name, p.concurrency, _pct(p.route_s), _f(p.screenshots_per_s), _f(p.mean_route_prompt_tokens, 0),
                     _f(generated / p.routes if p.routes else None), _f(p.routing_accuracy), p.unroutable))
    return "\n## Router modes and resolutions (router-only phases)\n\n" + _table(
        ("phase", "concurrency", "route ms p50 / p90 / p99", "routes/s", "prompt tokens", "generated tokens per route "
         "(server)", "routing acc.", "unroutable"), rows)


def _timings_section(result: BenchmarkResult) -> str:
    """Where a request's time goes, phase by phase at concurrency 1: the client's view, vLLM's per-request timing
    histograms (router and expert requests of the phase together) and the gateway's stages."""
    rows = []
    for p in result.phases:
        if p.concurrency != 1:
            continue
        means = p.server_means_s
        rows.append((p.name, _s(p.e2e_s.mean, digits=1), _s(p.route_s.mean, digits=1), _s(p.expert_s.mean, digits=1),
                     *(_s(means.get(name), digits=1) for name in TIMINGS), _gateway_stages(means)))
    return ("\n## Where the time goes at concurrency 1 (means, ms)\n\nClient: end to end, route, expert request as the "
            "client times them (a gateway phase's route is its x-route-ms). vLLM: its per-request histograms from "
            "arrival in the engine, over every request of the phase (a two-stage phase's router and expert requests "
            "together). The client's request time beyond vLLM's end to end is HTTP, the API server's parsing, chat "
            "template and image processing.\n\n" + _table(
                ("phase", "end to end", "route", "expert", "vLLM e2e", "vLLM queue", "vLLM prefill", "vLLM decode",
                 "gateway image / route / expert / total"), rows))


def _gateway_stages(means: dict[str, float]) -> str:
    stages = [means.get(f"{GATEWAY_STAGE}[{stage}]") for stage in ("image", "route", "expert", "total")]
    return "-" if None in stages else " / ".join(_s(v, digits=1) for v in stages)


def _peer_section(result: BenchmarkResult, peer: PeerResult) -> str:
    r = peer.result
    via_gateway = peer.target == "gateway"
    ours = next((p for p in result.phases if p.concurrency == peer.max_concurrency and p.kind is None
                 and not p.reduced_router
                 and (p.workload.startswith("gateway") if via_gateway else p.workload == "expert-only")), None)
    path = "through the gateway (model auto)" if via_gateway else "on the expert-only path (vLLM itself)"
    text = (f"\n## `vllm bench serve` {path} (concurrency {peer.max_concurrency}, {peer.num_prompts} "
            f"requests, {peer.output_len} output tokens each, exit {peer.returncode})\n\n")
    if not r:
        return text + "It failed; the end of its output:\n\n```\n" + peer.log_tail + "\n```\n"
    rows = [("requests/s", _f(r.get("request_throughput")), _f(ours.http_requests_per_s) if ours else "-"),
            ("output tokens/s", _f(r.get("output_throughput"), 1), _f(ours.output_tokens_per_s, 1) if ours else "-"),
            ("TTFT mean (p50 / p99) ms, client",
             f"{_f(r.get('mean_ttft_ms'), 0)} ({_f(r.get('median_ttft_ms'), 0)} / {_f(r.get('p99_ttft_ms'), 0)}) "
             "(streamed)", "- (not streamed)"),
            ("TTFT mean (p50 / p99) ms, server histogram", _ttft(peer.server_ttft_s),
             _ttft(ours.ttft_s) if ours else "-"),
            ("end to end p50 / p90 / p99 ms",
             f"{_f(r.get('median_e2el_ms'), 0)} / {_f(r.get('p90_e2el_ms'), 0)} / {_f(r.get('p99_e2el_ms'), 0)}",
             _pct(ours.e2e_s) if ours else "-"),
            ("client CPU seconds (same machine)", f"{peer.client_cpu_s:.1f} (start-up included)",
             f"{ours.client_cpu_s:.1f}" if ours else "-"),
            ("completed / failed", f"{r.get('completed')} / {r.get('failed', 0)}",
             f"{ours.completed} / {ours.failed}" if ours else "-"),
            ("mm cache hits / queries", f"{peer.server.get('vllm:mm_cache_hits_total', 0):g} / "
                                        f"{peer.server.get('vllm:mm_cache_queries_total', 0):g}",
             f"{ours.server.get('vllm:mm_cache_hits_total', 0):g} / "
             f"{ours.server.get('vllm:mm_cache_queries_total', 0):g}" if ours else "-")]
    if via_gateway:
        rows.append(("gateway image / route / expert / total ms (means)", _gateway_stages(peer.server_means_s),
                     _gateway_stages(ours.server_means_s) if ours else "-"))
    return text + _table(("", "vllm bench serve", f"this benchmark ({ours.name if ours else 'n/a'})"), rows)


def _sweep(result: BenchmarkResult, workload: str) -> list[PhaseMetrics]:
    """Closed-loop full-resolution phases of a workload on the class mix, by concurrency (the first round's)."""
    phases = [p for p in result.phases if p.workload == workload and p.concurrency is not None
              and not p.reduced_router and p.kind is None and "#" not in p.name]
    return sorted(phases, key=lambda p: p.concurrency)


def _two_stage_workload(result: BenchmarkResult) -> str:
    return f"two-stage[{result.setup['router_mode']}]"


def _plot_latency(result: BenchmarkResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = _sweep(result, _two_stage_workload(result))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [p.concurrency for p in sweep]
    for label, get, style in (("end to end p50", lambda p: p.e2e_s.p50, "-o"),
                              ("end to end p90", lambda p: p.e2e_s.p90, "--o"),
                              ("end to end p99", lambda p: p.e2e_s.p99, ":o"),
                              ("route p50", lambda p: p.route_s.p50, "-s"),
                              ("expert p50", lambda p: p.expert_s.p50, "-^")):
        ys = [get(p) for p in sweep]
        if xs and all(y is not None for y in ys):
            ax.plot(xs, [y * 1000 for y in ys], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (screenshots in flight)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"two-stage latency, {result.setup['machine']['cpu'][:40]}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_throughput(result: BenchmarkResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    mode = result.setup["router_mode"]
    for workload, style in ((_two_stage_workload(result), "-o"), (f"router-only[{mode}]", "s"),
                            ("expert-only", "^")):
        sweep = _sweep(result, workload)
        if sweep:
            ax.plot([p.concurrency for p in sweep], [p.screenshots_per_s for p in sweep], style, label=workload)
    routers = {p.concurrency: p.screenshots_per_s for p in _sweep(result, f"router-only[{mode}]")}
    experts = {p.concurrency: p.screenshots_per_s for p in _sweep(result, "expert-only")}
    both = sorted(c for c in routers if c in experts and routers[c] and experts[c])
    if both:
        ax.plot(both, [1 / (1 / routers[c] + 1 / experts[c]) for c in both], "kx", markersize=9,
                label="1/(1/R + 1/E)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (screenshots in flight)")
    ax.set_ylabel("screenshots / s")
    ax.set_title("throughput (closed loop)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
