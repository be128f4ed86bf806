"""The embedded model: the names a config uses for it and the folder each name stands for.

No weights can be downloaded on development and CI machines, so every command runs on this model unless a
config names another: as 'tiny-random' directly (training.tiny_random), and as the default 'tiny' after
pre-training (vision stage, then captions: training.pretrain). resolve_base_model is here, above both builders,
so that training.tiny_random never has to import training.pretrain, which builds on it.

    python -m training.tiny_model                # build (or find) the random model and print its folder
    python -m training.tiny_model --name tiny    # the same for the pre-trained default (what serving asks)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lora_router.configuration import check_types, parse_command, run_command
from lora_router.deployment import EMBEDDED_MODELS
from training.tiny_random import CacheArguments, TinyModelSpec, build_tiny_model

# Names configs use for the embedded model: the pre-trained base ("tiny", alias "tiny-pretrained", the default
# every LoRA trains on) and the random-init model it starts from ("tiny-random").
TINY_MODEL, TINY_PRETRAINED_MODEL, TINY_RANDOM_MODEL = EMBEDDED_MODELS


@dataclass
class NameArguments:
    """Which embedded model to print the folder of."""

    name: Literal["tiny", "tiny-pretrained", "tiny-random"] = field(default=TINY_RANDOM_MODEL, metadata={
        "help": "The embedded model: 'tiny-random' is built from the spec flags; 'tiny' (alias 'tiny-pretrained') "
                "is the pre-trained default (the shipped copy, or pre-trained from its recipe)."})

    def __post_init__(self) -> None:
        check_types(self)


def resolve_base_model(path: str) -> str:
    """The base model folder a config names; anything else is returned unchanged.

    'tiny' (or 'tiny-pretrained') is the embedded default: the random model pre-trained on synthetic screens
    (training.pretrain; built and cached on first use, about 7.5 minutes on 2 cores), as a real deployment starts
    from a pre-trained VLM. 'tiny-random' is the random-init model itself (cheap; for mechanics only).
    """
    if path in (TINY_MODEL, TINY_PRETRAINED_MODEL):
        # Imported here: pretrain loads the screen generators (matplotlib, ~0.7 s), which only 'tiny' needs.
        from training.pretrain import build_pretrained_model

        return str(build_pretrained_model())
    if path == TINY_RANDOM_MODEL:
        return str(build_tiny_model())
    return path


def build(name: str, spec: TinyModelSpec, cache_dir: Path | None) -> int:
    """Build (or find) the embedded model `name`; print its folder."""
    print(build_tiny_model(spec, cache_dir) if name == TINY_RANDOM_MODEL else resolve_base_model(name))
    return 0


def main(argv: list[str] | None = None) -> int:
    which, spec, cache = parse_command([NameArguments, TinyModelSpec, CacheArguments], argv,
                                       prog="python -m training.tiny_model", description=__doc__)
    return run_command(lambda: build(which.name, spec, cache.cache_dir))


if __name__ == "__main__":
    raise SystemExit(main())
