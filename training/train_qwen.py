"""Train a LoRA adapter (router or expert) on a Qwen3-VL base from LLaVA JSONL, as vLLM will serve it.

    python -m training.train_qwen \\
      --model_name_or_path tiny --data_path datasets/routing/train-classification.jsonl \\
      --eval_data_path datasets/routing/eval-classification.jsonl --output_dir checkpoints/tiny/router \\
      --num_train_epochs 3 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 \\
      --gradient_accumulation_steps 1 --evaluation_strategy "epoch" --save_strategy "epoch" \\
      --save_total_limit 2 --learning_rate 2e-3 --weight_decay 0.0 --warmup_ratio 0.05 \\
      --lr_scheduler_type "cosine" --logging_steps 5 --bf16 True --tf32 True --gradient_checkpointing False \\
      --dataloader_num_workers 0 --report_to "tensorboard"

Every flag of the seed's HF-Trainer command is accepted verbatim (booleans take a value: `--bf16 True`;
`--eval_strategy` is `--evaluation_strategy`), plus LoRA shape (--lora_r, --lora_alpha, --lora_dropout,
--lora_target_modules), image size limits (--min_pixels, --max_pixels) and `--config FILE.yaml` whose keys are
the flag names. Precedence: defaults < YAML < flags. Flags that cannot apply on this machine (--tf32 without a
CUDA GPU, --bf16 on a CPU) are reported and ignored; --bf16 on a GPU without bfloat16 is an error.

The adapter is served by vLLM, so it is what vLLM can serve: LoRA on the language model only, no
modules_to_save, no DoRA, rank within the serving limit (--max_lora_rank, default engine.max_lora_rank of the
--serving_config deployment, configs/tiny-cpu.yaml). Image size limits default to that deployment's
engine.min_pixels/max_pixels, else the base model processor's own (what vLLM uses without overrides).

Output folder: the final adapter (adapter_config.json, adapter_model.safetensors) with its manifest
(lora_router_manifest.json: base model and fingerprint, rank, targets, labels and prompts for a router, dataset
hash, final metrics), training_args.json, metrics.json (loss curve, evaluations, wall time), checkpoint-<step>/
folders (pruned to --save_total_limit; `--resume_from_checkpoint last` continues from the newest) and, with
--report_to tensorboard, TensorBoard logs under runs/.

Why a plain PyTorch loop rather than HF Trainer: the model is tiny and runs on two CPU cores, where Trainer's
machinery (accelerate, device placement, mixed-precision plumbing) adds overhead and failure modes without
benefit; the loop here is ~150 lines, does exactly the masking/collation vLLM-compatibility needs
(mm_token_type_ids, answer-only loss, left-padded greedy eval), and its checkpoints and resume are easy to
test. The flags keep Trainer's names so the seed command (and a later switch to Trainer on GPU) still works.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from serving.config import VLLM_LORA_RANKS
from training.random_adapter import LANGUAGE_MODEL_TARGETS

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVING_CONFIG = PROJECT_ROOT / "configs" / "tiny-cpu.yaml"
STRATEGIES = ("no", "steps", "epoch")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
REPORTERS = ("none", "tensorboard")
# Module names of Qwen3-VL's vision tower: LoRA there is ignored by vLLM, so they are refused as targets.
VISION_MODULES = ("qkv", "proj", "linear_fc1", "linear_fc2", "patch_embed", "merger", "visual")
CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_ARGS = "training_args.json"
METRICS = "metrics.json"


class TrainError(ValueError):
    """A setting or input that cannot be trained on; the message says which and why."""


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "on"):
        return True
    if text in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _serving_engine(path: Path | None) -> dict:
    """The `engine:` section of a deployment YAML ({} when there is none)."""
    if path is None or not Path(path).is_file():
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    return dict(data.get("engine") or {})


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the command-line flags (and YAML keys)."""

    # --- data and model (the seed's flags)
    model_name_or_path: str = field(default="tiny", metadata={
        "help": "Base model folder or hub id; 'tiny' is the pre-trained tiny Qwen3-VL (built on first use), "
                "'tiny-random' the random one."})
    data_path: str | None = field(default=None, metadata={"help": "Training LLaVA JSONL (required)."})
    eval_data_path: str | None = field(default=None, metadata={"help": "Evaluation LLaVA JSONL (optional)."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Folder of the final adapter, its manifest, metrics and checkpoints (required)."})
    # --- schedule
    num_train_epochs: float = field(default=3.0, metadata={"help": "Passes over the training data."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; > 0 overrides num_train_epochs."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training examples per micro-batch."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Examples per evaluation batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    evaluation_strategy: str = field(default="epoch", metadata={
        "help": "When to evaluate: no, steps (every eval_steps) or epoch. Alias: --eval_strategy."})
    eval_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps between evaluations with evaluation_strategy=steps (default: logging_steps)."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps or epoch."})
    save_steps: int | None = field(default=None, metadata={
        "help": "Optimizer steps between checkpoints with save_strategy=steps (default: logging_steps)."})
    save_total_limit: int | None = field(default=None, metadata={
        "help": "Keep at most this many checkpoints (the newest); None keeps all."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'last' (the newest checkpoint in output_dir) or a checkpoint folder to continue from."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh even if output_dir holds checkpoints (they are deleted)."})
    # --- optimisation
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Fraction of steps with linear warm-up, [0, 1)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": f"One of {', '.join(SCHEDULERS)}."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: none)."})
    seed: int = field(default=42, metadata={"help": "Seed of LoRA init, data order and dropout."})
    label_loss_weight: float = field(default=0.0, metadata={
        "help": "Classification data only: weight of an extra cross-entropy over the labels' first tokens at the "
                "answer position (0: off)."})
    # --- precision and runtime (seed flags that may not apply on a CPU)
    bf16: bool = field(default=False, metadata={
        "help": "bfloat16 mixed precision; CUDA only (ignored with a warning on a CPU, an error on a GPU "
                "without bf16)."})
    tf32: bool = field(default=False, metadata={"help": "TF32 matmuls; CUDA only (ignored with a warning)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward pass (less memory, slower)."})
    dataloader_num_workers: int = field(default=0, metadata={
        "help": "DataLoader worker processes (image decoding and processing); 0 = in the main process."})
    num_threads: int = field(default=2, metadata={"help": "torch CPU threads (these machines have 2 cores)."})
    # --- logging
    logging_steps: int = field(default=10, metadata={"help": "Optimizer steps between loss log lines."})
    logging_dir: str | None = field(default=None, metadata={"help": "TensorBoard folder (default output_dir/runs)."})
    report_to: str = field(default="none", metadata={"help": f"Logger: {' or '.join(REPORTERS)} ('all' = "
                                                              "tensorboard)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar."})
    # --- LoRA (what vLLM serves)
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; must not exceed max_lora_rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, [0, 1)."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LANGUAGE_MODEL_TARGETS), metadata={
        "help": "Language-model module names to adapt (comma-separated on the command line); vision-tower "
                "modules are refused since vLLM ignores LoRA there."})
    max_lora_rank: int | None = field(default=None, metadata={
        "help": "Serving limit on the rank (vLLM --max-lora-rank); default engine.max_lora_rank of "
                "serving_config, else vLLM's largest."})
    serving_config: str | None = field(default=str(DEFAULT_SERVING_CONFIG), metadata={
        "help": "Deployment YAML whose engine.max_lora_rank / min_pixels / max_pixels the adapter must fit."})
    # --- images (must match what vLLM is given)
    min_pixels: int | None = field(default=None, metadata={
        "help": "Smallest image area (pixels) the processor resizes to; default the serving config's "
                "engine.min_pixels, else the model processor's."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Largest image area (pixels); default the serving config's engine.max_pixels, else the model "
                "processor's."})
    max_new_tokens: int = field(default=16, metadata={
        "help": "Greedy tokens generated per example for the classification accuracy."})

    def __post_init__(self) -> None:
        self.evaluation_strategy = str(self.evaluation_strategy).lower()
        self.save_strategy = str(self.save_strategy).lower()
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        for name in ("bf16", "tf32", "gradient_checkpointing", "overwrite_output_dir", "disable_tqdm"):
            setattr(self, name, _bool(getattr(self, name)))
        if self.report_to in ("all", None):
            self.report_to = "tensorboard" if self.report_to == "all" else "none"
        problems = []
        for name in ("evaluation_strategy", "save_strategy"):
            if getattr(self, name) not in STRATEGIES:
                problems.append(f"{name} must be one of {', '.join(STRATEGIES)}, got {getattr(self, name)!r}")
        if self.lr_scheduler_type not in SCHEDULERS:
            problems.append(f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler_type!r}")
        if self.report_to not in REPORTERS:
            problems.append(f"report_to {self.report_to!r} is not supported here (supported: {', '.join(REPORTERS)}, all)")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "num_threads", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dataloader_num_workers < 0:
            problems.append("dataloader_num_workers must be >= 0")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            problems.append("num_train_epochs must be > 0 (or give max_steps > 0)")
        if not self.learning_rate > 0:
            problems.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.label_loss_weight < 0:
            problems.append("weight_decay, max_grad_norm and label_loss_weight must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            problems.append("save_total_limit must be >= 1 (or None for no limit)")
        for what, strategy, every in (("eval_steps", self.evaluation_strategy, self.eval_steps),
                                      ("save_steps", self.save_strategy, self.save_steps)):
            if strategy == "steps" and every is not None and every < 1:
                problems.append(f"{what} must be >= 1")
        self.eval_steps = self.eval_steps or self.logging_steps
        self.save_steps = self.save_steps or self.logging_steps
        if self.evaluation_strategy != "no" and not self.eval_data_path:
            self.evaluation_strategy = "no"
        if not self.lora_target_modules:
            problems.append("lora_target_modules is empty")
        vision = [m for m in self.lora_target_modules if m in VISION_MODULES or m.startswith("visual")]
        if vision:
            problems.append(f"lora_target_modules {vision} are vision-tower modules; vLLM serves LoRA on the "
                            f"language model only (use e.g. {','.join(LANGUAGE_MODEL_TARGETS)})")
        # Serving limits: flag > serving config > vLLM's largest / the processor's defaults.
        engine = {}
        if self.serving_config:
            path = Path(self.serving_config)
            if not path.is_file() and path != DEFAULT_SERVING_CONFIG:
                problems.append(f"serving_config not found: {path}")
            engine = _serving_engine(path)
        source = f"engine.max_lora_rank of {self.serving_config}"
        if self.max_lora_rank is None:
            self.max_lora_rank = engine.get("max_lora_rank")
        else:
            source = "--max_lora_rank"
        if self.max_lora_rank is None:
            self.max_lora_rank, source = VLLM_LORA_RANKS[-1], "vLLM's largest rank"
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            problems.append(f"max_lora_rank must be one of vLLM's ranks {VLLM_LORA_RANKS}, got {self.max_lora_rank}")
        if self.lora_r < 1:
            problems.append(f"lora_r must be >= 1, got {self.lora_r}")
        elif self.lora_r > self.max_lora_rank:
            problems.append(f"LoRA rank lora_r={self.lora_r} is above the serving limit max_lora_rank="
                            f"{self.max_lora_rank} ({source}); vLLM could not load it")
        self.lora_alpha = self.lora_alpha or 2 * self.lora_r
        if self.min_pixels is None:
            self.min_pixels = engine.get("min_pixels")
        if self.max_pixels is None:
            self.max_pixels = engine.get("max_pixels")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            problems.append(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if problems:
            raise TrainError("; ".join(problems))

    def require_paths(self) -> None:
        """data_path and output_dir are needed to train (not to build a config)."""
        missing = [n for n in ("data_path", "output_dir") if not getattr(self, n)]
        if missing:
            raise TrainError(f"missing required setting(s): {', '.join('--' + n for n in missing)}")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_ALIASES = {"eval_strategy": "evaluation_strategy", "lora_rank": "lora_r"}


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field (plus --config and aliases); unset flags stay out of the namespace."""
    parser = argparse.ArgumentParser(prog="python -m training.train_qwen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help="YAML of settings named like the flags; flags win over it")
    for name, f in _FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = [f"--{name}"] + [f"--{alias}" for alias, target in _ALIASES.items() if target == name]
        kwargs: dict[str, Any] = {"dest": name, "help": f"{f.metadata['help']} (default: {default})"}
        kind = str(f.type)
        if kind.startswith("bool"):
            kwargs.update(type=_bool, nargs="?", const=True, metavar="True|False")
        elif name == "lora_target_modules":
            kwargs.update(type=lambda s: [m.strip() for m in s.split(",") if m.strip()], metavar="M1,M2")
        elif kind.startswith("int"):
            kwargs.update(type=_optional(int))
        elif kind.startswith("float"):
            kwargs.update(type=float)
        parser.add_argument(*flags, **kwargs)
    return parser


def _optional(cast: Callable) -> Callable:
    def parse(text: str):
        return None if str(text).lower() in ("none", "null") else cast(text)
    parse.__name__ = cast.__name__
    return parse


def load_yaml(path: Path) -> dict:
    """A training YAML's settings (keys: flag names or aliases); unknown keys are an error naming the file."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise TrainError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise TrainError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TrainError(f"{path}: expected a mapping of settings")
    out = {}
    for key, value in data.items():
        name = _ALIASES.get(key, key)
        if name not in _FIELDS:
            raise TrainError(f"{path}: unknown setting {key!r}")
        out[name] = value
    return out


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < --config YAML < flags, checked (TrainError on a bad setting)."""
    args = vars(build_parser().parse_args(argv))
    settings = load_yaml(args.pop("config")) if "config" in args else {}
    settings.update(args)
    return TrainConfig(**settings)


# ----------------------------------------------------------------------------------------------- runtime

def resolve_precision(cfg: TrainConfig, cuda: bool, bf16_supported: bool) -> tuple[bool, list[str]]:
    """(use bf16 autocast, warnings) for the machine; an error where a flag cannot be honoured at all."""
    notes = []
    if cfg.tf32 and not cuda:
        notes.append("--tf32 True ignored: TF32 is a CUDA matmul mode and no CUDA GPU is available "
                     "(training in float32 on the CPU)")
    if cfg.bf16 and not cuda:
        notes.append("--bf16 True ignored: bf16 mixed precision is used on CUDA GPUs only; training in float32 "
                     "on the CPU (vLLM still serves in bfloat16; validate_router compares the two)")
        return False, notes
    if cfg.bf16 and not bf16_supported:
        raise TrainError("--bf16 True: this GPU does not support bfloat16; pass --bf16 False")
    return cfg.bf16, notes


def checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-<step> folders in output_dir, oldest first (by step)."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def prune_checkpoints(output_dir: Path, limit: int | None) -> list[Path]:
    """Delete all but the newest `limit` checkpoints; returns the deleted folders."""
    if limit is None:
        return []
    old = checkpoints(output_dir)[:-limit]
    for path in old:
        shutil.rmtree(path)
    return old


@dataclass
class TrainState:
    """Progress saved in each checkpoint (trainer_state.json)."""

    global_step: int = 0
    epoch: int = 0  # the epoch in progress (0-based)
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    loss_curve: list = field(default_factory=list)  # [step, mean loss since the previous point]
    evaluations: list = field(default_factory=list)
    train_seconds: float = 0.0


class Trainer:
    """The training run of one TrainConfig. `on_step(trainer)` is called after each optimizer step (tests)."""

    def __init__(self, cfg: TrainConfig, on_step: Callable[["Trainer"], None] | None = None, log=print):
        cfg.require_paths()
        self.cfg = cfg
        self.on_step = on_step
        self.log = log
        self.output_dir = Path(cfg.output_dir)
        self.state = TrainState()

    # -- setup
    def _load(self) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        from training.inference import pixel_limits, set_threads
        from training.llava_data import describe, read_conversations
        from training.manifest import model_fingerprint
        from training.tiny_model import resolve_base_model

        cfg = self.cfg
        set_threads(cfg.num_threads)
        self.train_data = read_conversations(cfg.data_path)
        self.info = describe(self.train_data)
        self.eval_data = read_conversations(cfg.eval_data_path) if cfg.eval_data_path else []
        if self.eval_data:
            describe(self.eval_data, labels=self.info.labels)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.use_bf16, notes = resolve_precision(cfg, cuda, cuda and torch.cuda.is_bf16_supported())
        for note in notes:
            self.log(f"warning: {note}")
        if cfg.tf32 and cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.base_path = resolve_base_model(cfg.model_name_or_path)
        self.base_fingerprint = model_fingerprint(self.base_path)
        self.processor = AutoProcessor.from_pretrained(self.base_path)
        default_min, default_max = pixel_limits(self.processor)
        self.min_pixels = cfg.min_pixels or default_min
        self.max_pixels = cfg.max_pixels or default_max
        torch.manual_seed(cfg.seed)
        model = Qwen3VLForConditionalGeneration.from_pretrained(self.base_path, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_target_modules), bias="none", use_dora=False)
        try:
            self.model = get_peft_model(model, lora)
        except ValueError as exc:
            raise TrainError(f"lora_target_modules {cfg.lora_target_modules}: {exc}") from None
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        visual = [n for n in names if ".visual." in n]
        if visual:
            raise TrainError(f"LoRA landed on the vision tower ({visual[0]}); vLLM ignores it: choose "
                             "language-model modules only")
        if not any(".language_model." in n for n in names):
            raise TrainError(f"lora_target_modules {cfg.lora_target_modules} match no language-model module")
        self.model.to(self.device)
        tok = self.processor.tokenizer
        self.label_first_ids = None
        if self.info.labels and cfg.label_loss_weight:
            firsts = [tok(label, add_special_tokens=False)["input_ids"][0] for label in self.info.labels]
            if len(set(firsts)) != len(firsts):
                raise TrainError("label_loss_weight needs labels whose first tokens differ")
            self.label_first_ids = torch.tensor(firsts, device=self.device)

    def _loader(self, conversations, batch_size: int, shuffle_epoch: int | None):
        import torch
        from torch.utils.data import DataLoader

        from training.llava_data import Collator, ConversationDataset, image_kwargs

        dataset = ConversationDataset(conversations, self.processor, image_kwargs(self.min_pixels, self.max_pixels))
        sampler = None
        if shuffle_epoch is not None:
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.cfg.seed + shuffle_epoch))
            sampler = order.tolist()
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.cfg.dataloader_num_workers,
                          collate_fn=Collator(self.processor.tokenizer.pad_token_id))

    # -- loss
    def _loss(self, batch: dict):
        import torch

        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            logits = self.model(**batch).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
        mask = shift_labels != -100
        loss = torch.nn.functional.cross_entropy(shift_logits[mask], shift_labels[mask])
        if self.label_first_ids is not None:
            first = mask.int().argmax(dim=1)  # position predicting the first answer token
            rows = torch.arange(labels.shape[0], device=self.device)
            label_logits = shift_logits[rows, first][:, self.label_first_ids]
            target = (shift_labels[rows, first].unsqueeze(1) == self.label_first_ids.unsqueeze(0)).int().argmax(1)
            loss = loss + self.cfg.label_loss_weight * torch.nn.functional.cross_entropy(label_logits, target)
        return loss, int(mask.sum())

    # -- evaluation
    def evaluate(self) -> dict:
        """Eval loss per answer token, and for classification data greedy exact-match accuracy (per class too)."""
        import torch

        from training.inference import greedy_generate

        self.model.eval()
        total, tokens = 0.0, 0
        with torch.no_grad():
            for batch in self._loader(self.eval_data, self.cfg.per_device_eval_batch_size, None):
                loss, n = self._loss(batch)
                total += loss.item() * n
                tokens += n
        metrics: dict[str, Any] = {"eval_loss": round(total / max(1, tokens), 6)}
        if self.info.labels:
            answers = greedy_generate(self.model, self.processor, self.eval_data,
                                      max_new_tokens=self.cfg.max_new_tokens,
                                      batch_size=self.cfg.per_device_eval_batch_size,
                                      min_pixels=self.min_pixels, max_pixels=self.max_pixels)
            gold = [c.answer for c in self.eval_data]
            metrics["eval_accuracy"] = round(sum(a == g for a, g in zip(answers, gold)) / len(gold), 6)
            metrics["eval_accuracy_per_class"] = {
                label: round(sum(a == g for a, g in zip(answers, gold) if g == label)
                             / max(1, gold.count(label)), 6) for label in self.info.labels}
            metrics["eval_count"] = len(gold)
        self.model.train()
        return metrics

    # -- checkpoints
    def _save_checkpoint(self) -> Path:
        import numpy as np
        import torch

        path = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        tmp = self.output_dir / f".{path.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                    "numpy_rng": np.random.get_state()}, tmp / "trainer.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(self.state), indent=1))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        prune_checkpoints(self.output_dir, self.cfg.save_total_limit)
        return path

    def _resume(self, path: Path) -> None:
        import numpy as np
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(path / "adapter_model.safetensors")))
        blob = torch.load(path / "trainer.pt", weights_only=False)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        random.setstate(blob["python_rng"])
        np.random.set_state(blob["numpy_rng"])
        self.state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        self.log(f"resumed from {path} (step {self.state.global_step}, epoch {self.state.epoch})")

    def _resume_path(self) -> Path | None:
        cfg = self.cfg
        existing = checkpoints(self.output_dir)
        if cfg.resume_from_checkpoint in (None, "", "False", "false"):
            if existing and not cfg.overwrite_output_dir:
                raise TrainError(f"{self.output_dir} already holds checkpoints ({existing[-1].name}); pass "
                                 "--resume_from_checkpoint last to continue or --overwrite_output_dir True")
            for path in existing:
                shutil.rmtree(path)
            return None
        if str(cfg.resume_from_checkpoint).lower() in ("last", "true"):
            if not existing:
                raise TrainError(f"--resume_from_checkpoint last: no checkpoint in {self.output_dir}")
            return existing[-1]
        path = Path(cfg.resume_from_checkpoint)
        if not (path / "trainer_state.json").exists():
            raise TrainError(f"--resume_from_checkpoint {path}: not a checkpoint folder")
        return path

    # -- the run
    def train(self) -> dict:
        import torch
        from tqdm import tqdm
        from transformers import get_scheduler

        from training.manifest import AdapterManifest, file_sha256

        cfg = self.cfg
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resume = self._resume_path()
        self._load()
        micro_per_epoch = math.ceil(len(self.train_data) / cfg.per_device_train_batch_size)
        steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
        total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
        epochs = math.ceil(total_steps / steps_per_epoch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
                                       num_training_steps=total_steps)
        if resume:
            self._resume(resume)
        args = {**dataclasses.asdict(cfg), "resolved": {
            "base_model": self.base_path, "base_model_fingerprint": self.base_fingerprint,
            "min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch, "bf16_used": self.use_bf16, "device": str(self.device),
            "labels": self.info.labels}}
        (self.output_dir / TRAINING_ARGS).write_text(json.dumps(args, indent=2, default=str))
        writer = None
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(cfg.logging_dir or str(self.output_dir / "runs"))
        self.log(f"training {len(self.train_data)} examples ({'classifier: ' + ', '.join(self.info.labels) if self.info.labels else 'generation'}), "
                 f"{total_steps} steps, LoRA r={cfg.lora_r} on {self.base_path}")
        self.model.train()
        bar = tqdm(total=total_steps, initial=self.state.global_step, desc="train", unit="step",
                   disable=cfg.disable_tqdm, file=sys.stderr)
        started = time.perf_counter() - self.state.train_seconds
        running, running_n = 0.0, 0
        done = self.state.global_step >= total_steps

        def log_eval() -> None:
            done_epochs = self.state.epoch + self.state.step_in_epoch / steps_per_epoch
            metrics = {"step": self.state.global_step, "epoch": round(done_epochs, 4), **self.evaluate()}
            self.state.evaluations.append(metrics)
            self.log("eval " + json.dumps(metrics))
            if writer:
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                        writer.add_scalar(f"eval/{key}", value, self.state.global_step)

        while not done and self.state.epoch < epochs:
            loader = self._loader(self.train_data, cfg.per_device_train_batch_size, self.state.epoch)
            skip = self.state.step_in_epoch * cfg.gradient_accumulation_steps
            micro = []
            for index, batch in enumerate(loader):
                if index < skip:
                    continue
                micro.append(batch)
                if len(micro) < cfg.gradient_accumulation_steps and index < micro_per_epoch - 1:
                    continue
                for b in micro:
                    loss, _ = self._loss(b)
                    (loss / len(micro)).backward()
                    running += loss.item() / len(micro)
                micro = []
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.global_step += 1
                self.state.step_in_epoch += 1
                running_n += 1
                bar.update(1)
                step = self.state.global_step
                last_of_epoch = self.state.step_in_epoch == steps_per_epoch
                if step % cfg.logging_steps == 0 or step == 1 or step == total_steps:
                    mean = running / running_n
                    self.state.loss_curve.append([step, round(mean, 6)])
                    bar.set_postfix(loss=f"{mean:.4f}")
                    if writer:
                        writer.add_scalar("train/loss", mean, step)
                        writer.add_scalar("train/learning_rate", self.scheduler.get_last_lr()[0], step)
                    running, running_n = 0.0, 0
                self.state.train_seconds = time.perf_counter() - started
                if last_of_epoch:
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                if (cfg.evaluation_strategy == "steps" and step % cfg.eval_steps == 0) or (
                        cfg.evaluation_strategy == "epoch" and last_of_epoch):
                    log_eval()
                if (cfg.save_strategy == "steps" and step % cfg.save_steps == 0) or (
                        cfg.save_strategy == "epoch" and last_of_epoch):
                    self._save_checkpoint()
                if self.on_step:
                    self.on_step(self)
                if step >= total_steps:
                    done = True
                    break
        bar.close()
        train_seconds = round(time.perf_counter() - started, 2)
        final = dict(self.state.evaluations[-1]) if self.state.evaluations else {}
        if self.eval_data and (not final or final.get("step") != self.state.global_step):
            final = {"step": self.state.global_step,
                     "epoch": round(self.state.epoch + self.state.step_in_epoch / steps_per_epoch, 4), **self.evaluate()}
            self.state.evaluations.append(final)
        curve = self.state.loss_curve
        metrics = {
            "train_wall_s": train_seconds,
            "global_step": self.state.global_step,
            "epochs": self.state.epoch,
            "train_examples": len(self.train_data),
            "loss_first": curve[0][1] if curve else None,
            "loss_last": curve[-1][1] if curve else None,
            "loss_curve": curve,
            "evaluations": self.state.evaluations,
            "final_eval": final,
        }
        (self.output_dir / METRICS).write_text(json.dumps(metrics, indent=2))
        self.model.save_pretrained(self.output_dir)
        AdapterManifest(
            base_model=self.base_path,
            base_model_fingerprint=self.base_fingerprint,
            rank=cfg.lora_r,
            target_modules=list(cfg.lora_target_modules),
            labels=self.info.labels,
            system_prompt=self.info.system_prompt,
            user_prompt=self.info.user_prompt,
            dataset_sha256=file_sha256(cfg.data_path),
            metrics={k: v for k, v in final.items() if k != "step"} | {
                "train_wall_s": train_seconds, "loss_first": metrics["loss_first"],
                "loss_last": metrics["loss_last"], "min_pixels": self.min_pixels, "max_pixels": self.max_pixels},
        ).write(self.output_dir)
        if writer:
            writer.close()
        self.log(f"saved adapter to {self.output_dir} in {train_seconds} s; loss {metrics['loss_first']} -> "
                 f"{metrics['loss_last']}; final eval {json.dumps(final)}")
        return metrics


def main(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; returns the metrics also written to output_dir/metrics.json."""
    return Trainer(cfg).train()


def cli(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        main(cfg)
    except TrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # DataError and friends: already name file and line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
