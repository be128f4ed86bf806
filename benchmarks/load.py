"""Load-test a router + LoRA experts deployment on vLLM and write the report.

    python -m benchmarks.load --config configs/tiny-cpu.yaml                 # starts vLLM from the config
    python -m benchmarks.load --config configs/tiny-cpu.yaml --base-url http://127.0.0.1:8000/v1
    python -m benchmarks.load --config configs/qwen3-vl-8b.yaml --set model.path=/models/qwen3-vl-8b

Writes benchmarks/results/<YYYY-MM-DD_HHMMSS>/ (or --out): report.json, report.md, latency.png, throughput.png,
vllm_bench_serve.json and, when it started the server, vllm.log; then, unless --failover_window_s 0, runs the
failover phase (benchmarks.failover: two replicas behind the balancer, one vLLM killed) into failover.json,
failover.md and failover.png, and adds its table to report.md. Every BenchConfig field is a flag.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.config import BenchConfig
from benchmarks.failover import FailoverConfig, run_failover
from benchmarks.failover import markdown as failover_markdown
from benchmarks.failover import write_report as write_failover
from benchmarks.report import write_report
from benchmarks.runner import default_out_dir, run_benchmark
from lora_router.configuration import parse_command, run_command
from lora_router.deployment import DeploymentArguments
from serving.launcher import ServerError


@dataclass
class LoadArguments(DeploymentArguments):
    """The deployment flags of `python -m benchmarks.load`, and where the report goes."""

    out: Path | None = field(default=None, metadata={"help": "Report folder (default: benchmarks/results/<time>/)."})


def load_test(args: LoadArguments, bench: BenchConfig, failover: FailoverConfig) -> int:
    """Run the benchmark (and its failover phase), write the report, print each target's outcome and its path."""
    deployment = args.deployment()
    out_dir = args.out or default_out_dir()
    result = asyncio.run(run_benchmark(bench, deployment, out_dir, args.config))
    paths = write_report(result, out_dir)
    if failover.failover_window_s > 0 and bench.base_url is None:
        metrics = asyncio.run(run_failover(deployment, failover, out_dir))
        write_failover(metrics, deployment, failover, out_dir)
        with paths["markdown"].open("a") as report:
            report.write("\n" + failover_markdown(metrics))
        print(f"failover: {metrics.failed} failed, " + ", ".join(
            f"{w.name} {w.screenshots_per_s:.2f}/s" for w in metrics.windows))
    for target in result.targets:
        mark = {True: "met   ", False: "MISSED", None: "      "}[target.met]
        measured = "n/a" if target.measured is None else f"{target.measured:.3g}"
        print(f"{mark} {target.name}: {measured} ({target.threshold})")
    print(f"report: {paths['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, bench, failover = parse_command([LoadArguments, BenchConfig, FailoverConfig], argv,
                                          prog="python -m benchmarks.load", description=__doc__, yaml_option=False)
    return run_command(lambda: load_test(args, bench, failover), runtime_errors=(ServerError,))


if __name__ == "__main__":
    raise SystemExit(main())
