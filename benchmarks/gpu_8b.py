"""What the production shape costs without vLLM: the project's trainer and the transformers + PEFT baselines on a
random-weight Qwen3-VL-8B (`benchmarks.random_8b`), for a GPU machine that has PyTorch but cannot install vLLM.

    python -m benchmarks.gpu_8b --work /tmp/random-8b --out benchmarks/results/<stamp>-gpu-8b

1. writes the random model and adapters into --work (kept and reused when already there; about 17 GB);
2. trains a router on a generated routing dataset with training.train_qwen's own `train()`, bf16 with gradient
   checkpointing as the flags say, for --steps optimizer steps, timing each;
3. runs both baselines of `benchmarks.hf_baselines` (two-stage inference, single-load) on --screenshots screenshots.

Writes gpu_8b.json (setup, step seconds p50/p90/p99 after the first --warmup_steps, examples/s, peak device memory,
the baselines) and gpu_8b.md. `--small` runs the same on a scaled-down shape, so it runs on a CPU in seconds.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from transformers import TrainerCallback

from benchmarks.hf_baselines import BaselineResult, Baselines
from benchmarks.pool import ScreenPool
from benchmarks.random_8b import SMALL_SHAPE, Qwen3VLShape, build
from benchmarks.runner import default_out_dir, image_token_counter
from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.deployment import DeploymentConfig, load_config
from lora_router.percentiles import Percentiles, percentiles
from lora_router.resources import configs_dir
from training.convert_routing_to_classification import convert_dataset
from training.generate_dataset import RoutingDatasetConfig, generate_routing_dataset
from training.trainer.args import parse_args, resolve_base_dtype
from training.trainer.run import train

log = logging.getLogger(__name__)


@dataclass
class Gpu8bArguments:
    """The flags of `python -m benchmarks.gpu_8b`."""

    work: Path = field(metadata={
        "help": "Folder for the random model and adapters (reused when there), the dataset and the trained router."})
    out: Path | None = field(default=None, metadata={
        "help": "Folder for gpu_8b.json and gpu_8b.md (default: benchmarks/results/<stamp>-gpu-8b)."})
    steps: int = field(default=30, metadata={"help": "Optimizer steps of the router training."})
    warmup_steps: int = field(default=3, metadata={
        "help": "First steps left out of the step-time percentiles (kernel selection, allocator growth)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step (per_device_train_batch_size)."})
    gradient_checkpointing: bool = field(default=True, metadata={
        "help": "Recompute activations in the backward pass (memory for time), as an 8B run on one GPU needs."})
    base_dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "The trainer's --base_dtype: the frozen base's weights (auto: bfloat16 when training in bf16)."})
    screenshots: int = field(default=8, metadata={"help": "Screenshots per baseline (0: no baselines)."})
    rank: int = field(default=16, metadata={"help": "LoRA rank of the random adapters and of the trained router."})
    small: bool = field(default=False, metadata={
        "help": "A scaled-down shape (hidden 128, 2 layers) instead of the 8B one: the same steps on a CPU."})

    def __post_init__(self) -> None:
        check_types(self)
        problems = [f"{name} must be >= {low}, got {getattr(self, name)}" for name, low in
                    (("steps", 1), ("warmup_steps", 0), ("batch_size", 1), ("screenshots", 0), ("rank", 1))
                    if getattr(self, name) < low]
        if self.warmup_steps >= self.steps:
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        if problems:
            raise ConfigError("; ".join(problems))


class StepTimes(TrainerCallback):
    """Wall seconds of each optimizer step, the device drained at both ends so queued kernels count."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.seconds.append(time.perf_counter() - self._start)


@dataclass
class TrainingFigures:
    """The router training run on this shape."""

    steps: int
    batch_size: int
    gradient_checkpointing: bool
    bf16: bool
    base_dtype: str  # the frozen base's weights, as the trainer resolved it
    device: str
    train_wall_s: float
    step_s: Percentiles  # after the warm-up steps
    examples_per_s: float  # batch_size / p50 step
    peak_memory_gib: float | None  # the device's peak allocation; None on a CPU
    loss_first: float | None
    loss_last: float | None


def model_folder(work: Path, shape: Qwen3VLShape, rank: int) -> Path:
    """The random model's deployment.yaml in `work`, written unless a complete one is there."""
    path = work / "deployment.yaml"
    if path.is_file():
        log.info("reusing the random model in %s", work)
        return path
    log.info("writing a random model into %s ...", work)
    return build(work, shape, rank, seed=0, base_config=configs_dir() / "qwen3-vl-8b.yaml")


def train_router(args: Gpu8bArguments, deployment_path: Path, deployment: DeploymentConfig) -> TrainingFigures:
    """Train a router with the project's trainer on a generated routing dataset; its timings and peak memory."""
    import torch

    data = args.work / "routing"
    shutil.rmtree(data, ignore_errors=True)  # a rerun's dataset: the generator refuses a non-empty folder
    per_class = -(-args.steps * args.batch_size // len(deployment.labels))  # one pass covers every step
    generate_routing_dataset(RoutingDatasetConfig(
        classes=tuple(deployment.labels), train_images={c: per_class for c in deployment.labels}, eval_images=0,
        train_val_split=1.0, output=data, seed=0))
    convert_dataset(data)
    model_args, data_args, train_args = parse_args([
        "--model_name_or_path", deployment.model.path, "--data_path", str(data / "train-classification.jsonl"),
        "--output_dir", str(args.work / "router"), "--overwrite_output_dir", "True",
        "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
        "--learning_rate", "1e-4", "--lr_scheduler_type", "constant", "--bf16", "True",
        "--gradient_checkpointing", str(args.gradient_checkpointing), "--base_dtype", args.base_dtype,
        "--save_strategy", "no",
        "--report_to", "none", "--logging_steps", "1", "--disable_tqdm", "True",
        "--lora_r", str(args.rank), "--lora_alpha", str(2 * args.rank), "--serving_config", str(deployment_path)])
    timer = StepTimes()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    metrics = train(model_args, data_args, train_args, callbacks=[timer])
    peak = torch.cuda.max_memory_allocated() / (1 << 30) if cuda else None
    step = percentiles(timer.seconds[args.warmup_steps:])
    return TrainingFigures(
        steps=len(timer.seconds), batch_size=args.batch_size, gradient_checkpointing=args.gradient_checkpointing,
        bf16=bool(train_args.bf16), base_dtype=resolve_base_dtype(model_args.base_dtype, train_args.bf16),
        device=str(train_args.device), train_wall_s=metrics["train_wall_s"],
        step_s=step, examples_per_s=args.batch_size / step.p50, peak_memory_gib=peak,
        loss_first=metrics["loss_first"], loss_last=metrics["loss_last"])


def run_baselines(args: Gpu8bArguments, deployment: DeploymentConfig) -> list[BaselineResult]:
    """Both transformers + PEFT baselines, one round, on the random model's adapters."""
    import gc

    import torch
    from transformers import AutoProcessor

    gc.collect()  # the trained model's memory back before the base loads again
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    processor = AutoProcessor.from_pretrained(deployment.model.path)
    tokenizer = processor.tokenizer
    pool = ScreenPool(0, {label: 1.0 for label in deployment.labels}, image_max_pixels=deployment.engine.max_pixels,
                      router_max_pixels=deployment.engine.max_pixels or 0, expert_max_tokens=None,
                      answer_tokens=lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                      image_tokens=image_token_counter(processor, deployment))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    baselines = Baselines(deployment.model.path, processor, deployment, pool.take(args.screenshots), device,
                          threads=torch.get_num_threads())
    return baselines.run()


def markdown(setup: dict, training: TrainingFigures, baselines: list[BaselineResult]) -> str:
    step = training.step_s
    lines = [f"# {setup['shape']} on {setup['device_name']}", "",
             f"Router training ({training.device}, bf16 {training.bf16}, base {training.base_dtype}, gradient "
             f"checkpointing {training.gradient_checkpointing}, batch {training.batch_size}, {training.steps} steps):",
             "",
             "| step p50 s | p90 s | p99 s | examples/s | peak memory GiB | loss first -> last |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| {step.p50:.3f} | {step.p90:.3f} | {step.p99:.3f} | {training.examples_per_s:.1f} | "
             + (f"{training.peak_memory_gib:.1f}" if training.peak_memory_gib is not None else "n/a")
             + f" | {training.loss_first} -> {training.loss_last} |"]
    if baselines:
        lines += ["", "Transformers + PEFT baselines (one screenshot at a time):", "",
                  "| baseline | device | dtype | screenshots | screenshots/s | p50 s | p90 s | output tokens |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for b in baselines:
            p = percentiles(b.seconds_per_screenshot)
            lines.append(f"| {b.name} | {b.device} | {b.dtype} | {b.screenshots} | {b.screenshots_per_s:.2f} | "
                         f"{p.p50:.3f} | {p.p90:.3f} | {b.output_tokens} |")
    return "\n".join(lines) + "\n"


def gpu_8b(args: Gpu8bArguments) -> int:
    import torch
    import transformers

    started = time.perf_counter()
    shape = SMALL_SHAPE if args.small else Qwen3VLShape()
    out = args.out or default_out_dir("-gpu-8b")
    deployment_path = model_folder(args.work, shape, args.rank)
    deployment = load_config(deployment_path)
    log.info("training a router, %d steps ...", args.steps)
    training = train_router(args, deployment_path, deployment)
    log.info("training: %s", json.dumps(asdict(training)))
    log.info("transformers + PEFT baselines on %d screenshots ...", args.screenshots)
    baselines = run_baselines(args, deployment) if args.screenshots else []
    setup = {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items()},
             "shape": "scaled-down Qwen3-VL" if args.small else "Qwen3-VL-8B-Instruct (random weights)",
             "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
             "torch": torch.__version__, "transformers": transformers.__version__,
             "wall_s": round(time.perf_counter() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_8b.json").write_text(json.dumps(
        {"setup": setup, "training": asdict(training), "baselines": [asdict(b) for b in baselines]}, indent=2))
    report = markdown(setup, training, baselines)
    (out / "gpu_8b.md").write_text(report)
    log.info("wrote %s\n%s", out / "gpu_8b.json", report)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(Gpu8bArguments, argv, prog="python -m benchmarks.gpu_8b", description=__doc__)
    return run_command(lambda: gpu_8b(args))


if __name__ == "__main__":
    raise SystemExit(main())
