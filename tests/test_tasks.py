"""Expert tasks and scorers, and the expert dataset writer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from PIL import Image

from lora_router.jsonl import read_jsonl
from training.evaluate_expert import format_report, mean_scores, scores_by_task
from training.expert_datasets import main, sample_seed, score_file, write_examples
from training.screens import KINDS, Box, generate
from training.tasks import HIGHLIGHT_PROMPTS, ORDINALS, build_example, click_call, parse_tool_call, score

CLICK = {"action": "click", "box": [100, 50, 200, 80]}
CLAIM = {"fields": {"Claim #": "CLM-104233", "Amount": "$1,234.50", "Member ID": "MBR-884213", "Provider": "Dr. Li"}}
PAGE = {"markdown": "# Title\n\nSome text."}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_gold_answers_score_one(kind: str, seed: int) -> None:
    example = build_example(kind, seed)
    assert example.kind == kind and example.prompt and example.answer
    json.dumps(example.target)
    assert score(kind, example.answer, example.target)["score"] == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_build_example_is_deterministic(kind: str) -> None:
    first, second = build_example(kind, 9), build_example(kind, 9)
    assert (first.prompt, first.answer, first.target) == (second.prompt, second.answer, second.target)
    assert first.image.tobytes() == second.image.tobytes()


@pytest.mark.parametrize("kind", ["calendar", "provider-select"])
def test_click_targets_are_not_hidden_by_an_overlay(kind: str) -> None:
    # Unfiltered, a third of classic calendars and half of its provider lists put the target under a window.
    untouched = 0
    for seed in range(40):
        example = build_example(kind, seed, "classic")
        overlays = [Box(*box) for box in generate(kind, seed, "classic").truth["overlays"]]
        target = Box(*example.target["box"])
        assert overlays and not any(box.contains(*target.center) for box in overlays)
        untouched += not any(target.intersects(box) for box in overlays)
    assert untouched >= 30


@pytest.mark.parametrize(("x", "y", "expected"), [(150, 60, (1, 1)), (20, 20, (0, 1)), (5, 5, (0, 0))])
def test_a_click_in_the_region_but_not_the_box(x: int, y: int, expected: tuple[int, int]) -> None:
    metrics = score("calendar", click_call(x, y), {**CLICK, "region": [10, 10, 300, 200]})
    assert (metrics["in_box"], metrics["in_region"]) == expected and metrics["score"] == expected[0]
    assert "in_region" not in score("calendar", click_call(x, y), CLICK)


@pytest.mark.parametrize(("a", "b", "expected"), [
    ((0, 0, 10, 10), (9, 9, 20, 20), True), ((0, 0, 10, 10), (10, 0, 20, 10), False),
    ((0, 0, 10, 10), (2, 2, 4, 4), True), ((0, 0, 10, 10), (0, 10, 10, 20), False)])
def test_box_intersects(a, b, expected: bool) -> None:
    assert Box(*a).intersects(Box(*b)) is expected and Box(*b).intersects(Box(*a)) is expected


def test_each_click_task_targets_what_its_prompt_asks() -> None:
    seen = set()
    for kind in ("calendar", "provider-select"):
        for seed in range(60):
            example, truth = build_example(kind, seed), generate(kind, seed).truth
            task, box = example.target["task"], example.target["box"]
            assert Box(*example.target["region"]).contains(*Box(*box).center)
            seen.add((kind, task))
            if task == "highlighted-day":
                assert example.prompt in HIGHLIGHT_PROMPTS
                assert box == next(d["box"] for d in truth["days"] if d["day"] == truth["highlighted_day"])
            elif task == "date":
                day = next(d for d in truth["days"] if d["box"] == box)
                assert f"{truth['month_name']} {day['day']}, {truth['year']}" in example.prompt
            elif task == "time-slot":
                assert next(s["label"] for s in truth["time_slots"] if s["box"] == box) in example.prompt
            elif task == "ordinal":
                ordinal = next(o for o in ORDINALS if f" {o} provider" in example.prompt)
                assert box == truth["providers"][ORDINALS[ordinal]]["box"]
            else:
                assert task == "name"
                assert next(p["name"] for p in truth["providers"] if p["box"] == box) in example.prompt
    assert seen == {("calendar", "date"), ("calendar", "time-slot"), ("calendar", "highlighted-day"),
                    ("provider-select", "name"), ("provider-select", "ordinal")}


def test_the_deployments_default_prompts_are_trained_tasks() -> None:
    defaults = {(expert["name"], expert["prompt"]) for path in CONFIGS.glob("*.yaml")
                for expert in yaml.safe_load(path.read_text())["experts"]}
    assert len(defaults) >= 3
    for kind, prompt in defaults:
        assert any(build_example(kind, seed).prompt == prompt for seed in range(300)), (kind, prompt)


def test_prompts() -> None:
    prompts = [build_example("calendar", seed).prompt for seed in range(40)]
    assert any(prompt.endswith(("time slot.", " slot.")) for prompt in prompts)
    assert any(re.fullmatch(r"Click on [A-Z][a-z]+ \d{1,2}, 20\d\d\.", prompt) for prompt in prompts)
    assert build_example("claim-window", 0).prompt == "Extract the claim fields as JSON."
    assert build_example("chandra-ocr", 0).prompt == "Transcribe this page to markdown."
    answer = build_example("provider-select", 0).answer
    assert " " not in answer and parse_tool_call(answer)["name"] == "click"


@pytest.mark.parametrize(("case", "answer", "expected"), [
    ("perfect", '{"name":"click","arguments":{"x":150,"y":60}}', (1, 1, 1)),
    ("tool call tags", '<tool_call>\n{"name": "click", "arguments": {"x": 100, "y": 79.5}}\n</tool_call>', (1, 1, 1)),
    ("arguments as string", '{"name": "click", "arguments": "{\\"x\\": 150, \\"y\\": 60}"}', (1, 1, 1)),
    ("prose around", 'Sure! {"name": "click", "arguments": {"x": 150, "y": 60}} done', (1, 1, 1)),
    ("outside right edge", '{"name":"click","arguments":{"x":200,"y":60}}', (1, 1, 0)),
    ("outside below", '{"name":"click","arguments":{"x":150,"y":95}}', (1, 1, 0)),
    ("wrong action", '{"name":"type","arguments":{"x":150,"y":60}}', (1, 0, 0)),
    ("string coordinates", '{"name":"click","arguments":{"x":"150","y":"60"}}', (1, 1, 0)),
    ("boolean coordinates", '{"name":"click","arguments":{"x":true,"y":true}}', (1, 1, 0)),
    ("missing coordinates", '{"name":"click","arguments":{}}', (1, 1, 0)),
    ("no name", '{"arguments":{"x":150,"y":60}}', (0, 0, 0)),
    ("invalid json", '{"name": "click", "arguments": {"x": 150', (0, 0, 0)),
    ("garbage", "I would click the date.", (0, 0, 0)),
    ("empty", "", (0, 0, 0)),
    ("json list", "[150, 60]", (0, 0, 0)),
    ("deep nesting", "{" * 5000, (0, 0, 0)),
    ("not a string", None, (0, 0, 0)),
])
def test_click_scorer(case: str, answer, expected: tuple[int, int, int]) -> None:
    for kind in ("calendar", "provider-select"):
        metrics = score(kind, answer, CLICK)
        assert (metrics["valid_json"], metrics["right_action"], metrics["in_box"]) == expected, case
        assert metrics["score"] == expected[2]


@pytest.mark.parametrize(("case", "answer", "expected"), [
    ("perfect", json.dumps(CLAIM["fields"]), (1, 1.0)),
    ("fenced, other order, extra key",
     '```json\n{"Provider": "Dr. Li", "Member ID": "MBR-884213", "Amount": "$1,234.50", "Claim #": "CLM-104233",'
     ' "Status": "Paid"}\n```', (1, 1.0)),
    ("surrounding whitespace", '{"Claim #": " CLM-104233 ", "Amount": "$1,234.50", "Member ID": "MBR-884213",'
     ' "Provider": "Dr. Li"}', (1, 1.0)),
    ("half right", '{"Claim #": "CLM-104233", "Amount": "1234.50", "Member ID": "MBR-884213"}', (1, 0.5)),
    ("number instead of text", '{"Claim #": 104233}', (1, 0.0)),
    ("wrong case", '{"claim #": "CLM-104233"}', (1, 0.0)),
    ("invalid json", '{"Claim #": "CLM-104233", "Amount"', (0, 0.0)),
    ("json list", '["CLM-104233"]', (0, 0.0)),
    ("garbage", "The claim number is CLM-104233.", (0, 0.0)),
    ("not a string", 42, (0, 0.0)),
])
def test_claim_scorer(case: str, answer, expected: tuple[int, float]) -> None:
    metrics = score("claim-window", answer, CLAIM)
    assert (metrics["valid_json"], metrics["field_accuracy"]) == expected, case
    assert metrics["score"] == expected[1]


@pytest.mark.parametrize(("case", "answer", "cer", "value"), [
    ("perfect", "# Title\n\nSome text.", 0.0, 1.0),
    ("trailing newline", "# Title\n\nSome text.\n", 0.0, 1.0),
    ("one character off", "# Title\n\nSome text!", 1 / 19, 18 / 19),
    ("empty", "", 1.0, 0.0),
    ("long garbage", "z" * 100, 100 / 19, 0.0),
    ("not a string", None, 1.0, 0.0),
])
def test_markdown_scorer(case: str, answer, cer: float, value: float) -> None:
    metrics = score("chandra-ocr", answer, PAGE)
    assert metrics["cer"] == pytest.approx(cer), case
    assert metrics["score"] == pytest.approx(value), case


def test_score_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="spreadsheet"):
        score("spreadsheet", "", {})


@pytest.mark.parametrize(("text", "expected"), [
    ('{"name":"click","arguments":{"x":1,"y":2}}', {"name": "click", "arguments": {"x": 1, "y": 2}}),
    ('<tool_call>{"name": "select_provider", "arguments": {"name": "Dr. Li"}}</tool_call>',
     {"name": "select_provider", "arguments": {"name": "Dr. Li"}}),
    ('{"name": "click"}', {"name": "click", "arguments": {}}),
    ('{"name": "click", "arguments": [1, 2]}', None),
    ('{"name": 3, "arguments": {}}', None),
    ("click(1, 2)", None),
])
def test_parse_tool_call(text: str, expected) -> None:
    assert parse_tool_call(text) == expected


def test_sample_seeds_never_repeat_across_splits() -> None:
    train = {sample_seed(0, "train", index) for index in range(5000)}
    evaluation = {sample_seed(0, "eval", index) for index in range(5000)}
    assert len(train) == len(evaluation) == 5000 and not train & evaluation
    assert sample_seed(0, "train", 0) != sample_seed(1, "train", 0)


def test_cli_writes_datasets(tmp_path: Path) -> None:
    out = tmp_path / "calendar"
    assert main(["--kind", "calendar", "--train", "3", "--eval", "2", "--seed", "5", "--output", str(out)]) == 0
    train, evaluation = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert (len(train), len(evaluation)) == (3, 2)
    records = train + evaluation
    assert [record["id"] for record in records] == [f"calendar_{i:05d}" for i in range(5)]
    assert not {record["metadata"]["seed"] for record in train} & {record["metadata"]["seed"] for record in evaluation}
    assert len(list((out / "images").iterdir())) == 5
    for record in records:
        assert record["image"] == f"images/{record['id']}.jpg"
        with Image.open(out / record["image"]) as image:
            assert image.format == "JPEG"
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and parse_tool_call(gpt["value"])["name"] == "click"
        assert record["adapter"] == record["metadata"]["task_type"] == "calendar"
        assert set(record["metadata"]["target"]) == {"action", "box", "task", "region"}

    gold = {record["id"]: record["conversations"][1]["value"] for record in evaluation}
    assert score_file(out / "eval.jsonl", gold) == {"count": 2, "missing": 0, "valid_json": 1.0,
                                                    "right_action": 1.0, "in_box": 1.0, "in_region": 1.0, "score": 1.0}
    half = score_file(out / "eval.jsonl", {evaluation[0]["id"]: gold[evaluation[0]["id"]]})
    assert half["missing"] == 1 and half["score"] == 0.5


def test_write_examples_numbers_from_start(tmp_path: Path) -> None:
    records = write_examples("chandra-ocr", "router", 2, seed=3, out_dir=tmp_path, start=7, progress=False)
    assert [record["id"] for record in records] == ["chandra-ocr_00007", "chandra-ocr_00008"]
    assert all((tmp_path / record["image"]).is_file() for record in records)
    assert records[0]["conversations"][1]["value"].startswith("# ")


def test_expert_scores_by_task() -> None:
    def line(task: str | None):
        return SimpleNamespace(metadata={"task_type": "calendar", "target": {**CLICK, **({"task": task} if task else {})}})

    hit, miss = '{"name":"click","arguments":{"x":150,"y":60}}', '{"name":"click","arguments":{"x":5,"y":5}}'
    lines, answers = [line("date"), line("date"), line("highlighted-day")], [hit, miss, hit]
    assert mean_scores(lines, answers)["score"] == pytest.approx(0.6667)
    by_task = scores_by_task(lines, answers)
    assert by_task == {"date": {"count": 2, "valid_json": 1.0, "right_action": 1.0, "in_box": 0.5, "score": 0.5},
                       "highlighted-day": {"count": 1, "valid_json": 1.0, "right_action": 1.0, "in_box": 1.0,
                                           "score": 1.0}}
    assert scores_by_task(lines[:2], answers[:2]) == {}
    assert scores_by_task([line(None), line(None)], [hit, miss]) == {}
    report = {"task": "calendar", "count": 3, "data": "eval.jsonl", "score_gain": 0.6667,
              "base": {"score": 0.0}, "adapter_scores": {"score": 0.6667},
              "by_task": {task: {"count": s["count"], "base": {"score": 0.0}, "adapter": s} for task, s in by_task.items()}}
    text = format_report(report)
    assert re.search(r"score date\s+0\.0000\s+0\.5000\s+\(2 lines\)", text)
    assert re.search(r"score highlighted-day\s+0\.0000\s+1\.0000\s+\(1 lines\)", text)
