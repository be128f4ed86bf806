"""One training run: the base model with a PEFT LoRA, transformers.Trainer over the LLaVA data, then the adapter,
its manifest, metrics.json and training_args.json in output_dir.

The loop, checkpoints (checkpoint-<step>, pruned to save_total_limit), resume, schedules, gradient accumulation and
checkpointing and TensorBoard (under output_dir/runs) are Trainer's; the project adds the collator (answer-only
loss, padded mm_token_type_ids), the label-first-token loss and the callbacks (greedy accuracy, log lines).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, get_last_checkpoint

from lora_router.configuration import ConfigError
from training.trainer.args import DataArguments, ModelArguments, TrainArguments, resolve_base_dtype
from training.trainer.callbacks import GenerationAccuracy, LogLines

log = logging.getLogger("training.trainer")
TRAINING_ARGS = "training_args.json"
METRICS = "metrics.json"


def label_first_token_loss(logits, labels, label_first_ids):
    """Cross-entropy over the labels' first tokens at the position that predicts the answer's first token."""
    import torch

    from training.llava_data import IGNORE_INDEX

    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    first = (shift_labels != IGNORE_INDEX).int().argmax(dim=1)
    rows = torch.arange(labels.shape[0], device=labels.device)
    label_logits = shift_logits[rows, first][:, label_first_ids].float()
    target = (shift_labels[rows, first].unsqueeze(1) == label_first_ids.unsqueeze(0)).int().argmax(dim=1)
    return torch.nn.functional.cross_entropy(label_logits, target)


class AdapterTrainer(Trainer):
    """Trainer whose loss, for a classifier with label_loss_weight > 0, adds the label-first-token loss."""

    def __init__(self, *args, label_first_ids=None, label_loss_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_first_ids = label_first_ids
        self.label_loss_weight = label_loss_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.label_first_ids is not None:
            extra = self.label_loss_weight * label_first_token_loss(outputs.logits, inputs["labels"],
                                                                    self.label_first_ids)
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:
                scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
            # The token loss is then a mean over all accumulated micro-batches; this per-batch mean must match it.
            loss = loss + (extra / self.current_gradient_accumulation_steps if scaled else extra)
        return (loss, outputs) if return_outputs else loss


def resume_point(args: TrainArguments) -> str | None:
    """The checkpoint to resume from ('last'/'true': the newest in output_dir), or None to start afresh (after
    deleting old checkpoints if overwrite_output_dir, else refusing to mix two runs' checkpoints)."""
    output_dir = Path(args.output_dir)
    wanted = str(args.resume_from_checkpoint or "").strip()
    if wanted.lower() in ("", "false", "none"):
        existing = sorted(p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir())
        if existing and not args.overwrite_output_dir:
            raise ConfigError(f"{output_dir} already holds checkpoints ({get_last_checkpoint(output_dir)}); pass "
                              "--resume_from_checkpoint last to continue or --overwrite_output_dir True")
        for path in existing:
            shutil.rmtree(path)
        return None
    if wanted.lower() in ("last", "true"):
        last = get_last_checkpoint(output_dir) if output_dir.is_dir() else None
        if last is None:
            raise ConfigError(f"--resume_from_checkpoint {wanted}: no checkpoint in {output_dir}")
        return last
    if not (Path(wanted) / "trainer_state.json").is_file():
        raise ConfigError(f"--resume_from_checkpoint {wanted}: not a checkpoint folder")
    return wanted


def build_model(base_path: str, model_args: ModelArguments, args: TrainArguments):
    """The base model (in --base_dtype) with a fresh LoRA on its language model, and on its vision tower and mergers
    if lora_vision_tower (seeded by args.seed). PEFT keeps the LoRA's weights in float32 on a bfloat16 base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    from lora_router.manifest import VISION_TOWER_TARGETS, lora_targets, touches_vision_tower

    torch.manual_seed(args.seed)  # the LoRA's initial weights
    dtype = getattr(torch, resolve_base_dtype(model_args.base_dtype, args.bf16))
    model = Qwen3VLForConditionalGeneration.from_pretrained(base_path, dtype=dtype)
    if args.gradient_checkpointing:
        model.enable_input_require_grads()  # PEFT freezes the embeddings: give checkpointed blocks a grad input
    lora = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                      bias="none", use_dora=False,
                      **lora_targets(model_args.lora_target_modules, model_args.lora_vision_tower))
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"lora_target_modules {model_args.lora_target_modules}: {exc}") from None
    if model_args.init_adapter:
        warm_start(model, base_path, model_args)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    problems = []
    if not any(".language_model." in n for n in trainable):
        problems.append(f"lora_target_modules {model_args.lora_target_modules} match no language-model module")
    visual = [n for n in trainable if touches_vision_tower(n)]
    if model_args.lora_vision_tower and not visual:
        problems.append(f"lora_vision_tower is True but lora_target_modules {model_args.lora_target_modules} match "
                        f"no vision-tower module (its linear layers: {', '.join(VISION_TOWER_TARGETS)})")
    if problems:
        raise ConfigError("; ".join(problems))
    return model


def warm_start(model, base_path: str, model_args: ModelArguments) -> None:
    """Load init_adapter's LoRA weights into the fresh PEFT model, refusing one of another base or shape, or with
    weights on modules this run does not adapt."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    from lora_router.manifest import MANIFEST_NAME, AdapterManifest, model_fingerprint

    folder = Path(model_args.init_adapter)
    config = LoraConfig.from_pretrained(str(folder))
    problems = []
    if (config.r, config.lora_alpha) != (model_args.lora_r, model_args.lora_alpha):
        problems.append(f"init_adapter {folder} has lora_r={config.r}, lora_alpha={config.lora_alpha}; this run "
                        f"trains lora_r={model_args.lora_r}, lora_alpha={model_args.lora_alpha}")
    if (folder / MANIFEST_NAME).is_file():
        trained_on = AdapterManifest.read(folder).base_model_fingerprint
        if trained_on and trained_on != model_fingerprint(base_path):
            problems.append(f"init_adapter {folder} was trained on another base model (fingerprint {trained_on}) "
                            f"than {base_path}")
    if problems:
        raise ConfigError("; ".join(problems))
    loaded = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    if loaded.unexpected_keys:
        raise ConfigError(f"init_adapter {folder} has LoRA weights on {len(loaded.unexpected_keys)} modules this run "
                          f"does not adapt (e.g. {loaded.unexpected_keys[0]}); name them in lora_target_modules")
    fresh = sum(1 for key in loaded.missing_keys if ".lora_" in key)
    log.info("LoRA started from %s (%d weights fresh: modules it did not adapt)", folder, fresh)


def label_first_ids(tokenizer, labels: list[str] | None, weight: float, device):
    """The labels' first token ids as a tensor when the label-first-token loss is on, else None."""
    import torch

    if not labels or not weight:
        return None
    firsts = [tokenizer(label, add_special_tokens=False)["input_ids"][0] for label in labels]
    if len(set(firsts)) != len(firsts):
        raise ConfigError("label_loss_weight needs labels whose first tokens differ")
    return torch.tensor(firsts, device=device)


def summarize(trainer: Trainer, train_examples: int, train_seconds: float) -> dict:
    """metrics.json: the loss curve and evaluations from Trainer's log history, and the run's totals."""
    history = trainer.state.log_history
    curve = [[h["step"], round(h["loss"], 6)] for h in history if "loss" in h]
    evaluations = [h for h in history if "eval_loss" in h]
    return {
        "train_wall_s": train_seconds,
        "global_step": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_examples": train_examples,
        "loss_first": curve[0][1] if curve else None,
        "loss_last": curve[-1][1] if curve else None,
        "loss_curve": curve,
        "evaluations": evaluations,
        "final_eval": dict(evaluations[-1]) if evaluations else {},
    }


def build_trainer(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments, train_data,
                  eval_data, labels: list[str] | None, callbacks: Sequence[TrainerCallback] = ()
                  ) -> tuple[AdapterTrainer, dict]:
    """The Trainer over the base model with a fresh LoRA, and what was resolved on the way (base model folder and
    fingerprint, pixel limits): the record training_args.json keeps and the manifest repeats."""
    from transformers import AutoProcessor
    from transformers.integrations import TensorBoardCallback
    from transformers.trainer_callback import PrinterCallback

    from lora_router.manifest import model_fingerprint
    from training.inference import pixel_limits
    from training.llava_data import Collator, ConversationDataset, image_kwargs
    from training.tiny_model import resolve_base_model

    base_path = resolve_base_model(model_args.model_name_or_path)
    processor = AutoProcessor.from_pretrained(base_path)
    default_min, default_max = pixel_limits(processor)
    min_pixels, max_pixels = model_args.min_pixels or default_min, model_args.max_pixels or default_max
    pixel_kwargs = image_kwargs(min_pixels, max_pixels)
    cache_bytes = data_args.encoded_cache_mb << 20
    extra_callbacks = list(callbacks)
    if labels and eval_data:
        extra_callbacks.insert(0, GenerationAccuracy(processor, eval_data, labels,
                                                     max_new_tokens=data_args.max_new_tokens,
                                                     min_pixels=min_pixels, max_pixels=max_pixels))
    trainer = AdapterTrainer(
        model=build_model(base_path, model_args, args), args=args,
        data_collator=Collator(processor.tokenizer.pad_token_id),
        train_dataset=ConversationDataset(train_data, processor, pixel_kwargs, cache_bytes=cache_bytes),
        eval_dataset=ConversationDataset(eval_data, processor, pixel_kwargs, cache_bytes=cache_bytes)
        if eval_data else None,
        callbacks=extra_callbacks,
        label_first_ids=label_first_ids(processor.tokenizer, labels, data_args.label_loss_weight, args.device),
        label_loss_weight=data_args.label_loss_weight)
    if args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)  # it print()s; a log line says the same to a log file
        trainer.add_callback(LogLines)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and args.logging_dir:
            callback.logging_dir = args.logging_dir
    resolved = {"base_model": base_path, "base_model_fingerprint": model_fingerprint(base_path),
                "min_pixels": min_pixels, "max_pixels": max_pixels, "bf16_used": args.bf16,
                "base_dtype": resolve_base_dtype(model_args.base_dtype, args.bf16),
                "device": str(args.device), "labels": labels}
    return trainer, resolved


def train(model_args: ModelArguments, data_args: DataArguments, args: TrainArguments,
          callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train as the settings say; returns the metrics also written to output_dir/metrics.json."""
    from transformers.utils.logging import disable_progress_bar

    from lora_router.manifest import AdapterManifest, file_sha256
    from training.inference import set_threads
    from training.llava_data import describe, read_conversations

    set_threads(args.num_threads)
    if args.disable_tqdm:
        disable_progress_bar()  # transformers' own bars (loading weights) too
    for note in args.precision_notes:
        log.warning(note)
    train_data = read_conversations(data_args.data_path)
    info = describe(train_data)
    eval_data = read_conversations(data_args.eval_data_path) if data_args.eval_data_path else []
    if eval_data:
        describe(eval_data, labels=info.labels)
    else:
        args.eval_strategy = IntervalStrategy.NO  # nothing to evaluate (Trainer refuses a strategy without data)
    resume = resume_point(args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer, resolved = build_trainer(model_args, data_args, args, train_data, eval_data, info.labels, callbacks)
    (output_dir / TRAINING_ARGS).write_text(json.dumps(
        {**dataclasses.asdict(model_args), **dataclasses.asdict(data_args), **args.to_dict(),
         "resolved": {**resolved, "resumed_from": resume}}, indent=2, default=str))
    kind = f"classifier: {', '.join(info.labels)}" if info.labels else "generation"
    log.info("training %d examples (%s), LoRA r=%d on %s", len(train_data), kind, model_args.lora_r,
             resolved["base_model"])

    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = round(time.perf_counter() - started, 2)
    last_eval = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
    if eval_data and (last_eval is None or last_eval["step"] != trainer.state.global_step):
        trainer.evaluate()  # the adapter as saved gets its own evaluation
    trainer.save_model(str(output_dir))
    metrics = summarize(trainer, len(train_data), train_seconds)
    (output_dir / METRICS).write_text(json.dumps(metrics, indent=2))
    final = metrics["final_eval"]
    AdapterManifest(
        base_model=resolved["base_model"],
        base_model_fingerprint=resolved["base_model_fingerprint"],
        rank=model_args.lora_r,
        target_modules=list(model_args.lora_target_modules),
        vision_tower=model_args.lora_vision_tower,
        min_pixels=resolved["min_pixels"],
        max_pixels=resolved["max_pixels"],
        labels=info.labels,
        system_prompt=info.system_prompt,
        user_prompt=info.user_prompt,
        dataset_sha256=file_sha256(data_args.data_path),
        metrics={k: v for k, v in final.items() if k != "step"} | {
            "train_wall_s": train_seconds, "loss_first": metrics["loss_first"], "loss_last": metrics["loss_last"]},
    ).write(output_dir)
    log.info("saved adapter to %s in %s s; loss %s -> %s; final eval %s", output_dir, train_seconds,
             metrics["loss_first"], metrics["loss_last"], json.dumps(final))
    return metrics
