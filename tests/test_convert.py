"""The routing -> classification converter: exact lines, counts, label sources, and refusals of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_router.jsonl import read_jsonl
from training.convert_routing_to_classification import ConversionError, convert_dataset, main

CLASSES = ["calendar", "claim-window", "provider-select", "chandra-ocr"]
SYSTEM_4 = (
    "You are a routing classifier for a multi-adapter system. "
    "Given a screenshot, identify which LoRA adapter should handle it. "
    "Respond with only the adapter name: calendar, claim-window, provider-select, or chandra-ocr."
)
USER = "<image>\nWhich adapter should handle this screenshot?"


def routing_line(name: str, n: int, task_type: str | None = None) -> dict:
    """A routing line as the generator writes it (the expert sample plus adapter, label, metadata)."""
    return {
        "id": f"{name}_{n:05d}",
        "image": f"images/{name}_{n:05d}.jpg",
        "conversations": [{"from": "human", "value": "<image>\nexpert prompt"}, {"from": "gpt", "value": "x"}],
        "adapter": name,
        "label": CLASSES.index(name) if name in CLASSES else -1,
        "metadata": {"task_type": task_type or name, "target": {}},
    }


def write_jsonl(path: Path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def make_dataset(root: Path, train: list, eval_: list, classes: list[str] | None = CLASSES) -> Path:
    """A routing dataset folder: the lines given, an image file for every parsable line, dataset.json if classes."""
    (root / "images").mkdir(parents=True)
    for line in [*train, *eval_]:
        if isinstance(line, dict) and "image" in line:
            (root / line["image"]).write_bytes(b"jpeg")
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "eval.jsonl", eval_)
    if classes is not None:
        (root / "dataset.json").write_text(json.dumps({"classes": classes}))
    return root


def test_exact_output_and_counts(tmp_path, capsys):
    train = [routing_line("claim-window", 447), routing_line("chandra-ocr", 3, task_type="ocr"),
             routing_line("claim-window", 2)]
    eval_ = [routing_line("calendar", 9)]
    root = make_dataset(tmp_path / "ds", train, eval_)
    originals = {name: (root / name).read_text() for name in ("train.jsonl", "eval.jsonl")}

    assert main([str(root)]) == 0

    assert read_jsonl(root / "train-classification.jsonl")[:2] == [
        {
            "id": "claim-window_00447",
            "image": "images/claim-window_00447.jpg",
            "conversations": [
                {"from": "system", "value": SYSTEM_4},
                {"from": "human", "value": USER},
                {"from": "gpt", "value": "claim-window"},
            ],
            "metadata": {"task_type": "routing_classification", "original_task": "claim-window", "label": 1},
        },
        {
            "id": "chandra-ocr_00003",
            "image": "images/chandra-ocr_00003.jpg",
            "conversations": [
                {"from": "system", "value": SYSTEM_4},
                {"from": "human", "value": USER},
                {"from": "gpt", "value": "chandra-ocr"},
            ],
            "metadata": {"task_type": "routing_classification", "original_task": "ocr", "label": 3},
        },
    ]
    [eval_line] = read_jsonl(root / "eval-classification.jsonl")
    assert eval_line["conversations"][2] == {"from": "gpt", "value": "calendar"}
    assert eval_line["metadata"]["label"] == 0
    assert {name: (root / name).read_text() for name in originals} == originals

    table = capsys.readouterr().out
    assert "claim-window" in table and "chandra-ocr" in table
    assert convert_dataset(root) == {
        "train": {"calendar": 0, "claim-window": 2, "provider-select": 0, "chandra-ocr": 1},
        "eval": {"calendar": 1, "claim-window": 0, "provider-select": 0, "chandra-ocr": 0},
    }


@pytest.mark.parametrize(("classes_arg", "expected"), [
    (None, ["calendar", "provider-select"]),  # sorted adapters of train.jsonl
    ("provider-select,calendar,claim-window", ["provider-select", "calendar", "claim-window"]),
])
def test_labels_without_dataset_json(tmp_path, classes_arg, expected):
    root = make_dataset(tmp_path / "ds", [routing_line("provider-select", 1), routing_line("calendar", 2)], [],
                        classes=None)
    counts = convert_dataset(root, classes_arg.split(",") if classes_arg else None)
    assert list(counts["train"]) == expected
    first = read_jsonl(root / "train-classification.jsonl")[0]
    assert first["metadata"]["label"] == expected.index("provider-select")
    assert first["conversations"][0]["value"].endswith(
        "Respond with only the adapter name: " + ", ".join(expected[:-1]) + f", or {expected[-1]}.")


def test_classes_must_agree_with_dataset_json(tmp_path):
    root = make_dataset(tmp_path / "ds", [routing_line("calendar", 1)], [])
    with pytest.raises(ConversionError, match="differs from .*dataset.json"):
        convert_dataset(root, ["calendar", "claim-window"])


def _missing_image(root: Path) -> None:
    (root / "images" / "calendar_00003.jpg").unlink()


# (case, bad train line 3 or a setup on a dataset of three good train lines, expected message after FILE:)
BAD_INPUTS = [
    ("missing image", _missing_image, "train.jsonl:3: image file not found: "),
    ("malformed JSON", '{"id": "calendar_00009", ', "train.jsonl:3: malformed JSON"),
    ("not an object", "[1, 2]", "train.jsonl:3: expected a JSON object"),
    ("missing id", {k: v for k, v in routing_line("calendar", 9).items() if k != "id"},
     "train.jsonl:3: missing or non-string field 'id'"),
    ("missing image field", {k: v for k, v in routing_line("calendar", 9).items() if k != "image"},
     "train.jsonl:3: missing or non-string field 'image'"),
    ("missing adapter", {k: v for k, v in routing_line("calendar", 9).items() if k != "adapter"},
     "train.jsonl:3: missing or non-string field 'adapter'"),
    ("unknown class", routing_line("weather", 9), "train.jsonl:3: unknown class 'weather'"),
]


@pytest.mark.parametrize(("case", "line_or_setup", "expected"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_refused_and_nothing_written(tmp_path, capsys, case, line_or_setup, expected):
    train = [routing_line("claim-window", 1), routing_line("calendar", 2)]
    train.append(routing_line("calendar", 3) if callable(line_or_setup) else line_or_setup)
    root = make_dataset(tmp_path / "ds", train, [routing_line("calendar", 4)])
    if callable(line_or_setup):
        line_or_setup(root)
    before = sorted(p.name for p in root.iterdir())

    assert main([str(root)]) == 1

    err = capsys.readouterr().err
    assert f"{root / 'train.jsonl'}:" in err and expected in err
    assert "Traceback" not in err
    assert sorted(p.name for p in root.iterdir()) == before


def test_bad_eval_line_leaves_train_unwritten(tmp_path):
    root = make_dataset(tmp_path / "ds", [routing_line("calendar", 1)],
                        [routing_line("calendar", 2), routing_line("weather", 3)])
    with pytest.raises(ConversionError, match=r"eval\.jsonl:2: unknown class 'weather'"):
        convert_dataset(root)
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "eval.jsonl", "images", "train.jsonl"]
