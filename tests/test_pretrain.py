"""Caption pre-training of the tiny base: captions, their independence from the router task, the spec's checks.

Building the pre-trained base itself runs in tests/test_router_training.py (every router there trains on it).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from training.pretrain import LAYOUTS, PROMPTS, PretrainSpec, caption, caption_example, kind_sentence, layout_id
from training.screens import KINDS, generate

SCREENS = [(kind, seed) for kind in KINDS for seed in range(6)]


@pytest.mark.parametrize(("kind", "seed"), SCREENS)
def test_caption_says_what_kind_of_screen_it_is_and_what_is_on_it(kind, seed):
    screen = generate(kind, seed)
    text = caption(kind, screen.truth)
    assert text.startswith(kind_sentence(kind, screen.truth))
    facts = {
        "calendar": lambda t: [t["month_name"], str(t["year"])],
        "claim-window": lambda t: [f["name"] for f in t["fields"]],
        "provider-select": lambda t: [t["providers"][0]["name"]],
        "chandra-ocr": lambda t: [next(line[2:] for line in t["markdown"].splitlines() if line.startswith("# "))],
    }[kind](screen.truth)
    assert all(fact in text for fact in facts), (text, facts)
    assert LAYOUTS[layout_id(kind, screen.truth)].startswith(kind + "/")


def test_pre_training_never_sees_the_router_prompt_or_a_bare_adapter_name():
    router_texts = {ROUTER_USER_PROMPT, router_system_prompt(KINDS)}
    for index in range(40):
        _, messages, _, text, _ = caption_example(index, "train", seed=0)
        turns = [m["content"] if isinstance(m["content"], str) else m["content"][1]["text"] for m in messages]
        assert not router_texts & set(turns)
        assert turns[-1] in PROMPTS
        assert text.strip().rstrip(".") not in KINDS


def test_layouts_tell_every_kind_apart():
    # Each kind's screens map to layouts of that kind only, and every kind has at least one layout.
    assert {layout.split("/")[0] for layout in LAYOUTS} == set(KINDS)


@pytest.mark.parametrize(("case", "changes", "message"), [
    ("batch larger than the data", {"train_screens": 8, "batch_size": 16}, "batch_size"),
    ("no epochs", {"epochs": 0}, "epochs"),
    ("negative vision stage", {"vision_steps": -1}, "vision_steps"),
    ("no held-out screens", {"eval_screens": 0}, "eval_screens"),
    ("warm-up of every step", {"warmup_ratio": 1.0}, "warmup_ratio"),
    ("image limits reversed", {"min_pixels": 4096, "max_pixels": 1024}, "min_pixels"),
])
def test_bad_spec_is_refused_naming_the_field(case, changes, message):
    with pytest.raises(ValueError, match=message):
        PretrainSpec(**changes)


def test_fingerprint_follows_every_setting():
    spec = PretrainSpec()
    assert PretrainSpec().fingerprint == spec.fingerprint
    assert replace(spec, seed=1).fingerprint != spec.fingerprint
    assert replace(spec, epochs=spec.epochs + 1).fingerprint != spec.fingerprint
    assert replace(spec, vision_steps=0).fingerprint != spec.fingerprint
    assert replace(spec, max_pixels=spec.max_pixels * 2).fingerprint != spec.fingerprint
