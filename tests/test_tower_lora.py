"""Adapters on the vision tower, served by the vLLM CPU build with engine.tower_lora (--enable-tower-connector-lora):
served answers match in-process ones, and the tower's LoRA changes them as it does in-process.

Random stand-in routers on the pre-trained base (tests/conftest.py, make_tower_adapters), served by the session's
`pretrained_served` beside the trained routers: `tower` (PEFT's all-linear, the vision tower and its mergers
included) and `vision-only` (the LoRA on the tower alone, so any change from the base model comes from it). Answers of a random adapter drift in their later tokens under
bf16 (vLLM) against float32 (transformers), so answers are compared on their first words.
"""

from __future__ import annotations

import pytest

from lora_router.images import prepare_image
from lora_router.openai_wire import bearer_headers, chat_request, read_completion, user_turn
from tests.conftest import THREE
from training.llava_data import Conversation
from training.validate_router import eval_set, in_process_answers

pytestmark = pytest.mark.integration

EVAL_PER_CLASS = 10
# Leading words of an answer compared between vLLM and transformers.
WORDS = 3
# Screens (of 30) whose leading words may differ between vLLM and transformers (measured: 1-2).
DRIFT = 3
# Longest answer compared, in tokens.
MAX_TOKENS = 16


def _lead(answer: str) -> list[str]:
    return answer.split()[:WORDS]


@pytest.fixture(scope="module")
def tower(pretrained_served, tmp_path_factory):
    """30 held-out screens and the server holding the two adapters (tests/conftest.py, make_tower_adapters):
    {"adapters": {name: folder}, "data", "server"}."""
    from training.convert_routing_to_classification import convert_dataset
    from training.generate_dataset import RoutingDatasetConfig, generate_routing_dataset

    data = tmp_path_factory.mktemp("tower") / "routing"
    generate_routing_dataset(RoutingDatasetConfig(classes=THREE, train_images={c: 1 for c in THREE},
                                                  eval_images=EVAL_PER_CLASS, train_val_split=1.0, seed=11, output=data))
    convert_dataset(data)
    adapters = {e.name: e.path for e in pretrained_served.config.experts}
    return {"adapters": adapters, "data": data / "eval-classification.jsonl", "server": pretrained_served}


def _served(tower: dict, model: str, conversations: list[Conversation]) -> list[str]:
    """The served model's greedy answers (up to 16 tokens) to the held-out screens, sent one at a time as the
    lines read: their system turn, then the image and the text."""
    import asyncio

    import aiohttp

    server = tower["server"]

    async def ask_all() -> list[str]:
        async with aiohttp.ClientSession(headers=bearer_headers(server.config.engine.api_key)) as session:
            answers = []
            for c in conversations:
                messages = [{"role": "system", "content": c.system},
                            user_turn(prepare_image(c.images[0]).data_url, c.user_text)]
                async with session.post(server.base_url + "/chat/completions",
                                        json=chat_request(model, messages, MAX_TOKENS)) as response:
                    answers.append(read_completion(await response.json()).text.strip())
            return answers

    return asyncio.run(ask_all())


def test_tower_lora_is_served_as_transformers_runs_it_and_changes_the_answers(tower, pretrained_base):
    from training.inference import greedy_generate, load_model, load_processor

    conversations, labels = eval_set(tower["data"], tower["adapters"]["tower"])
    # Served in this order, on the same screens: had vision-only reused the encoding made for the base model or
    # tower, its answers would not match in-process ones (vLLM keys the encoder cache by adapter).
    served = {name: _served(tower, name, conversations) for name in ("base", "tower", "vision-only")}
    in_process = {name: in_process_answers(conversations, tower["adapters"][name], labels, quiet=True,
                                           max_new_tokens=MAX_TOKENS)[0]
                  for name in ("tower", "vision-only")}
    in_process["base"] = greedy_generate(load_model(pretrained_base), load_processor(pretrained_base), conversations,
                                         max_new_tokens=MAX_TOKENS)
    same = {name: sum(_lead(s) == _lead(i) for s, i in zip(served[name], in_process[name])) for name in served}
    # The tower's LoRA alone changes the answers, on the same screens served as in-process.
    changed = {mode: {k for k, (a, b) in enumerate(zip(answers["vision-only"], answers["base"])) if _lead(a) != _lead(b)}
               for mode, answers in (("served", served), ("in-process", in_process))}
    print(f"\nserved == in-process (first {WORDS} words, of {len(conversations)}): {same}; vision-only differs from "
          f"base on {len(changed['in-process'])} in-process, {len(changed['served'])} served")
    assert all(n >= len(conversations) - DRIFT for n in same.values()), (same, served, in_process)
    assert len(changed["in-process"]) >= 5, changed
    assert len(changed["served"] ^ changed["in-process"]) <= DRIFT, changed
