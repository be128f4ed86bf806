"""training.captures: labelled captures to a routing dataset the converter and the generator take, merged with base
data; Label Studio tasks out and labels back in."""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path

import pytest

from lora_router.capture import CaptureItem, CaptureStore, held_out
from lora_router.configuration import CommandError
from lora_router.jsonl import read_jsonl
from training.captures import import_labels, label_studio_tasks, main
from training.convert_routing_to_classification import convert_dataset
from training.generate_dataset import read_user_dataset
from training.tasks import build_example

CLASSES = ["calendar", "claim-window", "provider-select"]


@functools.cache
def _png(kind: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    build_example(kind, seed).image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path) -> CaptureStore:
    """40 captures routed to calendar: 30 labelled (10 per class, by feedback or review), 10 not."""
    store = CaptureStore(tmp_path / "captures", max_items=1000, max_age_s=1e11, max_bytes=1 << 30)
    for n in range(40):
        label = CLASSES[n % 3] if n < 30 else None
        png = _png(label or "calendar", n % 3)
        store.add(CaptureItem(id=f"r{n:02d}", captured_at=1e9 + n, router="router@1", expert="calendar",
                              confidence=0.9, probabilities={"calendar": 0.9}, fallback=None, reasons=["feedback"],
                              size=len(png), label=label), png)
    return store


def test_export_writes_a_routing_dataset_the_converter_takes_with_a_stable_held_out_split(store, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", "--store", str(store.folder), "--out", str(out), "--eval_fraction", "0.3"]) == 0
    train, evaluation = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert len(train) + len(evaluation) == 30  # the unlabelled ten are left out
    assert {line["id"] for line in evaluation} == {f"captured-r{n:02d}" for n in range(30) if held_out(f"r{n:02d}", 0.3)}
    assert 0 < len(evaluation) < 30
    line = train[0]
    assert line["label"] == CLASSES.index(line["adapter"]) and line["metadata"]["family"] == "captured"
    assert (out / line["image"]).read_bytes() == store.png(store.get(line["id"].removeprefix("captured-")))
    assert convert_dataset(out)  # the router's training data, as from a generated dataset
    assert json.loads((out / "dataset.json").read_text())["classes"] == CLASSES
    # Each label's captures as an expert dataset folder for training.generate_dataset --<label>-dataset.
    assert len(read_user_dataset(out / "classes" / "claim-window")) == 10


def _base(tmp_path: Path) -> Path:
    """A base routing dataset: 4 training lines (calendar twice), 2 eval lines."""
    base = tmp_path / "base"
    (base / "images").mkdir(parents=True)
    lines = []
    for n, kind in enumerate(CLASSES * 2):
        (base / "images" / f"b{n}.png").write_bytes(_png(kind, 3))
        lines.append({"id": f"b{n}", "image": f"images/b{n}.png", "adapter": kind, "label": CLASSES.index(kind),
                      "metadata": {"task_type": kind}})
    (base / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[:4]))
    (base / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines[4:]))
    (base / "dataset.json").write_text(json.dumps({"classes": CLASSES}))
    return base


def test_export_merged_with_base_data_repeats_the_captured_training_lines(store, tmp_path):
    base = _base(tmp_path)
    out = tmp_path / "merged"
    main(["export", "--store", str(store.folder), "--out", str(out), "--base", str(base), "--weight", "3"])
    train, evaluation = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    captured_train = [line for line in train if line["metadata"].get("family") == "captured"]
    assert [line["id"] for line in train[:4]] == ["b0", "b1", "b2", "b3"]
    assert len(captured_train) == 3 * len({line["id"] for line in captured_train})
    assert [line["id"] for line in evaluation[:2]] == ["b4", "b5"]
    assert convert_dataset(out)["train"]  # base images resolve from the merged folder


def test_export_with_replay_keeps_a_seeded_sample_of_the_base_per_class(store, tmp_path):
    base = _base(tmp_path)
    kept = []
    for run in ("a", "b"):
        out = tmp_path / f"replay-{run}"
        assert main(["export", "--store", str(store.folder), "--out", str(out), "--base", str(base), "--weight", "2",
                     "--replay", "1"]) == 0
        train = read_jsonl(out / "train.jsonl")
        kept.append([line["id"] for line in train if line["metadata"].get("family") != "captured"])
        captured = [line for line in train if line["metadata"].get("family") == "captured"]
        assert len(captured) == 2 * len({line["id"] for line in captured})  # the captures all kept
        assert json.loads((out / "dataset.json").read_text())["base_train"] == 3
    assert kept[0] == kept[1]  # the same sample every time
    assert len(kept[0]) == 3 and {"b1", "b2"} < set(kept[0]) <= {"b0", "b1", "b2", "b3"}  # one line per class
    assert len(read_jsonl(tmp_path / "replay-a" / "eval.jsonl")) >= 2  # every base eval line


@pytest.mark.parametrize("argv, message", [
    (["export", "--classes", "calendar,claim-window"], "labelled provider-select, which the classes"),
    (["export"], "needs --out"),
    (["import-labels"], "needs --tasks"),
    (["export", "--eval_fraction", "1"], "eval_fraction must be in [0, 1)"),
    (["export", "--replay", "5"], "replay must be >= 0 and needs --base"),
])
def test_bad_exports_are_refused_naming_the_problem(store, tmp_path, capsys, argv, message):
    out = [] if "needs --out" in message else ["--out", str(tmp_path / "x")]
    try:
        code = main([*argv, "--store", str(store.folder), *out])
    except SystemExit as exit:  # refused while parsing the flags
        code = exit.code
    assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_label_studio_tasks_carry_the_route_and_labels_come_back(store, tmp_path):
    tasks = label_studio_tasks(store)
    assert len(tasks) == 40
    unlabelled = next(t for t in tasks if t["data"]["capture_id"] == "r35")
    assert "annotations" not in unlabelled
    assert unlabelled["predictions"][0]["result"][0]["value"]["choices"] == ["calendar"]
    png = base64.b64decode(unlabelled["data"]["image"].partition(",")[2])
    assert png == store.png(store.get("r35"))
    # A reviewer in Label Studio labels it; its export comes back.
    unlabelled["annotations"] = [{"result": [{"from_name": "expert", "to_name": "image", "type": "choices",
                                              "value": {"choices": ["provider-select"]}}]}]
    assert import_labels(store, [unlabelled]) == {"r35": "provider-select"}
    assert store.get("r35").label == "provider-select"


def test_labels_for_captures_not_in_the_store_change_nothing(store):
    tasks = label_studio_tasks(store)[:2]
    tasks[1]["data"]["capture_id"] = "gone"
    tasks[1]["annotations"] = tasks[0]["annotations"] = [{"result": [{
        "from_name": "expert", "to_name": "image", "type": "choices", "value": {"choices": ["provider-select"]}}]}]
    with pytest.raises(CommandError, match="gone"):
        import_labels(store, tasks)
    assert store.get(tasks[0]["data"]["capture_id"]).label == "calendar"  # r00 as it was


def test_the_learning_curve_s_captures_interleave_the_classes_in_the_family(tmp_path):
    from benchmarks.learning_curve import captured_store, first_captures

    captured_store(tmp_path / "all", CLASSES, "classic", per_class=2, max_pixels=None)
    first = first_captures(tmp_path / "all", tmp_path / "first", 3)
    assert [i.label for i in first.items().values()] == CLASSES  # one of each: k captures are k/3 per class
    everything = CaptureStore(tmp_path / "all", max_items=10, max_age_s=1e11, max_bytes=1 << 30)
    assert len(everything.items()) == 6 and all(i.reasons == ["feedback"] for i in everything.items().values())
