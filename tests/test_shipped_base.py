"""The pre-trained tiny base shipped in the repository: one current version, checked against its recorded
fingerprint, copied into the cache instead of pre-training; and (slow) rebuilt from its recipe, bit for bit."""

from __future__ import annotations

import json
import shutil

import pytest

from lora_router.manifest import model_fingerprint
from training import pretrain
from training.pretrain import (
    DONE_MARKER,
    SHIPPED_RECORD,
    SHIPPED_ROOT,
    PretrainSpec,
    build_pretrained_model,
    check_shipped,
    shipped_dir,
)


def test_the_repository_ships_exactly_the_current_recipes_base():
    shipped = sorted(p.name for p in SHIPPED_ROOT.glob("tiny-qwen3-vl-pretrained-*"))
    assert shipped == [shipped_dir(PretrainSpec()).name], (
        "training/bases/ must hold the base of PretrainSpec's defaults and nothing else: after changing the "
        "recipe, run python -m training.pretrain --ship true")
    record = check_shipped(shipped_dir(PretrainSpec()))
    assert record["spec_fingerprint"] == PretrainSpec().fingerprint
    # Small enough to keep in git: a new version adds about this much.
    assert record["bytes"] < 4 << 20
    assert json.loads((shipped_dir(PretrainSpec()) / "pretrain_spec.json").read_text())["spec"]["seed"] == 0


def test_a_fresh_cache_gets_the_shipped_base_without_pre_training(tmp_path, monkeypatch):
    def no_pretraining(*args, **kwargs):
        raise AssertionError("pre-trained although the repository ships this base")

    monkeypatch.setattr(pretrain, "pretrain", no_pretraining)
    out = build_pretrained_model(cache_dir=tmp_path)
    assert out.parent == tmp_path and (out / DONE_MARKER).exists()
    assert model_fingerprint(out) == json.loads((shipped_dir(PretrainSpec()) / SHIPPED_RECORD).read_text())[
        "weights_fingerprint"]


def test_a_damaged_shipped_base_is_refused_by_name(tmp_path, monkeypatch):
    bases = tmp_path / "bases"
    damaged = bases / shipped_dir(PretrainSpec()).name
    shutil.copytree(shipped_dir(PretrainSpec()), damaged)
    weights = damaged / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(pretrain, "SHIPPED_ROOT", bases)
    with pytest.raises(ValueError, match=f"{damaged}: its weights have fingerprint .* the shipped base is damaged"):
        build_pretrained_model(cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_the_recipe_rebuilds_the_shipped_base(tmp_path):
    """Pre-trains from PretrainSpec's defaults (7.5 minutes on 2 quiet cores) and compares it with the shipped copy:
    the same weights on the machine that built it; elsewhere float arithmetic may differ (another CPU's vector
    instructions), so the comparison is the held-out scores pre-training reports, within a few points."""
    shipped = shipped_dir(PretrainSpec())
    rebuilt = build_pretrained_model(cache_dir=tmp_path, use_shipped=False)
    if model_fingerprint(rebuilt) == check_shipped(shipped)["weights_fingerprint"]:
        return
    want = json.loads((shipped / DONE_MARKER).read_text())["held_out"]
    got = json.loads((rebuilt / DONE_MARKER).read_text())["held_out"]
    assert got["caption_token_accuracy"] >= want["caption_token_accuracy"] - 0.05, (got, want)
    assert got["layout_probe_kind_accuracy"] >= want["layout_probe_kind_accuracy"] - 0.1, (got, want)
    assert got["eval_loss"] <= want["eval_loss"] * 1.5, (got, want)
