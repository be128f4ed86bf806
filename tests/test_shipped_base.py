"""The pre-trained tiny base shipped in the repository: one current version, checked against its recorded
fingerprint, copied into the cache instead of pre-training; and its recipe's first steps replayed against its log."""

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
    replay_vision_stage,
    shipped_dir,
)

# Vision-stage steps replayed against the shipped log: the loss has clearly fallen by then.
REPLAYED = 300


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


def test_the_recipe_replays_the_shipped_base_s_first_vision_steps(tmp_path):
    """Re-runs the recipe's first REPLAYED vision-stage steps (about a minute; the whole recipe takes twenty, run by
    `python -m training.pretrain --rebuild true`) and compares their losses with the shipped base's log: the same
    on a machine like the one that built it; another CPU's vector instructions may round differently, so the
    comparison allows drift, not a different trajectory."""
    recorded = json.loads((shipped_dir(PretrainSpec()) / DONE_MARKER).read_text())["vision_stage_loss_curve"]
    replayed = replay_vision_stage(PretrainSpec(), REPLAYED, cache_dir=tmp_path)
    assert len(replayed) == REPLAYED
    if replayed == recorded[:REPLAYED]:
        return
    drift = sum(abs(a - b) for a, b in zip(replayed, recorded)) / REPLAYED
    assert drift < 0.05, (drift, replayed[:10], recorded[:10])
    assert abs(sum(replayed[-50:]) - sum(recorded[REPLAYED - 50:REPLAYED])) / 50 < 0.05


def test_a_replay_longer_than_the_recipe_is_refused():
    with pytest.raises(ValueError, match="within the recipe's 3000 vision-stage steps, got 3001"):
        replay_vision_stage(PretrainSpec(), 3001)
