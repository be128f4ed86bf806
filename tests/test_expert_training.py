"""Experts: the router's trainer, with the expert recipe, trains each task's LoRA on the pre-trained tiny base,
and the expert evaluator scores it above the untrained base on held-out screens of its own task (the calendar on
finding the calendar, SHOWN)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_router.manifest import AdapterManifest
from training.evaluate_expert import evaluate
from training.expert_datasets import write_dataset
from training.screens import KINDS
from training.train_qwen import main as train_main

pytestmark = pytest.mark.integration

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "training" / "expert-tiny.yaml"
TRAIN, EVAL = 300, 32
# Measured on this base (30 image tokens a screen, too few to read text): claim-window names the right fields
# but no value, and repeats keys until the token limit (valid_json 0.0). Strict, so the day it starts to beat the
# base, this marker has to go.
CANNOT_READ = pytest.mark.xfail(strict=True, reason="needs legible text: no field value read at 30 image tokens")
# A day cell is smaller than one image token here: the calendar expert finds the calendar (in_region: 0.73 of its
# clicks) but not the day (in_box 0 of 64 when measured; printed); the others are held to their task score.
SHOWN = {"calendar": "in_region"}


@pytest.fixture(scope="module")
def trained(pretrained_base, tmp_path_factory):
    """Trains (once per kind in this module) the kind's expert with the recipe and evaluates it against the base:
    (the trainer's metrics, the evaluator's report)."""
    cache: dict[str, tuple[dict, dict]] = {}

    def expert(kind: str) -> tuple[dict, dict]:
        if kind not in cache:
            root = tmp_path_factory.mktemp(kind)
            data, adapter = root / "data", root / kind
            write_dataset(kind, TRAIN, EVAL, 0, data, progress=False)
            code = train_main(["--config", str(RECIPE), "--data_path", str(data / "train.jsonl"), "--eval_data_path",
                               str(data / "eval.jsonl"), "--output_dir", str(adapter), "--disable_tqdm", "True"])
            assert code == 0
            manifest = AdapterManifest.read(adapter)
            assert manifest.labels is None and manifest.base_model == str(pretrained_base)
            train = json.loads((adapter / "metrics.json").read_text())
            report = evaluate(adapter, data / "eval.jsonl", out=root / "eval", quiet=True)
            print(f"\n{kind} expert: trained in {train['train_wall_s']} s, loss {train['loss_first']} -> "
                  f"{train['loss_last']}; on {report['count']} held-out screens adapter "
                  f"{json.dumps(report['adapter_scores'])}, base {json.dumps(report['base'])}, by task "
                  f"{json.dumps(report['by_task'])}")
            cache[kind] = train, report
        return cache[kind]

    return expert


@pytest.mark.parametrize("kind", [pytest.param(k, marks=CANNOT_READ) if k == "claim-window" else k
                                  for k in KINDS])
def test_expert_beats_the_untrained_base_on_its_task(kind, trained):
    train, report = trained(kind)
    base, adapter = report["base"], report["adapter_scores"]
    assert train["loss_last"] < train["loss_first"]
    metric = SHOWN.get(kind, "score")
    assert adapter[metric] > base[metric]
    if metric != "score":
        assert adapter[metric] >= 0.5


# Issue 15's bars: what an expert on a base that reads and points would reach. Strict: the base that meets one
# turns its test into a failure until the marker goes.
NEEDS_A_READING_BASE = pytest.mark.xfail(strict=True, raises=AssertionError, reason=(
    "at 30 image tokens the base reads no text and cannot point at one day cell"))
BARS = {
    "calendar": lambda r: r["by_task"]["highlighted-day"]["adapter"]["score"] >= 0.6,
    "provider-select": lambda r: r["adapter_scores"]["score"] >= 0.6,
    "claim-window": lambda r: r["adapter_scores"]["field_accuracy"] >= 0.5 and r["adapter_scores"]["valid_json"] >= 0.95,
    "chandra-ocr": lambda r: r["adapter_scores"]["cer"] <= 0.5,
}


@NEEDS_A_READING_BASE
@pytest.mark.parametrize("kind", KINDS)
def test_expert_meets_its_bar(kind, trained):
    _, report = trained(kind)
    assert BARS[kind](report)
