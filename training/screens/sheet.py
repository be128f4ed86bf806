"""Contact sheet of generated screens, one labelled row per kind, for a person to look at.

    python -m training.screens --out contact_sheet.png --per-kind 4 --seed 0
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from training.screens import KINDS, generate
from training.screens.common import font

THUMB_W, THUMB_H = 400, 300
LABEL_W = 150
PAD = 10


def contact_sheet(kinds: Sequence[str], per_kind: int, seed: int) -> Image.Image:
    """A grid with one row per kind (labelled on the left) of per_kind screens, seeds seed .. seed+per_kind-1."""
    width = LABEL_W + per_kind * (THUMB_W + PAD) + PAD
    height = len(kinds) * (THUMB_H + PAD) + PAD
    sheet = Image.new("RGB", (width, height), (60, 63, 68))
    draw = ImageDraw.Draw(sheet)
    for row, kind in enumerate(kinds):
        top = PAD + row * (THUMB_H + PAD)
        draw.text((PAD, top + THUMB_H / 2), kind, font=font("sans", 16, bold=True), fill=(240, 240, 240),
                  anchor="lm")
        for column in range(per_kind):
            thumb = generate(kind, seed + column).image
            thumb.thumbnail((THUMB_W, THUMB_H), Image.Resampling.LANCZOS)
            left = LABEL_W + PAD + column * (THUMB_W + PAD)
            sheet.paste(thumb, (left + (THUMB_W - thumb.width) // 2, top + (THUMB_H - thumb.height) // 2))
    return sheet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.screens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("contact_sheet.png"), help="PNG to write")
    parser.add_argument("--per-kind", type=int, default=4, help="screens per kind (one row per kind)")
    parser.add_argument("--seed", type=int, default=0, help="first seed of every row")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="kinds to show")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    contact_sheet(args.kinds, args.per_kind, args.seed).save(args.out)
    print(args.out)
    return 0
