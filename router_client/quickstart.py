"""The main job, end to end on the tiny default: data -> adapters -> one vLLM engine -> routed screenshots.

    python -m router_client.quickstart [--config configs/tiny-cpu.yaml] [--work runs/quickstart]

1. builds (once) the tiny base model;
2. generates a routing dataset and converts it to the router's classification format;
3. makes the adapters the config names (see `prepare_adapters`);
4. starts vLLM with the base model, the router and every expert (checked, warmed up, probed);
5. routes one screenshot and prints the route, its confidence and the expert's answer;
6. batch-processes a folder of sample screenshots and prints the routing table;
7. stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from collections import Counter
from pathlib import Path

from router_client.batch import BatchItem, run_batch
from router_client.client import RouterClient
from router_client.config import ClientConfig
from router_client.errors import RouterClientError
from serving.config import DeploymentConfig, load_config
from serving.launcher import VLLMServer, ready_line
from training.convert_routing_to_classification import convert_dataset
from training.generate_dataset import RoutingDatasetConfig, generate_routing_dataset
from training.manifest import AdapterManifest
from training.tiny_model import resolve_base_model


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def make_dataset(config: DeploymentConfig, work: Path, train_per_class: int, eval_per_class: int) -> Path:
    """A routing dataset over the configured experts, converted for the router; returns its folder."""
    folder = work / "routing"
    shutil.rmtree(folder, ignore_errors=True)
    generate_routing_dataset(RoutingDatasetConfig(
        classes=tuple(config.labels), train_images={c: train_per_class for c in config.labels},
        eval_images=eval_per_class, train_val_split=1.0, output=folder))
    convert_dataset(folder)
    return folder


def prepare_adapters(config: DeploymentConfig, base: str) -> bool:
    """Write every adapter the config names that does not exist yet; True if the router is a random stand-in.

    Until the trainer's router reaches its target on the tiny base these are random stand-ins (non-zero
    LoRA B): the serving and client mechanics are real, the routes are not.
    """
    from training.random_adapter import make_random_adapter

    for seed, adapter in enumerate(config.adapters):
        path = config.adapter_path(adapter)
        if (path / "adapter_config.json").exists():
            continue
        labels = config.labels if adapter is config.router else None
        make_random_adapter(base, path, seed=seed, labels=labels)
        print(f"  {adapter.name}: random stand-in at {path}")
    return bool(AdapterManifest.read(config.adapter_path(config.router)).metrics.get("random"))


def routing_table(results: Path, truth: dict[str, str]) -> str:
    """Markdown table of true class against routed expert, from a batch output file."""
    routed: Counter[tuple[str, str]] = Counter()
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row["custom_id"] in truth:
            routed[truth[row["custom_id"]], row.get("expert") or row["status"]] += 1
    classes = sorted({t for t, _ in routed})
    columns = sorted({r for _, r in routed})
    lines = ["| true \\ routed | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(str(routed[t, r]) for r in columns) + " |" for t in classes]
    return "\n".join(lines)


async def serve_and_route(config: DeploymentConfig, dataset: Path, work: Path, stand_ins: bool) -> None:
    step("4. start vLLM with the base model, the router and every expert")
    async with VLLMServer(config, log_path=work / "vllm.log") as server:
        print(ready_line(server, [a.name for a in config.adapters]), flush=True)
        # A random router answers no label: send such routes to the base model so every screenshot gets an answer.
        overrides = {"fallback": "base"} if stand_ins else {}
        client_config = ClientConfig.from_deployment(config, base_url=server.base_url, **overrides)
        samples = [json.loads(line) for line in (dataset / "eval.jsonl").read_text().splitlines()]

        step("5. one screenshot: route, then the chosen expert")
        first = samples[0]
        print(f"  screenshot: {first['image']} (true class: {first['adapter']})")
        try:
            async with RouterClient(client_config) as client:
                result = await client.process(dataset / first["image"])
        except RouterClientError as exc:
            print(f"  failed: {type(exc).__name__}: {exc}")
        else:
            print("  " + result.describe().replace("\n", "\n  "))

        step(f"6. batch: {len(samples)} sample screenshots")
        items = [BatchItem(custom_id=s["id"], image=dataset / s["image"]) for s in samples]
        output = work / "results.jsonl"
        output.unlink(missing_ok=True)
        summary = await run_batch(client_config, items, output)
        print(summary.table())
        print("\nrouting table (rows: true class, columns: routed expert)")
        print(routing_table(output, {s["id"]: s["adapter"] for s in samples}))
        step("7. stop the server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m router_client.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/tiny-cpu.yaml"), help="deployment YAML")
    parser.add_argument("--work", type=Path, default=Path("runs/quickstart"), help="folder for data, logs, results")
    parser.add_argument("--train-per-class", type=int, default=40, help="routing train screenshots per class")
    parser.add_argument("--eval-per-class", type=int, default=10, help="held-out screenshots per class")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.monotonic()
    config = load_config(args.config, ["engine.port=0"])
    args.work.mkdir(parents=True, exist_ok=True)
    step("1. base model")
    base = resolve_base_model(config.model.path)
    print(f"  {base}")
    step("2. routing dataset, converted for the router")
    dataset = make_dataset(config, args.work, args.train_per_class, args.eval_per_class)
    step("3. adapters")
    stand_ins = prepare_adapters(config, base)
    asyncio.run(serve_and_route(config, dataset, args.work, stand_ins))
    print(f"\ndone in {time.monotonic() - start:.0f} s; outputs in {args.work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
