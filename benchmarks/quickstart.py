"""The main job, end to end on the tiny default: data -> adapters -> one vLLM engine -> routed screenshots.

    python -m benchmarks.quickstart [--config configs/tiny-cpu.yaml] [--work runs/quickstart]

1. builds (once) the tiny base model: the random Qwen3-VL, pre-trained on screen captions (cached);
2. generates a routing dataset and converts it to the router's classification format;
3. trains the router and every expert with the one trainer (configs/training/*.yaml; small but real) and
   scores each expert against the base model on its own task;
4. starts vLLM with the base model, the router and every expert (checked, warmed up, probed);
5. routes one screenshot with its own task prompt and prints the route, its confidence, the expert's answer and
   whether that answer is right for the screenshot (its task's scores against the screenshot's truth);
6. batch-processes a folder of sample screenshots and prints the routing table;
7. sends one screenshot to the service as any OpenAI client would (`model: "auto"`, the official `openai`
   client) and prints the expert's answer with its routing headers;
8. stops the server.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import openai

from lora_router.configuration import CommandError, ConfigError, check_types, parse_command, run_command
from lora_router.deployment import DeploymentArguments, DeploymentConfig
from lora_router.images import prepare_image
from lora_router.jsonl import read_jsonl
from lora_router.manifest import AdapterManifest, model_fingerprint
from lora_router.resources import configs_dir
from router_client.batch import BatchItem, run_batch
from router_client.client import RouterClient
from router_client.config import ClientConfig
from router_client.errors import RouterClientError
from serving.launcher import ServerError, VLLMServer, ready_line
from training.convert_routing_to_classification import convert_dataset
from training.generate_dataset import RoutingDatasetConfig, generate_routing_dataset
from training.tasks import score
from training.tiny_model import resolve_base_model
from training.train_qwen import main as train_cli
from training.validate_router import format_calibration, store_calibration, validate

RECIPES = configs_dir() / "training"
log = logging.getLogger(__name__)


@dataclass
class QuickstartArguments(DeploymentArguments):
    """The flags of `python -m benchmarks.quickstart`."""

    work: Path = field(default=Path("runs/quickstart"), metadata={"help": "Folder for data, logs and results."})
    train_per_class: int = field(default=300, metadata={"help": "Routing training screenshots per class."})
    eval_per_class: int = field(default=10, metadata={"help": "Held-out routing screenshots per class."})
    calibration_per_class: int = field(default=40, metadata={
        "help": "Held-out routing screenshots per class the router's confidence threshold and temperature are "
                "fitted on (another seed than the router's data)."})
    store_calibration: bool = field(default=False, metadata={
        "help": "Store the fitted threshold and temperature in the router's manifest, so routes below the threshold "
                "take the deployment's fallback. Off by default: on the tiny base the 0.99 threshold routes only "
                "about a quarter of the screenshots (see README, Router confidence)."})
    expert_train: int = field(default=120, metadata={"help": "Training examples per expert."})
    expert_eval: int = field(default=16, metadata={"help": "Held-out examples per expert (its task score)."})
    router_recipe: Path = field(default=RECIPES / "router-tiny.yaml", metadata={
        "help": "Trainer YAML for the router (the trainer's flags as keys)."})
    expert_recipe: Path = field(default=RECIPES / "expert-tiny.yaml", metadata={
        "help": "Trainer YAML for the experts."})
    retrain: bool = field(default=False, metadata={
        "help": "Train every adapter again even if one trained on this base model is already there."})

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("train_per_class", "eval_per_class", "calibration_per_class", "expert_train", "expert_eval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def step(title: str) -> None:
    log.info("== %s", title)


def make_dataset(config: DeploymentConfig, work: Path, train_per_class: int, eval_per_class: int,
                 name: str = "routing", seed: int = 0) -> Path:
    """A routing dataset over the configured experts, converted for the router; returns its folder."""
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    generate_routing_dataset(RoutingDatasetConfig(
        classes=tuple(config.labels), train_images={c: train_per_class for c in config.labels},
        eval_images=eval_per_class, train_val_split=1.0, output=folder, seed=seed))
    convert_dataset(folder)
    return folder


def calibrate_router(config: DeploymentConfig, work: Path, per_class: int, store: bool) -> None:
    """Fit the router's temperature and confidence threshold on held-out screenshots of another seed, log them,
    and with `store` write them to its manifest, where the client, the batch CLI and the gateway take them from."""
    router_path = config.adapter_path(config.router)
    data = make_dataset(config, work, 0, per_class, name="routing-calibration", seed=1)
    report = validate(data / "eval-classification.jsonl", work / "validate-router", adapter=router_path, quiet=True)
    log.info("router on %d held-out screenshots: accuracy %.3f\n%s", report["count"], report["accuracy"],
             format_calibration(report["calibration"]))
    if store:
        log.info("%s", store_calibration(report, router_path))


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
        raise CommandError(f"training {out} failed (exit {code})")


def train_adapters(config: DeploymentConfig, base: str, routing: Path, work: Path, args: QuickstartArguments) -> None:
    """Train the router on `routing` and each expert on its generated task data, unless already trained on this
    base (and `--retrain` is not given); then score each expert against the base model on held-out examples."""
    from training.evaluate_expert import evaluate
    from training.expert_datasets import write_dataset
    from training.screens import KINDS

    fingerprint = model_fingerprint(base)
    router_path = config.adapter_path(config.router)
    if not args.retrain and (manifest := trained_for(router_path, fingerprint, config.labels)):
        log.info("router: already trained (%s, eval accuracy %s)", router_path, manifest.metrics.get("eval_accuracy"))
    else:
        train(args.router_recipe, config.model.path, routing, "train-classification.jsonl",
              "eval-classification.jsonl", router_path)
    for expert in config.experts:
        path = config.adapter_path(expert)
        data = work / "experts" / expert.name
        if expert.name not in KINDS:
            raise ConfigError(f"expert {expert.name!r}: no task generator for it (known: {', '.join(KINDS)}); "
                              f"train it yourself and point its path at the adapter")
        shutil.rmtree(data, ignore_errors=True)
        write_dataset(expert.name, args.expert_train, args.expert_eval, 0, data)
        if not args.retrain and trained_for(path, fingerprint, None):
            log.info("%s: already trained (%s)", expert.name, path)
        else:
            train(args.expert_recipe, config.model.path, data, "train.jsonl", "eval.jsonl", path)
        report = evaluate(path, data / "eval.jsonl", quiet=True)
        tasks = "".join(f"; {task} {scores['adapter']['score']:.3f} vs {scores['base']['score']:.3f} on "
                        f"{scores['count']}" for task, scores in report["by_task"].items())
        log.info("%s: task score %.3f vs base model %.3f on %d held-out screenshots%s", expert.name,
                 report["adapter_scores"]["score"], report["base"]["score"], report["count"], tasks)


def routing_table(results: Path, truth: dict[str, str]) -> str:
    """Markdown table of true class against routed expert, from a batch output file."""
    routed: Counter[tuple[str, str]] = Counter()
    for row in read_jsonl(results):
        if row["custom_id"] in truth:
            routed[truth[row["custom_id"]], row.get("expert") or row["status"]] += 1
    classes = sorted({t for t, _ in routed})
    columns = sorted({r for _, r in routed})
    lines = ["| true \\ routed | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {t} | " + " | ".join(str(routed[t, r]) for r in columns) + " |" for t in classes]
    return "\n".join(lines)


async def serve_and_route(config: DeploymentConfig, dataset: Path, work: Path) -> list[str]:
    """Serve the deployment, route one screenshot, then batch-process the samples; returns what main prints."""
    step("4. start vLLM with the base model, the router and every expert")
    async with VLLMServer(config, log_path=work / "vllm.log") as server:
        log.info("%s", ready_line(server, [a.name for a in config.adapters]))
        client_config = ClientConfig.from_deployment(config, base_url=server.base_url)
        samples = read_jsonl(dataset / "eval.jsonl")

        step("5. one screenshot: route, then the chosen expert")
        first = samples[0]
        prompt = first["conversations"][0]["value"].removeprefix("<image>").strip()
        answer = f"screenshot: {first['image']} (true class: {first['adapter']}), prompt: {prompt!r}\n"
        try:
            async with RouterClient(client_config) as client:
                result = await client.process(dataset / first["image"], prompt)
        except RouterClientError as exc:
            answer += f"failed: {type(exc).__name__}: {exc}"
        else:
            answer += result.describe() + "\n" + verdict(first, result.decision.expert, result.result.text)

        step(f"6. batch: {len(samples)} sample screenshots")
        items = [BatchItem(custom_id=s["id"], image=dataset / s["image"]) for s in samples]
        output = work / "results.jsonl"
        output.unlink(missing_ok=True)
        summary = await run_batch(client_config, items, output)
        table = routing_table(output, {s["id"]: s["adapter"] for s in samples})

        step('7. the service: one screenshot to model "auto" with the openai client')
        service = await ask_auto(server, dataset / samples[-1]["image"], samples[-1]["adapter"])
        step("8. stop the server")
    return [answer, summary.table(), "routing table (rows: true class, columns: routed expert)\n" + table, service]


def verdict(sample: dict, expert: str, text: str) -> str:
    """Whether an expert's answer is right for a routing sample: its task's scores against the screenshot's truth."""
    metadata = sample.get("metadata") or {}
    kind, target = metadata.get("task_type"), metadata.get("target")
    if kind is None or target is None:
        return "verdict:    none (the sample has no task_type and target to score the answer against)"
    if expert != kind:
        return f"verdict:    wrong route ({expert}, the screenshot is a {kind} screen)"
    scores = score(kind, text, target)
    right = "right" if scores["score"] == 1.0 else "not right"
    detail = ", ".join(f"{name} {value:.2f}" for name, value in scores.items())
    return f"verdict:    {right} for this screenshot (gold {sample['conversations'][1]['value']}; {detail})"


async def ask_auto(server: VLLMServer, image: Path, truth: str) -> str:
    """One screenshot through the gateway as any OpenAI client sends it; the answer and its routing headers."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=server.config.engine.api_key or "none")
    url = prepare_image(image).data_url
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=server.config.gateway.auto_model, max_tokens=64, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
    except openai.APIError as exc:
        return f'model "auto" on {image.name} (true class: {truth}) failed: {exc}'
    finally:
        await client.close()
    completion = raw.parse()
    headers = {k: v for k, v in raw.headers.items() if k.startswith("x-route-")}
    return (f'model "auto" on {image.name} (true class: {truth}) via {server.base_url}\n'
            f"routing headers: {headers}\nanswer ({completion.model}): {completion.choices[0].message.content}")


def quickstart(args: QuickstartArguments) -> int:
    """The main job end to end; prints the routed screenshot, the batch summary and the routing table."""
    start = time.monotonic()
    config = args.deployment("engine.port=0")
    args.work.mkdir(parents=True, exist_ok=True)
    step("1. base model")
    base = resolve_base_model(config.model.path)
    log.info("base model: %s", base)
    step("2. routing dataset, converted for the router")
    dataset = make_dataset(config, args.work, args.train_per_class, args.eval_per_class)
    step("3. train the router and the experts (one trainer)")
    train_adapters(config, base, dataset, args.work, args)
    calibrate_router(config, args.work, args.calibration_per_class, args.store_calibration)
    results = asyncio.run(serve_and_route(config, dataset, args.work))
    print("\n\n".join(results))
    log.info("done in %.0f s; outputs in %s", time.monotonic() - start, args.work)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(QuickstartArguments, argv, prog="python -m benchmarks.quickstart",
                            description=__doc__, yaml_option=False)
    return run_command(lambda: quickstart(args), runtime_errors=(ServerError,))


if __name__ == "__main__":
    raise SystemExit(main())
