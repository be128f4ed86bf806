"""Load-test a router + LoRA experts deployment on vLLM and write the report.

    python -m benchmarks.load --config configs/tiny-cpu.yaml                 # starts vLLM from the config
    python -m benchmarks.load --config configs/tiny-cpu.yaml --base-url http://127.0.0.1:8000/v1
    python -m benchmarks.load --config configs/qwen3-vl-8b.yaml --set model.path=/models/qwen3-vl-8b

Writes benchmarks/results/<YYYY-MM-DD_HHMMSS>/ (or --out): report.json, report.md, latency.png, throughput.png,
vllm_bench_serve.json and, when it started the server, vllm.log.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path

from benchmarks.config import BenchConfig
from benchmarks.report import write_report
from benchmarks.runner import default_out_dir, run_benchmark
from serving.config import load_config

_HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(BenchConfig)}
_DEFAULTS = BenchConfig()


def _mix(text: str) -> dict[str, float]:
    """'calendar=27,claim-window=3000' -> {'calendar': 27.0, 'claim-window': 3000.0}"""
    try:
        return {name.strip(): float(weight) for name, weight in (pair.split("=") for pair in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected name=weight,name=weight, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="deployment YAML (serving.config)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="deployment config override, e.g. --set engine.max_num_seqs=32 (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: benchmarks/results/<time>/)")

    def add(name: str, **kwargs) -> None:
        default = getattr(_DEFAULTS, name)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=default,
                            help=f"{_HELP[name]} (default: {default})", **kwargs)

    add("base_url")
    add("seed", type=int)
    add("concurrencies", type=int, nargs="+")
    add("min_requests", type=int)
    add("requests_per_slot", type=int)
    add("per_expert_requests", type=int)
    add("compare_concurrency", type=int)
    add("warmup_requests", type=int)
    add("request_rate", type=float)
    add("poisson_requests", type=int)
    add("class_mix", type=_mix)
    add("router_mode", choices=("choice", "one-token"))
    add("router_max_pixels", type=int)
    add("expert_max_tokens", type=int)
    add("peer_requests", type=int)
    add("hf_requests", type=int)
    add("cpu_threads", type=int)
    add("timeout_s", type=float)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_path, overrides, out = args.pop("config"), args.pop("overrides"), args.pop("out")
    bench = BenchConfig(**args)
    deployment = load_config(config_path, overrides)
    out_dir = out or default_out_dir()
    result = asyncio.run(run_benchmark(bench, deployment, out_dir, config_path))
    paths = write_report(result, out_dir)
    for target in result.targets:
        mark = {True: "met   ", False: "MISSED", None: "      "}[target.met]
        measured = "n/a" if target.measured is None else f"{target.measured:.3g}"
        print(f"{mark} {target.name}: {measured} ({target.threshold})")
    print(f"report: {paths['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
