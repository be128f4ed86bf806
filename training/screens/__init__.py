"""Synthetic UI screenshots with pixel-exact ground truth, one generator per expert task.

    screen = generate("calendar", seed=7)      # Screen(kind, image, truth); same (kind, seed) -> same bytes

Kinds: calendar (month grids, date pickers, time slots), claim-window (insurance claim forms), provider-select
(provider lists, tables, dropdowns) and chandra-ocr (document pages with their markdown). Everything is drawn
with Pillow from a random.Random seeded by (kind, seed), with the DejaVu fonts that ship inside matplotlib, so
the output is identical on every machine. `python -m training.screens` writes a contact sheet of samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from training.screens import calendar, claim_window, document, provider_select
from training.screens.common import Box, Screen

__all__ = ["KINDS", "Box", "Screen", "generate"]

_GENERATORS: dict[str, Callable[[random.Random], Screen]] = {
    "calendar": calendar.generate,
    "claim-window": claim_window.generate,
    "provider-select": provider_select.generate,
    "chandra-ocr": document.generate,
}
KINDS: tuple[str, ...] = tuple(_GENERATORS)


def generate(kind: str, seed: int) -> Screen:
    """The screen of the given kind for seed; the same (kind, seed) always gives the same pixels and truth."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown screen kind {kind!r}; known kinds: {', '.join(KINDS)}")
    # A string seed is hashed with SHA-512 by random.Random, independent of PYTHONHASHSEED.
    return _GENERATORS[kind](random.Random(f"{kind}:{seed}"))
