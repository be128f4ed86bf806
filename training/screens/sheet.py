"""Contact sheet of generated screens, one labelled row per kind, for a person to look at.

    python -m training.screens --out contact_sheet.png --per-kind 4 --seed 0
    python -m training.screens --out mobile.png --family mobile      # one style family's look
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from training.screens import FAMILIES, KINDS, generate
from training.screens.common import font

THUMB_W, THUMB_H = 400, 300
LABEL_W = 150
PAD = 10


def contact_sheet(kinds: Sequence[str], per_kind: int, seed: int, family: str | None = None) -> Image.Image:
    """A grid with one row per kind (labelled on the left) of per_kind screens, seeds seed .. seed+per_kind-1,
    in the style family (None: today's mix)."""
    width = LABEL_W + per_kind * (THUMB_W + PAD) + PAD
    height = len(kinds) * (THUMB_H + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (60, 63, 68))
    draw = ImageDraw.Draw(sheet)
    for row, kind in enumerate(kinds):
        top = PAD + row * (THUMB_H + PAD)
        draw.text((PAD, top + THUMB_H / 2), kind, font=font("sans", 16, bold=True), fill=(240, 240, 240),
                  anchor="lm")
        for column in range(per_kind):
            thumb = generate(kind, seed + column, family).image
            thumb.thumbnail((THUMB_W, THUMB_H), Image.Resampling.LANCZOS)
            left = LABEL_W + PAD + column * (THUMB_W + PAD)
            sheet.paste(thumb, (left + (THUMB_W - thumb.width) // 2, top + (THUMB_H - thumb.height) // 2))
    return sheet


@dataclass
class SheetArguments:
    """The flags of `python -m training.screens`."""

    out: Path = field(default=Path("contact_sheet.png"), metadata={"help": "PNG to write."})
    per_kind: int = field(default=4, metadata={"help": "Screens per kind (one row per kind)."})
    seed: int = field(default=0, metadata={"help": "First seed of every row."})
    kinds: list[str] = field(default_factory=lambda: list(KINDS), metadata={
        "help": "Kinds to show, one row each.", "choices": KINDS})
    family: str | None = field(default=None, metadata={
        "help": "Style family to draw every screen in (default: today's mix).", "choices": tuple(FAMILIES)})

    def __post_init__(self) -> None:
        check_types(self)
        unknown = [kind for kind in self.kinds if kind not in KINDS]
        if unknown:
            raise ConfigError(f"unknown kind(s) {', '.join(unknown)} (kinds: {', '.join(KINDS)})")
        if self.per_kind < 1:
            raise ConfigError(f"per_kind must be >= 1, got {self.per_kind}")
        if self.family is not None and self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r} (families: {', '.join(FAMILIES)})")


def write(args: SheetArguments) -> int:
    """Draw the sheet; print the file written."""
    contact_sheet(args.kinds, args.per_kind, args.seed, args.family).save(args.out)
    print(args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(SheetArguments, argv, prog="python -m training.screens", description=__doc__)
    return run_command(lambda: write(args))
