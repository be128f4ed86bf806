"""Each expert's task on a generated screen (prompt, gold answer, scoring target) and its evaluator.

    example = build_example("calendar", seed=3)   # prompt "Click on March 14, 2026.", answer a click tool call
    score("calendar", reply, example.target)       # {"valid_json", "right_action", "in_box", "score"}: 0.0 or 1.0

Tasks: calendar and provider-select answer with a click tool call {"name": "click", "arguments": {"x", "y"}} in
the screenshot's pixel coordinates; claim-window with a JSON object {field name: value}; chandra-ocr with the
page's markdown. Every scorer returns a "score" in [0, 1] and never raises on whatever a model writes.

A click's target names its task, what the prompt asks for: calendar "date", "time-slot" (booking pages) or
"highlighted-day" (the deployment's default prompt); provider-select "name" or "ordinal" (first, second or last
in the list; the default prompt asks for the first). Evaluators report each task's score on its own.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image
from rapidfuzz.distance import Levenshtein

from training.screens import KINDS, Box, generate

CLAIM_PROMPT = "Extract the claim fields as JSON."
OCR_PROMPT = "Transcribe this page to markdown."
DATE_PROMPTS = ("Click on {date}.", "Select {date} in the calendar.", "Pick the date {date}.")
SLOT_PROMPTS = ("Click the {label} time slot.", "Select the {label} time slot.", "Book the {label} slot.")
PROVIDER_PROMPTS = ("Select the provider {name}.", "Click on {name}.", "Choose {name} from the providers.")
# The deployments' default prompts (configs/*.yaml) are the first of these, so an expert was trained on them.
HIGHLIGHT_PROMPTS = ("Click the highlighted day.", "Select the highlighted day.", "Click on the highlighted date.")
ORDINAL_PROMPTS = ("Select the {ordinal} provider in the list.", "Click the {ordinal} provider.",
                   "Choose the {ordinal} provider from the list.")
# Where each ordinal a prompt may name sits in the list (a Python index).
ORDINALS = {"first": 0, "second": 1, "last": -1}


@dataclass
class Example:
    """A screenshot, the expert's prompt and gold answer, and the target its scorer needs (JSON-serialisable)."""

    kind: str
    image: Image.Image
    prompt: str
    answer: str
    target: dict
    family: str | None = None  # the screen's style family; None: today's mix of looks


def compact_json(value: Any) -> str:
    """JSON without spaces (short to tokenize); non-ASCII kept as is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def click_call(x: int, y: int) -> str:
    """The click tool call the grounding experts answer with."""
    return compact_json({"name": "click", "arguments": {"x": x, "y": y}})


def clickable(items: list[dict], covered: list[Box]) -> list[dict]:
    """The items (ground-truth entries with a "box") an overlay box does not hide: those it does not touch, else
    those whose centre (the gold click) it leaves in sight, else all of them."""
    boxes = [(item, Box(*item["box"])) for item in items]
    for hidden in (lambda box, cover: box.intersects(cover), lambda box, cover: cover.contains(*box.center)):
        shown = [item for item, box in boxes if not any(hidden(box, cover) for cover in covered)]
        if shown:
            return shown
    return items


def _click_example(kind: str, image: Image.Image, prompt: str, box: list[int], task: str, region: list[dict],
                   family: str | None) -> Example:
    """A click on box; the target keeps the task's name and its region: the box around every item the prompt could
    have asked for (all days, all slots, all providers)."""
    boxes = [Box(*item["box"]) for item in region]
    around = [min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes)]
    return Example(kind, image, prompt, click_call(*Box(*box).center),
                   {"action": "click", "box": box, "task": task, "region": around}, family)


def build_example(kind: str, seed: int, family: str | None = None) -> Example:
    """generate(kind, seed, family) and a task on it drawn deterministically from the same seed. A click targets
    a day, slot or provider that a family's overlays (windows drawn on top) leave in sight (clickable())."""
    screen = generate(kind, seed, family)
    rng = random.Random(f"task:{kind}:{seed}")
    truth = screen.truth
    covered = [Box(*box) for box in truth.get("overlays", ())]
    if kind == "calendar":
        slots = truth["time_slots"] and clickable(truth["time_slots"], covered)
        days = clickable(truth["days"], covered)
        highlighted = [day for day in days if day["day"] == truth["highlighted_day"]]
        roll = rng.random()
        if slots and roll < 0.3:
            task, item, region = "time-slot", rng.choice(slots), truth["time_slots"]
            prompt = rng.choice(SLOT_PROMPTS).format(label=item["label"])
        elif highlighted and roll >= 0.65:
            task, item, region = "highlighted-day", highlighted[0], truth["days"]
            prompt = rng.choice(HIGHLIGHT_PROMPTS)
        else:
            task, item, region = "date", rng.choice(days), truth["days"]
            prompt = rng.choice(DATE_PROMPTS).format(date=f"{truth['month_name']} {item['day']}, {truth['year']}")
        return _click_example(kind, screen.image, prompt, item["box"], task, region, family)
    if kind == "provider-select":
        providers = clickable(truth["providers"], covered)
        ordinal = rng.choice(tuple(ORDINALS))
        listed, index = truth["providers"], ORDINALS[ordinal]
        if rng.random() < 0.4 and index < len(listed) and listed[index] in providers:
            task, item = "ordinal", listed[index]
            prompt = rng.choice(ORDINAL_PROMPTS).format(ordinal=ordinal)
        else:
            task, item = "name", rng.choice(providers)
            prompt = rng.choice(PROVIDER_PROMPTS).format(name=item["name"])
        return _click_example(kind, screen.image, prompt, item["box"], task, truth["providers"], family)
    if kind == "claim-window":
        fields = {field["name"]: field["value"] for field in truth["fields"]}
        return Example(kind, screen.image, CLAIM_PROMPT, compact_json(fields), {"fields": fields}, family)
    return Example(kind, screen.image, OCR_PROMPT, truth["markdown"], {"markdown": truth["markdown"]}, family)


def _first_json_object(text: str) -> dict | None:
    """The first JSON object in text (bare, in a code fence or between tags), or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def parse_tool_call(text: str) -> dict | None:
    """The first tool call in a model's reply as {"name": str, "arguments": dict}, or None.

    Accepts bare JSON, JSON wrapped in <tool_call>...</tool_call> or a code fence, and arguments given as a
    JSON-encoded string (as OpenAI-style APIs return them).
    """
    if not isinstance(text, str):
        return None
    call = _first_json_object(text)
    if call is None or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _first_json_object(arguments)
    if not isinstance(arguments, dict):
        return None
    return {"name": call["name"], "arguments": arguments}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _score_click(answer: str, target: dict) -> dict[str, float]:
    call = parse_tool_call(answer)
    right_action = call is not None and call["name"] == target["action"]
    x, y = (call["arguments"].get("x"), call["arguments"].get("y")) if call else (None, None)
    point = right_action and _is_number(x) and _is_number(y)
    in_box = point and Box(*target["box"]).contains(x, y)
    metrics = {"valid_json": float(call is not None), "right_action": float(right_action), "in_box": float(in_box),
               "score": float(in_box)}
    if "region" in target:
        metrics["in_region"] = float(point and Box(*target["region"]).contains(x, y))
    return metrics


def _score_fields(answer: str, target: dict) -> dict[str, float]:
    fields = target["fields"]
    predicted = _first_json_object(answer) if isinstance(answer, str) else None
    correct = 0
    if predicted is not None:
        correct = sum(isinstance(predicted.get(name), str) and predicted[name].strip() == value
                      for name, value in fields.items())
    accuracy = correct / max(1, len(fields))
    return {"valid_json": float(predicted is not None), "field_accuracy": accuracy, "score": accuracy}


def _score_markdown(answer: str, target: dict) -> dict[str, float]:
    reference = target["markdown"]
    hypothesis = answer.strip() if isinstance(answer, str) else ""
    cer = Levenshtein.distance(hypothesis, reference) / max(1, len(reference))
    return {"cer": cer, "score": max(0.0, 1.0 - cer)}


def score(kind: str, answer: str, target: dict) -> dict[str, float]:
    """Metrics of a model's answer against an example's target; always includes "score" in [0, 1].

    calendar / provider-select: valid_json, right_action, in_box (score = in_box), and in_region when the target
    has a region (the click found the calendar or the list, if not the item). claim-window: valid_json,
    field_accuracy (fraction of fields whose value matches exactly, surrounding whitespace aside; score =
    field_accuracy). chandra-ocr: cer (Levenshtein distance / reference length; score = max(0, 1 - cer)).
    """
    if kind in ("calendar", "provider-select"):
        return _score_click(answer, target)
    if kind == "claim-window":
        return _score_fields(answer, target)
    if kind == "chandra-ocr":
        return _score_markdown(answer, target)
    raise ValueError(f"unknown task kind {kind!r}; known kinds: {', '.join(KINDS)}")
