"""The trainer's settings: the project's own (ModelArguments, DataArguments) and transformers' TrainingArguments.

Flags and `--config FILE.yaml` keys are the field names (lora_router.configuration: defaults < YAML < flags). The seed's
HF-Trainer command parses verbatim because TrainArguments is TrainingArguments, with what transformers 5 dropped
from the seed's flags put back: `--evaluation_strategy` (alias of --eval_strategy), `--warmup_ratio`,
`--overwrite_output_dir` and `--logging_dir`.

The adapter must be what vLLM serves: LoRA on the language model (and on the vision tower only when asked:
vLLM serves that only with engine.tower_lora), a rank within the serving limit, images sized as the server sizes
them. Those limits come from --max_lora_rank / --min_pixels / --max_pixels, else from the
deployment YAML named by --serving_config (its `engine:` keys of the same names, read as data: training imports
nothing from serving), else vLLM's largest rank and the model processor's own pixel limits.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from lora_router.configuration import ArgumentParser, ConfigError, check_types, load_yaml
from lora_router.manifest import ALL_LINEAR, LANGUAGE_MODEL_TARGETS, VISION_TOWER_TARGETS, VLLM_LORA_RANKS
from lora_router.resources import configs_dir
from training.inference import DEFAULT_THREADS

DEFAULT_SERVING_CONFIG = configs_dir() / "tiny-cpu.yaml"
# Names that only the vision tower has: as targets they need lora_vision_tower.
VISION_MODULES = (*VISION_TOWER_TARGETS, "merger", "deepstack_merger_list", "visual")
PROG = "python -m training.train_qwen"
log = logging.getLogger("training.trainer")


def serving_limits(path: str | Path | None) -> dict:
    """max_lora_rank, min_pixels, max_pixels and tower_lora of a deployment YAML's `engine:` section (those it
    sets)."""
    if path is None or (Path(path) == DEFAULT_SERVING_CONFIG and not DEFAULT_SERVING_CONFIG.is_file()):
        return {}
    engine = load_yaml(path).get("engine") or {}
    return {key: engine[key] for key in ("max_lora_rank", "min_pixels", "max_pixels", "tower_lora")
            if engine.get(key) is not None}


@dataclass
class ModelArguments:
    """The base model and the LoRA trained on it, fitted to the vLLM deployment that serves it."""

    model_name_or_path: str = field(default="tiny", metadata={
        "help": "Base model folder or hub id; 'tiny' is the pre-trained tiny Qwen3-VL (built on first use), "
                "'tiny-random' the random one."})
    lora_r: int = field(default=16, metadata={"aliases": ["--lora_rank"],
                                              "help": "LoRA rank; must not exceed max_lora_rank."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default 2 * lora_r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input, [0, 1)."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(LANGUAGE_MODEL_TARGETS), metadata={
        "help": "Module names to adapt (space- or comma-separated), or 'all-linear' (PEFT's shorthand: every linear "
                "layer but lm_head); on the language model only unless lora_vision_tower."})
    lora_vision_tower: bool = field(default=False, metadata={
        "help": "Also put LoRA on the vision tower and its mergers (with all-linear, or names such as qkv, proj, "
                "linear_fc1, linear_fc2). vLLM serves such an adapter only with engine.tower_lora, which keys "
                "its vision-encoder cache by adapter: router and expert no longer share a screenshot's encoding."})
    init_adapter: str | None = field(default=None, metadata={
        "help": "Start the LoRA from this adapter's weights instead of fresh ones (a warm start, e.g. a router "
                "retrained from the live one on new data): trained on the same base with the same lora_r and "
                "lora_alpha, on modules lora_target_modules names; modules only this run adapts start fresh."})
    serving_config: str | None = field(default=str(DEFAULT_SERVING_CONFIG), metadata={
        "help": "Deployment YAML whose engine.max_lora_rank / min_pixels / max_pixels the adapter must fit "
                "(default: configs/tiny-cpu.yaml)."})
    max_lora_rank: int | None = field(default=None, metadata={
        "help": "Serving limit on the rank (vLLM --max-lora-rank); default engine.max_lora_rank of serving_config, "
                "else vLLM's largest."})
    min_pixels: int | None = field(default=None, metadata={
        "help": "Smallest image area (pixels) the processor resizes to; default the serving config's "
                "engine.min_pixels, else the model processor's."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Largest image area (pixels); default the serving config's engine.max_pixels, else the model "
                "processor's."})
    base_dtype: Literal["auto", "float32", "bfloat16"] = field(default="auto", metadata={
        "help": "Dtype of the frozen base's weights: 'auto' is bfloat16 when training in bf16 (on a GPU: half the "
                "memory of float32, as vLLM serves it), else float32; 'float32' keeps a full-precision base under "
                "bf16 autocast. The LoRA's own weights stay float32 either way."})

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        self.lora_target_modules = [m.strip() for item in self.lora_target_modules for m in item.split(",")
                                    if m.strip()]
        # PEFT reads the shorthand in any case; one spelling keeps the manifest and the checks simple.
        self.lora_target_modules = [ALL_LINEAR if m.lower() == ALL_LINEAR else m for m in self.lora_target_modules]
        limits = serving_limits(self.serving_config)
        source = "--max_lora_rank"
        if self.max_lora_rank is None:
            self.max_lora_rank = limits.get("max_lora_rank")
            source = f"engine.max_lora_rank of {self.serving_config}"
        if self.max_lora_rank is None:
            self.max_lora_rank, source = VLLM_LORA_RANKS[-1], "vLLM's largest rank"
        self.min_pixels = self.min_pixels or limits.get("min_pixels")
        self.max_pixels = self.max_pixels or limits.get("max_pixels")
        check_types(self)
        problems = []
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            problems.append(f"max_lora_rank must be one of vLLM's ranks {VLLM_LORA_RANKS}, got {self.max_lora_rank}")
        if self.lora_r < 1:
            problems.append(f"lora_r must be >= 1, got {self.lora_r}")
        elif self.lora_r > self.max_lora_rank:
            problems.append(f"LoRA rank lora_r={self.lora_r} is above the serving limit max_lora_rank="
                            f"{self.max_lora_rank} ({source}); vLLM could not load it")
        self.lora_alpha = self.lora_alpha or 2 * self.lora_r
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            problems.append("lora_target_modules is empty")
        if ALL_LINEAR in self.lora_target_modules and len(self.lora_target_modules) > 1:
            problems.append(f"lora_target_modules {self.lora_target_modules}: {ALL_LINEAR} already names every "
                            "linear layer, give it alone")
        vision = [m for m in self.lora_target_modules if m in VISION_MODULES or m.startswith("visual")]
        if vision and not self.lora_vision_tower:
            problems.append(f"lora_target_modules {vision} are vision-tower modules; pass --lora_vision_tower True "
                            "to adapt the vision tower (served only with engine.tower_lora), else name language-model "
                            f"modules (e.g. {','.join(LANGUAGE_MODEL_TARGETS)}) or {ALL_LINEAR}")
        if "patch_embed" in self.lora_target_modules:
            problems.append("lora_target_modules: patch_embed is a Conv3d in vLLM, where no LoRA can be served")
        if self.init_adapter:
            absent = [name for name in ("adapter_config.json", "adapter_model.safetensors")
                      if not (Path(self.init_adapter) / name).is_file()]
            if absent:
                problems.append(f"init_adapter {self.init_adapter} is no PEFT adapter folder: no {' or '.join(absent)}")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            problems.append(f"min_pixels {self.min_pixels} exceeds max_pixels {self.max_pixels}")
        if problems:
            raise ConfigError("; ".join(problems))
        if self.lora_vision_tower and self.serving_config and not limits.get("tower_lora"):
            # Not an error: the adapter may be meant for another deployment, but this one would refuse it.
            log.warning("lora_vision_tower: %s does not set engine.tower_lora, so serving it refuses this adapter "
                        "until it does (--set engine.tower_lora=true)", self.serving_config)


@dataclass
class DataArguments:
    """The LLaVA JSONL data, and what is learnt and measured on it beyond the answer tokens' loss."""

    data_path: str | None = field(default=None, metadata={"help": "Training LLaVA JSONL (required)."})
    eval_data_path: str | None = field(default=None, metadata={
        "help": "Evaluation LLaVA JSONL (optional; without it nothing is evaluated)."})
    max_new_tokens: int = field(default=16, metadata={
        "help": "Greedy tokens generated per eval example for the classification accuracy."})
    label_loss_weight: float = field(default=0.0, metadata={
        "help": "Classification data only: weight of an extra cross-entropy over the labels' first tokens at the "
                "answer position (0: off)."})
    encoded_cache_mb: int = field(default=1024, metadata={
        "help": "MB of encoded examples (token ids, pixel values) kept in memory after their first epoch, so later "
                "epochs skip reading and preprocessing images (per dataset, per data-loader worker; 0: off). The "
                "tiny recipes' data fits; at 8B image sizes a few hundred screenshots do."})

    def __post_init__(self) -> None:
        check_types(self)
        problems = []
        if not self.data_path:
            problems.append("--data_path is required")
        if self.encoded_cache_mb < 0:
            problems.append(f"encoded_cache_mb must be >= 0, got {self.encoded_cache_mb}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.label_loss_weight < 0:
            problems.append(f"label_loss_weight must be >= 0, got {self.label_loss_weight}")
        if problems:
            raise ConfigError("; ".join(problems))


def resolve_precision(bf16: bool, tf32: bool | None, cuda: bool, bf16_supported: bool
                      ) -> tuple[bool, bool | None, list[str]]:
    """(bf16, tf32, notes) this machine can honour: on a CPU both are noted and dropped; bf16 on a GPU without it
    is an error."""
    notes = []
    if tf32 and not cuda:
        notes.append("--tf32 True ignored: TF32 is a CUDA matmul mode and no CUDA GPU is available "
                     "(training in float32 on the CPU)")
        tf32 = None
    if bf16 and not cuda:
        notes.append("--bf16 True ignored: bf16 mixed precision is used on CUDA GPUs only; training in float32 "
                     "on the CPU (vLLM still serves in bfloat16; validate_router compares the two)")
        bf16 = False
    elif bf16 and not bf16_supported:
        raise ConfigError("--bf16 True: this GPU does not support bfloat16; pass --bf16 False")
    return bf16, tf32, notes


def resolve_base_dtype(base_dtype: str, bf16: bool) -> str:
    """The frozen base's dtype for --base_dtype under the resolved --bf16; a bfloat16 base without bf16 training is
    an error (on a CPU --bf16 is dropped: there the base trains in float32)."""
    if base_dtype == "auto":
        return "bfloat16" if bf16 else "float32"
    if base_dtype == "bfloat16" and not bf16:
        raise ConfigError("--base_dtype bfloat16 needs bf16 training (--bf16 True on a CUDA GPU); without it pass "
                          "--base_dtype float32 or auto")
    return base_dtype


@dataclass
class TrainArguments(TrainingArguments):
    """transformers' TrainingArguments, plus the seed's flags transformers 5 dropped and this project's runtime."""

    eval_strategy: IntervalStrategy | str = field(default="epoch", metadata={
        "aliases": ["--evaluation_strategy", "--evaluation-strategy"],
        "help": "When to evaluate: no, steps (every eval_steps) or epoch; 'no' without --eval_data_path."})
    warmup_ratio: float = field(default=0.0, metadata={
        "help": "Fraction of the steps with linear warm-up, [0, 1) (the seed's flag; sets warmup_steps)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Start afresh even if output_dir holds checkpoints (they are deleted)."})
    logging_dir: str | None = field(default=None, metadata={
        "help": "TensorBoard folder (default output_dir/runs/<time>_<host>)."})
    num_threads: int = field(default=DEFAULT_THREADS, metadata={
        "help": "torch CPU threads (these machines have 2 cores)."})
    # What --bf16/--tf32 could not do on this machine, for the run to log once.
    precision_notes: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        problems = []
        if self.output_dir is None:
            problems.append("--output_dir is required")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        elif self.warmup_ratio and self.warmup_steps:
            problems.append("give warmup_ratio or warmup_steps, not both")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            problems.append("num_train_epochs must be > 0 (or give max_steps > 0)")
        if self.num_threads < 1:
            problems.append(f"num_threads must be >= 1, got {self.num_threads}")
        if problems:
            raise ConfigError("; ".join(problems))
        if self.warmup_ratio:
            self.warmup_steps = self.warmup_ratio  # transformers 5 reads a warmup_steps below 1 as a ratio
        # Resolved before TrainingArguments checks them: it raises for --tf32 (and --bf16) without CUDA.
        cuda = torch.cuda.is_available()
        self.bf16, self.tf32, self.precision_notes = resolve_precision(
            self.bf16, self.tf32, cuda, cuda and torch.cuda.is_bf16_supported())
        if not cuda:
            self.dataloader_pin_memory = False  # pinned memory only speeds up copies to a GPU
        if self.disable_tqdm is None:
            self.disable_tqdm = not sys.stderr.isatty()  # a bar in a log file is megabytes of redraws
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None:
            self.gradient_checkpointing_kwargs = {"use_reentrant": False}  # re-entrant checkpoints lose LoRA grads
        if self.label_names is None:
            self.label_names = ["labels"]  # Trainer cannot see the label argument through the PEFT wrapper
        super().__post_init__()


def parse_args(argv: list[str] | None = None, description: str | None = None
               ) -> tuple[ModelArguments, DataArguments, TrainArguments]:
    """Settings from defaults < --config YAML < flags; a bad one exits with status 2 and the reason."""
    # transformers' own parser, as TRL keeps it: TrainingArguments has field types only it reads.
    parser = ArgumentParser([ModelArguments, DataArguments, TrainArguments], prog=PROG, description=description,
                            parser_class=HfArgumentParser)
    model_args, data_args, train_args = parser.parse(argv)
    try:
        resolve_base_dtype(model_args.base_dtype, train_args.bf16)
    except ConfigError as exc:
        parser.error(str(exc))
    return model_args, data_args, train_args
