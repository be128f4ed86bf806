"""The routing-dataset generator: counts per class and split, line format, determinism, user datasets, flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lora_router.jsonl import read_jsonl
from training.generate_dataset import RoutingDatasetConfig, main, parse_config

# N per class with --train-val-split 0.5 and --eval-images 1: train keeps floor(N/2), eval gets the rest + 1.
SMALL = {"calendar": 4, "claim-window": 3, "provider-select": 2, "chandra-ocr": 1}
EXPECTED = {"calendar": (2, 3), "claim-window": (1, 3), "provider-select": (1, 2), "chandra-ocr": (0, 2)}


def small_argv(out: Path) -> list[str]:
    argv = [arg for name, n in SMALL.items() for arg in (f"--train-images-{name}", str(n))]
    return [*argv, "--eval-images", "1", "--train-val-split", "0.5", "--seed", "5", "--output", str(out)]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """One generated dataset with four classes, the 4th (chandra-ocr) added by its flag alone."""
    out = tmp_path_factory.mktemp("gen") / "routing"
    assert main(small_argv(out)) == 0
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_per_class_and_split(small, name):
    train, evaluation = read_jsonl(small / "train.jsonl"), read_jsonl(small / "eval.jsonl")
    got = (sum(line["adapter"] == name for line in train), sum(line["adapter"] == name for line in evaluation))
    assert got == EXPECTED[name]
    meta = json.loads((small / "dataset.json").read_text())
    assert (meta["counts"]["train"][name], meta["counts"]["eval"][name]) == EXPECTED[name]


def test_lines_ids_images_and_dataset_json(small):
    lines = read_jsonl(small / "train.jsonl") + read_jsonl(small / "eval.jsonl")
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)) == sum(SMALL.values()) + len(SMALL)
    classes = list(SMALL)
    for line in lines:
        name = line["adapter"]
        assert line["label"] == classes.index(name)
        assert line["metadata"]["task_type"] == name
        assert line["id"].startswith(f"{name}_") and len(line["id"]) == len(name) + 6
        assert line["image"] == f"images/{line['id']}.jpg"
        assert (small / line["image"]).is_file()
        human, gpt = line["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
    assert sorted(p.name for p in (small / "images").iterdir()) == sorted(f"{i}.jpg" for i in ids)
    meta = json.loads((small / "dataset.json").read_text())
    assert meta["classes"] == classes and meta["seed"] == 5
    assert meta["arguments"]["train_images"] == SMALL and meta["arguments"]["train_val_split"] == 0.5


def test_same_seed_same_lines(small, tmp_path):
    again = tmp_path / "again"
    assert main(small_argv(again)) == 0
    for split in ("train.jsonl", "eval.jsonl"):
        assert (again / split).read_text() == (small / split).read_text()


def test_default_classes_and_flag_precedence(tmp_path):
    assert parse_config([]).classes == ("calendar", "claim-window", "provider-select")
    assert parse_config([]).train_images == {"calendar": 100, "claim-window": 100, "provider-select": 100}
    config = tmp_path / "routing.yaml"
    config.write_text("classes: [provider-select, calendar]\ntrain_images: {calendar: 7, provider-select: 9}\n"
                      "eval_images: 3\nseed: 11\n")
    cfg = parse_config(["--config", str(config), "--train-images-calendar", "2", "--seed", "4",
                        "--train-images-chandra-ocr", "1"])
    assert cfg.classes == ("provider-select", "calendar", "chandra-ocr")
    assert cfg.train_images == {"provider-select": 9, "calendar": 2, "chandra-ocr": 1}
    assert (cfg.eval_images, cfg.seed, cfg.train_val_split) == (3, 4, 0.98)
    assert parse_config(["--classes", "calendar,claim-window"]).classes == ("calendar", "claim-window")


# (case, argv, expected message in stderr): each exits with a usage error before generating anything.
BAD_ARGV = [
    ("unknown flag", ["--bogus", "1"], "unrecognized arguments: --bogus"),
    ("abbreviated flag", ["--eval", "1"], "unrecognized arguments: --eval"),
    ("no generator, no dataset", ["--train-images-weather", "2"],
     "class 'weather' has no synthetic generator"),
    ("negative count", ["--train-images-calendar", "-1"], "train images of 'calendar' must be a whole number >= 0"),
    ("negative eval", ["--eval-images", "-2"], "eval images must be a whole number >= 0"),
    ("split zero", ["--train-val-split", "0"], "train/val split must be in (0, 1]"),
    ("split above one", ["--train-val-split", "1.5"], "train/val split must be in (0, 1]"),
    ("empty class list", ["--classes", ","], "the class list is empty"),
    ("duplicate class", ["--classes", "calendar,calendar"], "duplicate class 'calendar'"),
    ("dataset of no class", ["--classes", "calendar", "--claim-window-dataset", "."],
     "--claim-window-dataset is given but 'claim-window' is not a class"),
    ("missing dataset folder", ["--calendar-dataset", "/nonexistent/x"], "dataset folder of 'calendar' not found"),
    ("held-out family in training", ["--train-families", "desktop,mobile"],
     "held-out style family 'mobile' must never be used to train"),
    ("unknown families, all named", ["--train-families", "retro", "--eval-families", "web-dark", "neon"],
     "unknown style family 'retro' in train_families; unknown style family 'neon' in eval_families"),
    ("family with a user dataset", ["--classes", "calendar", "--calendar-dataset", ".", "--eval-families", "dense"],
     "style families apply to synthetic screens only, but calendar"),
]


@pytest.mark.parametrize(("case", "argv", "expected"), BAD_ARGV, ids=[c[0] for c in BAD_ARGV])
def test_bad_command_lines_are_rejected(capsys, case, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_config_checks_in_library_use():
    with pytest.raises(ValueError, match="train_images names 'x', which is not a class"):
        RoutingDatasetConfig(train_images={"x": 1})


def make_user_dataset(root: Path, count: int) -> Path:
    """A tiny expert dataset: `count` PNG screenshots and their LLaVA lines in train.jsonl."""
    (root / "imgs").mkdir(parents=True)
    lines = []
    for n in range(count):
        Image.new("RGB", (8, 8), (n * 40, 0, 0)).save(root / "imgs" / f"shot{n}.png")
        lines.append({"id": f"mine-{n}", "image": f"imgs/shot{n}.png",
                      "conversations": [{"from": "human", "value": f"<image>\nbook slot {n}"},
                                        {"from": "gpt", "value": f"answer {n}"}],
                      "metadata": {"task_type": "calendar", "note": n}})
    (root / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_user_dataset_is_sampled_and_copied(tmp_path):
    user = make_user_dataset(tmp_path / "user", 4)
    out = tmp_path / "out"
    assert main(["--classes", "calendar", "--train-images-calendar", "2", "--eval-images", "1",
                 "--train-val-split", "1", "--calendar-dataset", str(user), "--output", str(out)]) == 0
    train, evaluation = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert (len(train), len(evaluation)) == (2, 1)
    sources = set()
    for line in train + evaluation:
        n = line["metadata"]["note"]
        sources.add(n)
        assert line["conversations"][0]["value"] == f"<image>\nbook slot {n}"
        assert (line["adapter"], line["label"], line["metadata"]["task_type"]) == ("calendar", 0, "calendar")
        assert line["image"] == f"images/{line['id']}.png"
        assert (out / line["image"]).read_bytes() == (user / "imgs" / f"shot{n}.png").read_bytes()
    assert len(sources) == 3  # drawn without replacement: eval never repeats a training sample


def test_user_dataset_too_small_is_an_error_and_leaves_nothing(tmp_path, capsys):
    user = make_user_dataset(tmp_path / "user", 2)
    out = tmp_path / "out"
    assert main(["--classes", "calendar", "--train-images-calendar", "2", "--eval-images", "1",
                 "--calendar-dataset", str(user), "--output", str(out)]) == 1
    assert "has 2 samples, 3 needed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]


def test_families_are_drawn_in_turn_and_recorded(tmp_path):
    out = tmp_path / "families"
    assert main(["--classes", "calendar,claim-window", "--train-images-calendar", "2", "--train-images-claim-window",
                 "2", "--eval-images", "3", "--train-val-split", "1", "--train-families", "web-dark",
                 "--eval-families", "mobile", "dense", "--output", str(out)]) == 0
    train, evaluation = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert {line["metadata"]["family"] for line in train} == {"web-dark"}
    for name in ("calendar", "claim-window"):
        families = [line["metadata"]["family"] for line in evaluation if line["adapter"] == name]
        assert families == ["mobile", "dense", "mobile"]
    mobile = next(line for line in evaluation if line["metadata"]["family"] == "mobile")
    width, height = Image.open(out / mobile["image"]).size
    assert height > 1.5 * width
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["arguments"]["eval_families"] == ["mobile", "dense"]


def test_without_families_lines_name_none(small):
    lines = read_jsonl(small / "train.jsonl") + read_jsonl(small / "eval.jsonl")
    assert not any("family" in line["metadata"] for line in lines)
