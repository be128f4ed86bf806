"""Load-test a router + LoRA experts deployment on vLLM and write the report.

    python -m benchmarks.load --config configs/tiny-cpu.yaml                 # starts vLLM from the config
    python -m benchmarks.load --config configs/tiny-cpu.yaml --base-url http://127.0.0.1:8000/v1
    python -m benchmarks.load --config configs/qwen3-vl-8b.yaml --set model.path=/models/qwen3-vl-8b

Writes benchmarks/results/<YYYY-MM-DD_HHMMSS>/ (or --out): report.json, report.md, latency.png, throughput.png,
vllm_bench_serve.json and, when it started the server, vllm.log. Every BenchConfig field is a flag.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.config import BenchConfig
from benchmarks.report import write_report
from benchmarks.runner import default_out_dir, run_benchmark
from lora_router.configuration import parse_command, run_command
from lora_router.deployment import DeploymentArguments
from serving.launcher import ServerError


@dataclass
class LoadArguments(DeploymentArguments):
    """The deployment flags of `python -m benchmarks.load`, and where the report goes."""

    out: Path | None = field(default=None, metadata={"help": "Report folder (default: benchmarks/results/<time>/)."})


def load_test(args: LoadArguments, bench: BenchConfig) -> int:
    """Run the benchmark, write the report, print each target's outcome and the report's path."""
    deployment = args.deployment()
    out_dir = args.out or default_out_dir()
    result = asyncio.run(run_benchmark(bench, deployment, out_dir, args.config))
    paths = write_report(result, out_dir)
    for target in result.targets:
        mark = {True: "met   ", False: "MISSED", None: "      "}[target.met]
        measured = "n/a" if target.measured is None else f"{target.measured:.3g}"
        print(f"{mark} {target.name}: {measured} ({target.threshold})")
    print(f"report: {paths['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, bench = parse_command([LoadArguments, BenchConfig], argv, prog="python -m benchmarks.load",
                                description=__doc__, yaml_option=False)
    return run_command(lambda: load_test(args, bench), runtime_errors=(ServerError,))


if __name__ == "__main__":
    raise SystemExit(main())
