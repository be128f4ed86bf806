"""A pre-trained tiny base: the random tiny Qwen3-VL, pre-trained in two stages (vision tower, then captions).

A random vision tower cannot tell screen kinds apart well enough for a LoRA on the language model to route
(held-out accuracy stopped at 60-87%; see the vLLM-on-CPU notes). A real deployment starts from a pre-trained
VLM, so the tiny stand-in gets a short pre-training of its own, built the way real VLMs are:

1. **Vision stage.** The vision tower alone learns to tell screens apart: a linear head on its mean image
   embedding predicts each screen's kind and layout (month calendars, date pickers, booking pages, claim forms in
   four layouts, provider lists, tables and dropdowns, document pages), from the generator's ground truth. The
   language model reads an image through attention-weighted means of those embeddings, so that is the form the
   information has to take. Trained jointly with captions, the vision tower stayed weaker (a linear probe on its
   mean embedding: 0.89 held-out over the four kinds, against 0.94 with this stage first).
2. **Caption stage.** The whole model minus the frozen vision tower learns captions of the same screens, built
   from the generator's ground truth: the kind of screen in plain words, its layout, and a few visible facts
   (month and year, field names, the first provider, the document title). Never the router's prompt, never a
   bare adapter name as an answer.

Small images (30 image tokens per screen) keep this to minutes on 2 CPU cores: a from-scratch vision tower
learns screen kinds several times faster per CPU second at this size than at 64 or 256 tokens.

    python -m training.pretrain                 # build (or find) it and print its folder

The result is cached next to the random model (`tiny-qwen3-vl-pretrained-<fingerprint>` in the cache root),
keyed by the pre-training spec and the random base's fingerprint, written atomically, and saved with its
processor so vLLM serves it. `training.tiny_model.resolve_base_model("tiny")` returns it (building it on first
use); "tiny-random" is the random model. `pretrain_log.json` in the folder holds the wall time, the loss curve
and the held-out caption scores.

The repository ships the current base (training/bases/<that name>/, about 2.3 MB, with `pretrain_spec.json`, the
recipe and seed, and `shipped.json`, its weights' fingerprint): on first use it is checked against that
fingerprint and copied into the cache, so a fresh machine pre-trains nothing. Changing the recipe changes the
name; `python -m training.pretrain --ship true` then builds the new base and replaces the shipped one, and
`--rebuild true` pre-trains from the recipe even when a shipped copy exists (tests/test_shipped_base.py checks,
marked slow, that it reproduces the shipped base: its weights, or on another CPU its held-out scores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.progress import progress
from training.expert_datasets import sample_seed
from training.screens import KINDS, generate
from training.tiny_random import CacheArguments, TinyModelSpec, build_tiny_model, default_cache_dir

# Bump when captions, data or the loop change in a way PretrainSpec does not capture.
PRETRAIN_VERSION = 3
DONE_MARKER = "pretrain_log.json"
# The repository ships the current version of the base here, so a fresh machine pre-trains nothing.
SHIPPED_ROOT = Path(__file__).resolve().parent / "bases"
SHIPPED_RECORD = "shipped.json"
log = logging.getLogger(__name__)
PROMPTS = ("Describe this screen.", "What is on this screen?", "Describe the screenshot.",
           "Caption this screenshot.", "What does this screenshot show?")
SYSTEMS = (None, None, "You are a helpful assistant.", "You describe screenshots accurately.")


@dataclass(frozen=True)
class PretrainSpec:
    """How the tiny base is pre-trained; every field is part of the cache fingerprint."""

    seed: int = field(default=0, metadata={"help": "Seed of screens, prompts, shuffling and init."})
    train_screens: int = field(default=2000, metadata={
        "help": "Distinct training screens, the generator kinds in turn (drawn once, kept encoded in memory)."})
    vision_steps: int = field(default=3000, metadata={
        "help": "Steps of the vision stage, before captions: the vision tower alone, with a linear head on its mean "
                "image embedding, learns each screen's kind and layout (a real VLM's vision encoder is likewise "
                "pre-trained before the language model reads it). 0 skips the stage."})
    vision_stage_learning_rate: float = field(default=5e-3, metadata={
        "help": "Peak learning rate of the vision stage (cosine schedule, same warm-up ratio)."})
    epochs: int = field(default=14, metadata={"help": "Passes over the training screens in the caption stage."})
    eval_screens: int = field(default=16, metadata={"help": "Held-out screens per kind for the caption score."})
    batch_size: int = field(default=16, metadata={"help": "Screens per optimizer step."})
    learning_rate: float = field(default=2e-3, metadata={"help": "Peak AdamW learning rate of the language model."})
    vision_learning_rate: float = field(default=0.0, metadata={
        "help": "Peak learning rate of the vision tower in the caption stage; 0 (the default) freezes it there, "
                "which keeps the vision stage's features intact and skips the vision tower's backward pass."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps with linear warm-up."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    kind_weight: float = field(default=3.0, metadata={
        "help": "Loss weight of the caption's first sentence (the kind of screen) relative to its other tokens."})
    layout_aux_weight: float = field(default=3.0, metadata={
        "help": "Weight, in the caption stage, of the vision stage's loss (the linear head on the mean image "
                "embedding predicting kind and layout); it keeps a trainable vision tower's features and the head's "
                "held-out score meaningful. The head is dropped after training."})
    min_pixels: int = field(default=8 * 32 * 32, metadata={
        "help": "Smallest image area of the pre-trained model's processor (its default for every later use)."})
    max_pixels: int = field(default=32 * 32 * 32, metadata={
        "help": "Largest image area of the pre-trained model's processor (30 image tokens for a 4:3 screen): a "
                "from-scratch vision tower learns screen kinds several times faster per CPU second at this size "
                "than at 64 or 256 tokens; saved as the processor default, so training and vLLM use the same."})
    base: TinyModelSpec = field(default_factory=TinyModelSpec, metadata={"help": "The random model trained."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.train_screens < self.batch_size or self.batch_size < 1:
            raise ConfigError("need 1 <= batch_size <= train_screens")
        if self.eval_screens < 1 or self.epochs < 1:
            raise ConfigError("eval_screens and epochs must be >= 1")
        if self.vision_steps < 0:
            raise ConfigError("vision_steps must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio must be in [0, 1)")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError("need 0 < min_pixels <= max_pixels")

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"spec": asdict(self), "base": self.base.fingerprint, "version": PRETRAIN_VERSION},
                          sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- captions

_CALENDAR = {"month": "A month calendar", "picker": "A date picker",
             "booking": "A booking page with a calendar and time slots"}
_CLAIM = {"side": "An insurance claim form with labels beside the fields",
          "stacked": "An insurance claim form with labels above the fields",
          "two-column": "An insurance claim form in two columns",
          "details": "A page of insurance claim details"}
_PROVIDER = {"list": "A list of healthcare providers", "table": "A table of healthcare providers",
             "dropdown": "A dropdown menu of healthcare providers"}


def kind_sentence(kind: str, truth: dict) -> str:
    """The first sentence of a caption: what kind of screen it is, in plain words."""
    if kind == "calendar":
        return _CALENDAR[truth["layout"]] + "."
    if kind == "claim-window":
        return _CLAIM[truth["layout"]] + "."
    if kind == "provider-select":
        return _PROVIDER[truth["layout"]] + "."
    if kind == "chandra-ocr":
        return "A document page."
    raise ValueError(f"no caption for screen kind {kind!r}")


def caption(kind: str, truth: dict) -> str:
    """A descriptive caption of a generated screen, built from its ground truth."""
    first = kind_sentence(kind, truth)
    if kind == "calendar":
        rest = f"{truth['month_name']} {truth['year']}, day {truth['highlighted_day']} highlighted."
        if truth.get("time_slots"):
            rest += f" {len(truth['time_slots'])} time slots from {truth['time_slots'][0]['label']}."
    elif kind == "claim-window":
        names = ", ".join(f["name"] for f in truth["fields"])
        buttons = ", ".join(b["label"] for b in truth.get("buttons", []))
        rest = f"Fields: {names}." + (f" Buttons: {buttons}." if buttons else "")
    elif kind == "provider-select":
        providers = truth["providers"]
        first_one = providers[0]
        rest = f"{len(providers)} providers, first {first_one['name']}, {first_one['specialty']}."
    else:
        lines = truth["markdown"].splitlines()
        title = next((line[2:] for line in lines if line.startswith("# ")), "")
        parts = []
        if any(line.startswith("|") for line in lines):
            parts.append("a table")
        if any(line[:3].rstrip(".").isdigit() and ". " in line[:4] for line in lines):
            parts.append("a numbered list")
        if any(line.startswith("- ") for line in lines):
            parts.append("a bullet list")
        sections = sum(line.startswith("## ") for line in lines)
        if sections:
            parts.append(f"{sections} section{'s' if sections > 1 else ''}")
        rest = f"Title: {title}." + (f" It has {', '.join(parts)}." if parts else "")
    return f"{first} {rest}"


LAYOUTS = tuple(f"calendar/{k}" for k in _CALENDAR) + tuple(f"claim-window/{k}" for k in _CLAIM) + tuple(
    f"provider-select/{k}" for k in _PROVIDER) + ("chandra-ocr/page",)


def _layout_kinds():
    import torch

    return torch.tensor([KINDS.index(layout.split("/")[0]) for layout in LAYOUTS])


def layout_id(kind: str, truth: dict) -> int:
    """Index of the screen's kind/layout in LAYOUTS."""
    return LAYOUTS.index(f"{kind}/{truth.get('layout', 'page')}")


def caption_example(index: int, split: str, seed: int):
    """(kind, messages, image, caption, layout id) of screen `index` of a split: kinds in turn, seeds from
    (seed, split, index)."""
    kind = KINDS[index % len(KINDS)]
    screen_seed = sample_seed(seed, f"pretrain-{split}", index)
    screen = generate(kind, screen_seed)
    rng = random.Random(f"pretrain-prompt:{seed}:{split}:{index}")
    system = rng.choice(SYSTEMS)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": rng.choice(PROMPTS)}]}]
    return kind, messages, screen.image, caption(kind, screen.truth), layout_id(kind, screen.truth)


def encode_caption(processor, index: int, split: str, seed: int, kind_weight: float) -> dict:
    """One encoded caption example (training.llava_data.encode) plus per-token loss weights and the layout id.

    pixel_values are kept as uint8 (the processor's normalisation inverted), a quarter of the memory.
    """
    import torch

    from training.llava_data import encode

    kind, messages, image, text, layout = caption_example(index, split, seed)
    out = encode(processor, messages, [image], text)
    first = len(processor.tokenizer(text.split(". ")[0] + ".", add_special_tokens=False)["input_ids"])
    answer = (out["labels"] != -100).nonzero().flatten()
    weights = torch.zeros(out["labels"].shape, dtype=torch.float32)
    weights[answer] = 1.0
    weights[answer[:first]] = kind_weight
    out["loss_weights"] = weights
    out["layout"] = torch.tensor(layout)
    out["pixel_values"] = _to_uint8(out["pixel_values"], processor)
    return out


def _to_uint8(pixels, processor):
    import torch

    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    channels = pixels.view(pixels.shape[0], 3, -1)
    raw = (channels * std[None, :, None] + mean[None, :, None]) * 255
    return raw.round().clamp(0, 255).to(torch.uint8).view(pixels.shape)


def _from_uint8(pixels, processor):
    import torch

    ip = processor.image_processor
    mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
    channels = pixels.view(pixels.shape[0], 3, -1).float() / 255
    return ((channels - mean[None, :, None]) / std[None, :, None]).view(pixels.shape)


# ----------------------------------------------------------------------------------------------- training

def _mean_per_image(merged, grid_thw, model):
    """The mean image embedding of each image in a batch, from the vision tower's merged tokens."""
    import torch

    sizes = (grid_thw.prod(-1) // model.model.visual.spatial_merge_size**2).tolist()
    return torch.stack([chunk.mean(0) for chunk in torch.split(merged, sizes)])


def _vision_stage(model, processor, examples: list[dict], probe, spec: PretrainSpec,
                  stop_after: int | None = None) -> list[float]:
    """Train the vision tower and the layout head alone on the screens' kind/layout (the first `stop_after` steps
    of the schedule, default all); return the loss curve."""
    import torch

    visual = model.model.visual
    params = list(visual.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(params, lr=spec.vision_stage_learning_rate, weight_decay=spec.weight_decay,
                                  betas=(0.9, 0.98))
    scheduler = _cosine(optimizer, spec.warmup_ratio, spec.vision_steps)
    order_gen = torch.Generator().manual_seed(spec.seed + 1)
    order: list[int] = []
    curve = []
    for _ in progress(range(stop_after or spec.vision_steps), desc="pretrain vision tower", unit="step"):
        if len(order) < spec.batch_size:
            order += torch.randperm(len(examples), generator=order_gen).tolist()
        chunk, order = [examples[i] for i in order[:spec.batch_size]], order[spec.batch_size:]
        grid_thw = torch.cat([ex["image_grid_thw"] for ex in chunk])
        pixels = _from_uint8(torch.cat([ex["pixel_values"] for ex in chunk]), processor)
        merged = visual(pixels, grid_thw=grid_thw).pooler_output
        loss = torch.nn.functional.cross_entropy(probe(_mean_per_image(merged, grid_thw, model)),
                                                 torch.stack([ex["layout"] for ex in chunk]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(round(loss.item(), 4))
    return curve


def _cosine(optimizer, warmup_ratio: float, steps: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)


def _weighted_loss(model, batch: dict, probe, captured: dict, spec: PretrainSpec):
    """(total loss, caption loss, layout loss or None, per-example layout logits or None) of one batch."""
    import torch

    weights, layouts, labels = batch.pop("loss_weights"), batch.pop("layout"), batch.pop("labels")
    logits = model(**batch).logits[:, :-1]
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=-100,
                                                   reduction="none")
    w = weights[:, 1:]
    caption_loss = (token_loss * w).sum() / w.sum()
    if not spec.layout_aux_weight:
        return caption_loss, caption_loss, None, None
    layout_logits = probe(_mean_per_image(captured.pop("pooled"), batch["image_grid_thw"], model))
    layout_loss = torch.nn.functional.cross_entropy(layout_logits, layouts)
    return caption_loss + spec.layout_aux_weight * layout_loss, caption_loss, layout_loss, layout_logits


def _evaluate(model, processor, spec: PretrainSpec, probe, captured: dict) -> dict:
    """Held-out caption scores: token accuracy and loss (teacher forced), exact match of the first sentence (the
    kind of screen) and of the whole caption (greedy), and the layout probe's accuracy."""
    import torch

    from training.llava_data import collate

    n = spec.eval_screens * len(KINDS)
    tok = processor.tokenizer
    examples = [encode_caption(processor, i, "eval", spec.seed, 1.0) for i in range(n)]
    refs = [caption_example(i, "eval", spec.seed) for i in range(n)]
    loss_sum, tokens, correct, layout_ok, kind_ok = 0.0, 0, 0, 0, 0
    layout_kinds = _layout_kinds()
    first_ok = full_ok = 0
    per_kind = {kind: [0, 0] for kind in KINDS}
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.eval()
    with torch.no_grad():
        for start in range(0, n, 16):
            chunk = examples[start:start + 16]
            batch = collate(chunk, tok.pad_token_id)
            batch["pixel_values"] = _from_uint8(batch["pixel_values"], processor)
            labels = batch["labels"].clone()
            layouts = batch["layout"].clone()
            _, _, _, layout_logits = _weighted_loss(model, dict(batch), probe, captured, spec)
            if layout_logits is not None:
                predicted = layout_logits.argmax(-1)
                layout_ok += int((predicted == layouts).sum())
                kind_ok += int((layout_kinds[predicted] == layout_kinds[layouts]).sum())
            logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_weights", "layout")}).logits
            logits, target = logits[:, :-1], labels[:, 1:]
            mask = target != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
            tokens += int(mask.sum())
            correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
            # Greedy captions from the prompts alone (the answer part cut off).
            prompts = []
            for ex in chunk:
                keep = ex["labels"] == -100
                prompts.append({"input_ids": ex["input_ids"][keep], "attention_mask": ex["attention_mask"][keep],
                                "mm_token_type_ids": ex["mm_token_type_ids"][keep], "labels": ex["labels"][keep],
                                "pixel_values": ex["pixel_values"], "image_grid_thw": ex["image_grid_thw"]})
            gen = collate(prompts, tok.pad_token_id, padding_side="left")
            gen.pop("labels")
            gen["pixel_values"] = _from_uint8(gen["pixel_values"], processor)
            out = model.generate(**gen, max_new_tokens=96, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
            texts = tok.batch_decode(out[:, gen["input_ids"].shape[1]:], skip_special_tokens=True)
            for (kind, _, _, ref, _), got in zip(refs[start:start + 16], texts):
                got = got.strip()
                ok = got.split(". ")[0] == ref.split(". ")[0]
                first_ok += ok
                full_ok += got == ref
                per_kind[kind][0] += ok
                per_kind[kind][1] += 1
    model.train()
    metrics = {
        "eval_loss": round(loss_sum / max(1, tokens), 5),
        "caption_token_accuracy": round(correct / max(1, tokens), 4),
        "kind_sentence_exact_match": round(first_ok / n, 4),
        "caption_exact_match": round(full_ok / n, 4),
        "kind_sentence_exact_match_per_kind": {k: round(ok / max(1, total), 4) for k, (ok, total) in per_kind.items()},
        "eval_screens": n,
    }
    if spec.layout_aux_weight:
        metrics["layout_probe_accuracy"] = round(layout_ok / n, 4)
        metrics["layout_probe_kind_accuracy"] = round(kind_ok / n, 4)
    return metrics


def _start(spec: PretrainSpec, random_dir: Path):
    """Seeded start of pre-training: the random model in `random_dir` (float32, training mode), its processor at
    the recipe's image size, the encoded training screens and the layout head."""
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    torch.manual_seed(spec.seed)
    processor = AutoProcessor.from_pretrained(random_dir)
    # The pre-trained model's processor default image size: what training, validation and vLLM all use.
    processor.image_processor.size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    model = Qwen3VLForConditionalGeneration.from_pretrained(random_dir, dtype=torch.float32)
    model.train()
    examples = [encode_caption(processor, i, "train", spec.seed, spec.kind_weight)
                for i in progress(range(spec.train_screens), desc="draw screens", unit="screen")]
    probe = torch.nn.Linear(model.config.text_config.hidden_size, len(LAYOUTS))
    return model, processor, examples, probe


def replay_vision_stage(spec: PretrainSpec, steps: int, cache_dir: Path | None = None) -> list[float]:
    """The loss curve of the recipe's first `steps` vision-stage steps, run exactly as pre-training runs them (same
    screens, init and schedule): checks a recipe against a recorded log in a minute instead of twenty."""
    from training.inference import set_threads

    if not 0 < steps <= spec.vision_steps:
        raise ValueError(f"steps must be within the recipe's {spec.vision_steps} vision-stage steps, got {steps}")
    random_dir = build_tiny_model(spec.base, cache_dir or default_cache_dir())
    set_threads()
    model, processor, examples, probe = _start(spec, random_dir)
    return _vision_stage(model, processor, examples, probe, spec, stop_after=steps)


def pretrain(spec: PretrainSpec, random_dir: Path, out: Path) -> dict:
    """Pre-train the random model in `random_dir` (vision stage, then caption stage); save model + processor to
    `out` and return the log (wall times, loss curves, held-out scores)."""
    import torch

    from training.llava_data import collate

    start = time.perf_counter()
    model, processor, examples, probe = _start(spec, random_dir)
    data_s = time.perf_counter() - start
    per_epoch = spec.train_screens // spec.batch_size
    steps = per_epoch * spec.epochs
    vision_curve = _vision_stage(model, processor, examples, probe, spec) if spec.vision_steps else []
    vision_s = time.perf_counter() - start - data_s
    captured: dict = {}
    if spec.layout_aux_weight:
        model.model.visual.register_forward_hook(lambda _m, _i, o: captured.__setitem__("pooled", o.pooler_output))
    visual = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
    if not spec.vision_learning_rate:  # the vision stage's features are kept as they are
        for p in visual:
            p.requires_grad_(False)
        visual = []
    others = [p for n, p in model.named_parameters() if ".visual." not in f".{n}"]
    optimizer = torch.optim.AdamW(
        [{"params": others + list(probe.parameters()), "lr": spec.learning_rate},
         {"params": visual, "lr": spec.vision_learning_rate}],
        weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    scheduler = _cosine(optimizer, spec.warmup_ratio, steps)
    curve: list[list] = []
    order_gen = torch.Generator().manual_seed(spec.seed)
    bar = progress(total=steps, desc="pretrain tiny base", unit="step")
    for epoch in range(spec.epochs):
        order = torch.randperm(spec.train_screens, generator=order_gen).tolist()
        for step in range(per_epoch):
            chunk = [examples[i] for i in order[step * spec.batch_size:(step + 1) * spec.batch_size]]
            batch = collate(chunk, processor.tokenizer.pad_token_id)
            batch["pixel_values"] = _from_uint8(batch["pixel_values"], processor)
            loss, caption_loss, layout_loss, _ = _weighted_loss(model, batch, probe, captured, spec)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append([round(caption_loss.item(), 4), round(layout_loss.item(), 4) if layout_loss is not None else None])
            bar.update(1)
            bar.set_postfix(caption=f"{curve[-1][0]:.3f}", layout=curve[-1][1])
    bar.close()
    train_s = time.perf_counter() - start
    metrics = _evaluate(model, processor, spec, probe, captured)
    model.to(torch.bfloat16).save_pretrained(out)
    processor.save_pretrained(out)
    if (random_dir / "generation_config.json").exists():
        shutil.copy(random_dir / "generation_config.json", out / "generation_config.json")

    def mean(values):
        values = [v for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    result = {
        "train_wall_s": round(train_s, 1),
        "draw_screens_s": round(data_s, 1),
        "total_wall_s": round(time.perf_counter() - start, 1),
        "vision_stage_wall_s": round(vision_s, 1),
        "vision_stage_steps": spec.vision_steps,
        "vision_stage_loss_first": vision_curve[0] if vision_curve else None,
        "vision_stage_loss_last10_mean": mean(vision_curve[-10:]),
        "vision_stage_loss_curve": vision_curve,
        "steps": steps,
        "caption_loss_first": curve[0][0],
        "caption_loss_last10_mean": mean([c[0] for c in curve[-10:]]),
        "layout_loss_first": curve[0][1],
        "layout_loss_last10_mean": mean([c[1] for c in curve[-10:]]),
        "loss_curve": curve,
        "held_out": metrics,
        "torch_threads": torch.get_num_threads(),
    }
    log.info("pre-trained tiny base in %s s (%d steps; caption loss %s -> %s); held out: caption token accuracy %s, "
             "kind sentence exact %s, caption exact %s, layout probe %s (kind %s)", result["total_wall_s"], steps,
             result["caption_loss_first"], result["caption_loss_last10_mean"], metrics["caption_token_accuracy"],
             metrics["kind_sentence_exact_match"], metrics["caption_exact_match"],
             metrics.get("layout_probe_accuracy"), metrics.get("layout_probe_kind_accuracy"))
    return result


def pretrained_dir(spec: PretrainSpec, cache_dir: Path | None = None) -> Path:
    """Where the pre-trained model for `spec` lives (whether or not it is built yet)."""
    return (cache_dir or default_cache_dir()) / f"tiny-qwen3-vl-pretrained-{spec.fingerprint}"


def shipped_dir(spec: PretrainSpec) -> Path:
    """Where the repository ships the pre-trained base for `spec` (whether or not it does)."""
    return SHIPPED_ROOT / f"tiny-qwen3-vl-pretrained-{spec.fingerprint}"


def check_shipped(folder: Path) -> dict:
    """The shipped base's record, after checking its weights against the fingerprint recorded beside them;
    ValueError naming the folder when they differ (a damaged or hand-edited copy)."""
    from lora_router.manifest import model_fingerprint

    record = json.loads((folder / SHIPPED_RECORD).read_text())
    actual = model_fingerprint(folder)
    if actual != record["weights_fingerprint"]:
        raise ValueError(f"{folder}: its weights have fingerprint {actual}, but {SHIPPED_RECORD} records "
                         f"{record['weights_fingerprint']}: the shipped base is damaged (restore it with git, or "
                         "rebuild it: python -m training.pretrain --rebuild true --ship true)")
    return record


def build_pretrained_model(spec: PretrainSpec | None = None, cache_dir: Path | None = None,
                           use_shipped: bool = True) -> Path:
    """Return the folder of the pre-trained tiny base for `spec`: the cache's; else the repository's shipped copy,
    checked and copied into the cache; else pre-trained now (`use_shipped` False: always pre-trained, unless
    cached).

    Written under a temporary name and renamed when complete (pretrain_log.json last), like the random model.
    """
    from training.inference import set_threads

    spec = spec or PretrainSpec()
    root = cache_dir or default_cache_dir()
    out = pretrained_dir(spec, root)
    if (out / DONE_MARKER).exists():
        return out
    shipped = shipped_dir(spec)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=root))
    tmp.chmod(0o755)
    try:
        if use_shipped and shipped.is_dir():
            check_shipped(shipped)
            log.info("pre-trained base: the shipped copy %s (no pre-training)", shipped)
            shutil.copytree(shipped, tmp, dirs_exist_ok=True)
        else:
            random_dir = build_tiny_model(spec.base, root)
            set_threads()
            result = pretrain(spec, random_dir, tmp)
            (tmp / "pretrain_spec.json").write_text(json.dumps(
                {"spec": asdict(spec), "random_base_fingerprint": spec.base.fingerprint,
                 "version": PRETRAIN_VERSION, "threads": _threads()}, indent=2, default=str))
            (tmp / DONE_MARKER).write_text(json.dumps(result, indent=2))
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same build first
            if not (out / DONE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def ship(built: Path, spec: PretrainSpec) -> Path:
    """Copy a built base into the repository as the one shipped version (older versions removed), with a record of
    its weights' fingerprint and size."""
    from lora_router.manifest import model_fingerprint

    dest = shipped_dir(spec)
    for old in SHIPPED_ROOT.glob("tiny-qwen3-vl-pretrained-*"):
        shutil.rmtree(old)
    shutil.copytree(built, dest)
    size = sum(f.stat().st_size for f in dest.iterdir())
    (dest / SHIPPED_RECORD).write_text(json.dumps(
        {"spec_fingerprint": spec.fingerprint, "weights_fingerprint": model_fingerprint(dest), "bytes": size,
         "recipe": "python -m training.pretrain with PretrainSpec's defaults (pretrain_spec.json)",
         "rebuild": "python -m training.pretrain --rebuild true"}, indent=2) + "\n")
    return dest


@dataclass
class ShipArguments:
    """Whether `python -m training.pretrain` uses, rebuilds or replaces the repository's shipped base."""

    rebuild: bool = field(default=False, metadata={
        "help": "Pre-train from the recipe even when the repository ships this base (into the cache, or --cache-dir)."})
    ship: bool = field(default=False, metadata={
        "help": "Copy the result into training/bases/ as the one shipped version, replacing the old one."})


def build(spec: PretrainSpec, cache: CacheArguments, shipping: ShipArguments) -> int:
    """Build (or find) the pre-trained base; print its log (loss curves left out) and its folder."""
    out = build_pretrained_model(spec, cache.cache_dir, use_shipped=not shipping.rebuild)
    result = json.loads((out / DONE_MARKER).read_text())
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("loss_curve")}, indent=2))
    print(out)
    if shipping.ship:
        print(f"shipped: {ship(out, spec)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    spec, cache, shipping = parse_command([PretrainSpec, CacheArguments, ShipArguments], argv,
                                          prog="python -m training.pretrain", description=__doc__)
    return run_command(lambda: build(spec, cache, shipping))


if __name__ == "__main__":
    raise SystemExit(main())
