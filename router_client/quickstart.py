"""The main job, end to end on the tiny default: data -> adapters -> one vLLM engine -> routed screenshots.

    python -m router_client.quickstart [--config configs/tiny-cpu.yaml] [--work runs/quickstart]

1. builds (once) the tiny base model: the random Qwen3-VL, pre-trained on screen captions (cached);
2. generates a routing dataset and converts it to the router's classification format;
3. trains the router and every expert with the one trainer (configs/training/*.yaml; small but real) and
   scores each expert against the base model on its own task;
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
from training.manifest import AdapterManifest, model_fingerprint
from training.tiny_model import resolve_base_model
from training.train_qwen import main as train_cli

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "training"


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


def trained_for(path: Path, base_fingerprint: str, labels: list[str] | None) -> AdapterManifest | None:
    """The manifest of a trained adapter at `path` on the base with this fingerprint (and these router labels),
    else None."""
    try:
        manifest = AdapterManifest.read(path)
    except (FileNotFoundError, ValueError):
        return None
    if manifest.metrics.get("random") or manifest.base_model_fingerprint != base_fingerprint:
        return None
    return manifest if manifest.labels == labels else None


def train(recipe: Path, model: str, data: Path, train_file: str, eval_file: str, out: Path) -> None:
    """One run of the trainer CLI (the command a user types) with `recipe` and these paths."""
    code = train_cli(["--config", str(recipe), "--model_name_or_path", model, "--data_path", str(data / train_file),
                      "--eval_data_path", str(data / eval_file), "--output_dir", str(out),
                      "--overwrite_output_dir", "True"])
    if code:
        raise SystemExit(f"training {out} failed (exit {code})")


def train_adapters(config: DeploymentConfig, base: str, routing: Path, work: Path, args) -> None:
    """Train the router on `routing` and each expert on its generated task data, unless already trained on this
    base (and `--retrain` is not given); then score each expert against the base model on held-out examples."""
    from training.evaluate_expert import evaluate
    from training.expert_datasets import write_dataset
    from training.screens import KINDS

    fingerprint = model_fingerprint(base)
    router_path = config.adapter_path(config.router)
    if not args.retrain and (manifest := trained_for(router_path, fingerprint, config.labels)):
        print(f"  router: already trained ({router_path}, eval accuracy {manifest.metrics.get('eval_accuracy')})")
    else:
        train(args.router_recipe, config.model.path, routing, "train-classification.jsonl",
              "eval-classification.jsonl", router_path)
    for expert in config.experts:
        path = config.adapter_path(expert)
        data = work / "experts" / expert.name
        if expert.name not in KINDS:
            raise SystemExit(f"expert {expert.name!r}: no task generator for it (known: {', '.join(KINDS)}); "
                             f"train it yourself and point its path at the adapter")
        shutil.rmtree(data, ignore_errors=True)
        write_dataset(expert.name, args.expert_train, args.expert_eval, 0, data)
        if not args.retrain and trained_for(path, fingerprint, None):
            print(f"  {expert.name}: already trained ({path})")
        else:
            train(args.expert_recipe, config.model.path, data, "train.jsonl", "eval.jsonl", path)
        report = evaluate(path, data / "eval.jsonl", quiet=True)
        print(f"  {expert.name}: task score {report['adapter_scores']['score']:.3f} vs base model {report['base']['score']:.3f}"
              f" on {report['count']} held-out screenshots")


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


async def serve_and_route(config: DeploymentConfig, dataset: Path, work: Path) -> None:
    step("4. start vLLM with the base model, the router and every expert")
    async with VLLMServer(config, log_path=work / "vllm.log") as server:
        print(ready_line(server, [a.name for a in config.adapters]), flush=True)
        client_config = ClientConfig.from_deployment(config, base_url=server.base_url)
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
    parser.add_argument("--train-per-class", type=int, default=300, help="routing train screenshots per class")
    parser.add_argument("--eval-per-class", type=int, default=10, help="held-out screenshots per class")
    parser.add_argument("--expert-train", type=int, default=120, help="training examples per expert")
    parser.add_argument("--expert-eval", type=int, default=16, help="held-out examples per expert (task score)")
    parser.add_argument("--router-recipe", type=Path, default=RECIPES / "router-tiny.yaml",
                        help="trainer YAML for the router (the trainer's flags as keys)")
    parser.add_argument("--expert-recipe", type=Path, default=RECIPES / "expert-tiny.yaml",
                        help="trainer YAML for the experts")
    parser.add_argument("--retrain", action="store_true",
                        help="train every adapter again even if one trained on this base model is already there")
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
    step("3. train the router and the experts (one trainer)")
    train_adapters(config, base, dataset, args.work, args)
    asyncio.run(serve_and_route(config, dataset, args.work))
    print(f"\ndone in {time.monotonic() - start:.0f} s; outputs in {args.work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
