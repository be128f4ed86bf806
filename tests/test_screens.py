"""Synthetic screens: determinism, variety, and ground truth that agrees with the pixels."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from training.screens import KINDS, Box, generate
from training.screens.sheet import contact_sheet

SEEDS = range(20)


def _pixels(box: list[int], image) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.asarray(image, dtype=np.int16)[y0:y1, x0:x1]


def _near(pixels: np.ndarray, color, tolerance: int) -> np.ndarray:
    return np.abs(pixels - np.array(color, dtype=np.int16)).max(axis=-1) <= tolerance


def _ink(pixels: np.ndarray) -> int:
    """Pixels that differ clearly from the region's most common colour (text strokes, borders)."""
    median = np.median(pixels.reshape(-1, 3), axis=0)
    return int((np.abs(pixels - median).max(axis=-1) > 60).sum())


def _inside(box: list[int], image) -> bool:
    x0, y0, x1, y1 = box
    return 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height


def _disjoint(boxes: list[list[int]]) -> bool:
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                return False
    return True


@pytest.fixture(scope="module")
def screens() -> dict[str, list]:
    return {kind: [generate(kind, seed) for seed in SEEDS] for kind in KINDS}


def test_box_geometry() -> None:
    box = Box(10, 20, 30, 40)
    assert box.contains(10, 20) and box.contains(29.9, 39.5)
    assert not box.contains(30, 25) and not box.contains(15, 40) and not box.contains(9.9, 25)
    assert box.center == (19, 29) and box.contains(*box.center)
    assert box.as_list() == [10, 20, 30, 40]


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_screen(kind: str) -> None:
    first, second = generate(kind, 11), generate(kind, 11)
    assert first.kind == second.kind == kind
    assert first.image.mode == "RGB"
    assert first.image.tobytes() == second.image.tobytes()
    assert json.dumps(first.truth, sort_keys=True) == json.dumps(second.truth, sort_keys=True)


def test_unknown_kind_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="spreadsheet.*calendar.*claim-window.*provider-select.*chandra-ocr"):
        generate("spreadsheet", 0)


@pytest.mark.parametrize("kind", KINDS)
def test_seeds_vary_images_sizes_and_layouts(kind: str, screens: dict) -> None:
    samples = screens[kind]
    digests = {hashlib.sha256(screen.image.tobytes()).hexdigest() for screen in samples}
    sizes = {screen.image.size for screen in samples}
    assert len(digests) == len(samples)
    assert len(sizes) >= 15
    for width, height in sizes:
        assert 440 <= width <= 800 and 360 <= height <= 660
    assert any(width < height for width, height in sizes) or kind == "calendar"
    if "layout" in samples[0].truth:
        assert len({screen.truth["layout"] for screen in samples}) >= 3


def test_calendar_truth_matches_pixels(screens: dict) -> None:
    for screen in screens["calendar"]:
        truth, image = screen.truth, screen.image
        days = truth["days"]
        assert [day["day"] for day in days] == list(range(1, len(days) + 1))
        assert 28 <= len(days) <= 31 and 1 <= truth["month"] <= 12
        boxes = [day["box"] for day in days] + [slot["box"] for slot in truth["time_slots"]]
        assert all(_inside(box, image) for box in boxes)
        assert _disjoint(boxes)
        accent = truth["highlight_color"]
        highlighted = _pixels(days[truth["highlighted_day"] - 1]["box"], image)
        accent_count = _near(highlighted, accent, 40)
        assert accent_count.sum() >= 30
        assert all(_near(_pixels(day["box"], image), accent, 40).sum() < accent_count.sum()
                   for day in days if day["day"] != truth["highlighted_day"])
        # The number is drawn inside the highlight: pixels far from its colour, with it on all four sides.
        left = np.maximum.accumulate(accent_count, axis=1)
        right = np.maximum.accumulate(accent_count[:, ::-1], axis=1)[:, ::-1]
        above = np.maximum.accumulate(accent_count, axis=0)
        below = np.maximum.accumulate(accent_count[::-1], axis=0)[::-1]
        digit = ~_near(highlighted, accent, 90) & left & right & above & below
        assert digit.sum() >= 4
        for slot in truth["time_slots"]:
            assert slot["label"][0].isdigit() and _ink(_pixels(slot["box"], image)) > 10


def test_claim_truth_matches_pixels(screens: dict) -> None:
    for screen in screens["claim-window"]:
        fields, image = screen.truth["fields"], screen.image
        names = [field["name"] for field in fields]
        assert {"Claim #", "Date of service", "Amount", "Member ID", "Provider"} <= set(names)
        assert len(set(names)) == len(names)
        boxes = [field["box"] for field in fields] + [button["box"] for button in screen.truth["buttons"]]
        assert all(_inside(box, image) for box in boxes)
        assert _disjoint(boxes)
        for field in fields:
            assert field["value"].strip() == field["value"] and field["value"]
            assert _ink(_pixels(Box(*field["box"]).inset(3).as_list(), image)) > 15
        assert screen.truth["buttons"]


def test_provider_truth_matches_pixels(screens: dict) -> None:
    for screen in screens["provider-select"]:
        truth, image = screen.truth, screen.image
        providers = truth["providers"]
        assert len(providers) >= 2
        assert len({provider["name"] for provider in providers}) == len(providers)
        boxes = [provider["box"] for provider in providers]
        assert all(_inside(box, image) for box in boxes + [truth["search_box"]])
        assert _disjoint(boxes + [truth["search_box"]])
        assert all(_ink(_pixels(box, image)) > 30 for box in boxes)
        assert truth["layout"] in ("list", "table", "dropdown")


def test_document_markdown(screens: dict) -> None:
    for screen in screens["chandra-ocr"]:
        markdown = screen.truth["markdown"]
        title = markdown.split("\n", 1)[0]
        assert title.startswith("# ") and len(title) > 4
        assert len(markdown) > len(title) + 20
        assert "\n\n\n" not in markdown and markdown == markdown.strip()
        assert _ink(np.asarray(screen.image, dtype=np.int16)) > 500


def test_contact_sheet_has_a_row_per_kind() -> None:
    sheet = contact_sheet(["calendar", "chandra-ocr"], per_kind=1, seed=0)
    assert sheet.mode == "RGB"
    assert sheet.height > 2 * 300 and sheet.width > 400
