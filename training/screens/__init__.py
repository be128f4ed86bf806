"""Synthetic UI screenshots with pixel-exact ground truth, one generator per expert task.

    screen = generate("calendar", seed=7)      # Screen(kind, image, truth); same (kind, seed) -> same bytes
    screen = generate("calendar", seed=7, family="mobile")   # the same kind in a named style family

Kinds: calendar (month grids, date pickers, time slots), claim-window (insurance claim forms), provider-select
(provider lists, tables, dropdowns) and chandra-ocr (document pages with their markdown). Everything is drawn
with Pillow from a random.Random seeded by (kind, seed), with the DejaVu fonts that ship inside matplotlib, so
the output is identical on every machine. `python -m training.screens` writes a contact sheet of samples.

Without a family a screen is drawn in today's random mix of looks, exactly as before families existed. A style
family (training.screens.styles: FAMILIES, IN_DISTRIBUTION, HELD_OUT) fixes the look: theme, window idiom,
fonts, size, clutter and overlays; held-out families must never be used in pre-training or router training.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from training.screens import calendar, claim_window, document, provider_select
from training.screens.common import Box, Screen
from training.screens.styles import FAMILIES, HELD_OUT, IN_DISTRIBUTION, Look, style_family

__all__ = ["FAMILIES", "HELD_OUT", "IN_DISTRIBUTION", "KINDS", "Box", "Screen", "generate"]

_GENERATORS: dict[str, Callable[[random.Random, Look], Screen]] = {
    "calendar": calendar.generate,
    "claim-window": claim_window.generate,
    "provider-select": provider_select.generate,
    "chandra-ocr": document.generate,
}
KINDS: tuple[str, ...] = tuple(_GENERATORS)


def generate(kind: str, seed: int, family: str | None = None) -> Screen:
    """The screen of the given kind for seed, in today's mix of looks or in the named style family; the same
    (kind, seed, family) always gives the same pixels and truth."""
    if kind not in _GENERATORS:
        raise ValueError(f"unknown screen kind {kind!r}; known kinds: {', '.join(KINDS)}")
    # A string seed is hashed with SHA-512 by random.Random, independent of PYTHONHASHSEED.
    if family is None:
        return _GENERATORS[kind](random.Random(f"{kind}:{seed}"))
    look = style_family(family)
    # A seed string of its own: a family's screen is a new screen, not today's one redrawn with other draws.
    return _GENERATORS[kind](random.Random(f"{kind}:{family}:{seed}"), look)
