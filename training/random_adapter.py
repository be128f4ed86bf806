"""Random-weight PEFT LoRA adapters for a base model: stand-ins that exercise serving before training exists.

Serving tests and the GPU benchmark (real shapes, no downloadable weights) need adapters that change the
model's output without being trained. B is initialised non-zero (PEFT's default zero B is a no-op), unless
`--zero-b` asks for exactly that no-op, which serving's integrity probe must catch.

    python -m training.random_adapter --base tiny --out checkpoints/tiny/calendar --rank 8
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.manifest import ALL_LINEAR, LANGUAGE_MODEL_TARGETS, AdapterManifest, lora_targets, model_fingerprint
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from training.tiny_model import resolve_base_model


def make_random_adapter(base: str, out: str | Path, *, rank: int = 8, alpha: int | None = None, seed: int = 0,
                        zero_b: bool = False, labels: list[str] | None = None, use_dora: bool = False,
                        modules_to_save: list[str] | None = None, b_std: float = 0.05,
                        vision_tower: bool = False) -> Path:
    """Write a PEFT LoRA adapter with random weights (and its manifest) to `out`.

    `labels` marks it as a router (manifest labels and prompts). `use_dora` and `modules_to_save` exist to
    make adapters that serving must refuse. `vision_tower` puts LoRA on every linear layer (PEFT's all-linear),
    the vision tower's and its mergers' included, as `--lora_vision_tower True` trains it.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    base_path = resolve_base_model(base)
    model = Qwen3VLForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
    targets = [ALL_LINEAR] if vision_tower else list(LANGUAGE_MODEL_TARGETS)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=0.0, bias="none", use_dora=use_dora,
                        modules_to_save=modules_to_save, **lora_targets(targets, vision_tower))
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.zeros_like(param) if zero_b else torch.randn(param.shape, generator=gen) * b_std)
    out = Path(out)
    peft_model.save_pretrained(out)
    AdapterManifest(
        base_model=base_path,
        base_model_fingerprint=model_fingerprint(base_path),
        rank=rank,
        target_modules=targets,
        vision_tower=vision_tower,
        labels=list(labels) if labels else None,
        system_prompt=router_system_prompt(labels) if labels else None,
        user_prompt=ROUTER_USER_PROMPT if labels else None,
        metrics={"random": True},
    ).write(out)
    return out


@dataclass
class RandomAdapterArguments:
    """The flags of `python -m training.random_adapter`."""

    out: Path = field(metadata={"help": "Adapter folder to write."})
    base: str = field(default="tiny", metadata={"help": "Base model folder, or 'tiny' / 'tiny-random'."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    seed: int = field(default=0, metadata={"help": "Weights seed."})
    zero_b: bool = field(default=False, metadata={"help": "All B zero: an adapter that does nothing."})
    labels: str | None = field(default=None, metadata={"help": "Comma-separated router labels (makes a router)."})
    vision_tower: bool = field(default=False, metadata={
        "help": "LoRA on every linear layer, the vision tower's too (served only with engine.tower_lora)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")


def write(args: RandomAdapterArguments) -> int:
    """Write the adapter; print its folder."""
    labels = args.labels.split(",") if args.labels else None
    print(make_random_adapter(args.base, args.out, rank=args.rank, seed=args.seed, zero_b=args.zero_b, labels=labels,
                              vision_tower=args.vision_tower))
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(RandomAdapterArguments, argv, prog="python -m training.random_adapter",
                            description=__doc__)
    return run_command(lambda: write(args))


if __name__ == "__main__":
    raise SystemExit(main())
