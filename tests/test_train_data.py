"""Training data: LLaVA lines read and checked, rendered as vLLM renders the request, answer-only loss, collation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from training.llava_data import (
    IGNORE_INDEX,
    ConversationDataset,
    DataError,
    collate,
    describe,
    encode,
    load_images,
    read_conversations,
    router_labels,
    split_user,
)
from training.tiny_random import build_tiny_model

LABELS = ["calendar", "claim-window", "provider-select"]
SMALL = {"size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 12}}


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    # The random tiny model: same tokenizer, chat template and processor as the pre-trained one, no pre-training.
    return AutoProcessor.from_pretrained(build_tiny_model())


def _image(path: Path, color=(200, 30, 30), size=(96, 64)) -> str:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.name if path.parent.name != "images" else f"images/{path.name}"


def router_line(answer: str, image: str = "images/a.png", labels=LABELS) -> dict:
    return {"id": "x", "image": image, "conversations": [
        {"from": "system", "value": router_system_prompt(labels)},
        {"from": "human", "value": f"<image>\n{ROUTER_USER_PROMPT}"},
        {"from": "gpt", "value": answer}]}


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    _image(tmp_path / "images" / "a.png")
    _image(tmp_path / "images" / "b.png", color=(20, 90, 200))
    return tmp_path


def test_split_user_puts_the_image_first_and_drops_the_separator_newline():
    assert split_user("<image>\nWhich adapter?") == [("image", ""), ("text", "Which adapter?")]
    assert split_user("Look: <image> then <image>\nnow") == [("text", "Look: "), ("image", ""), ("text", " then "),
                                                             ("image", ""), ("text", "now")]
    assert split_user("no image") == [("text", "no image")]


def test_rendering_matches_the_request_vllm_receives(folder, processor):
    """Training ids == the chat template applied to the OpenAI-style request (system, user [image_url, text])."""
    [conv] = read_conversations(write(folder / "d.jsonl", [router_line("calendar")]))
    images = load_images(conv)
    feats = encode(processor, conv.messages(), images, conv.answer, SMALL)
    request = [{"role": "system", "content": router_system_prompt(LABELS)},
               {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}},
                                            {"type": "text", "text": ROUTER_USER_PROMPT}]}]
    text = processor.apply_chat_template(request, tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{router_system_prompt(LABELS)}<|im_end|>\n<|im_start|>user\n"
                    f"<|vision_start|><|image_pad|><|vision_end|>{ROUTER_USER_PROMPT}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    served = processor(text=[text], images=images, return_tensors="pt", **SMALL)["input_ids"][0]
    prompt_len = served.numel()
    assert feats["input_ids"][:prompt_len].tolist() == served.tolist()


def test_loss_is_on_the_answer_and_im_end_only(folder, processor):
    [conv] = read_conversations(write(folder / "d.jsonl", [router_line("provider-select")]))
    feats = encode(processor, conv.messages(), load_images(conv), conv.answer, SMALL)
    labels = feats["labels"]
    answer = labels[labels != IGNORE_INDEX]
    tok = processor.tokenizer
    assert tok.decode(answer) == "provider-select<|im_end|>"
    # The supervised tokens are exactly the sequence's tail, and equal the input ids there.
    n = answer.numel()
    assert (labels[:-n] == IGNORE_INDEX).all() and labels[-n:].tolist() == feats["input_ids"][-n:].tolist()
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert feats["mm_token_type_ids"].tolist() == (feats["input_ids"] == image_id).int().tolist()


@pytest.mark.parametrize("side", ["right", "left"])
def test_collation_pads_ids_masks_labels_and_mm_token_types(folder, processor, side):
    lines = [router_line("calendar"), {**router_line("claim-window", image="images/b.png"),
                                       "conversations": [{"from": "human", "value": "<image>\nA much longer question "
                                                          "with many more words in it"},
                                                         {"from": "gpt", "value": "ok"}]}]
    convs = read_conversations(write(folder / "d.jsonl", lines))
    feats = [encode(processor, c.messages(), load_images(c), c.answer, SMALL) for c in convs]
    batch = collate(feats, processor.tokenizer.pad_token_id, padding_side=side)
    longest = max(f["input_ids"].numel() for f in feats)
    for key in ("input_ids", "attention_mask", "labels", "mm_token_type_ids"):
        assert batch[key].shape == (2, longest)
    for row, f in enumerate(feats):
        n = f["input_ids"].numel()
        real = slice(0, n) if side == "right" else slice(longest - n, longest)
        pad = slice(n, longest) if side == "right" else slice(0, longest - n)
        assert batch["input_ids"][row, real].tolist() == f["input_ids"].tolist()
        assert batch["attention_mask"][row, real].all() and not batch["attention_mask"][row, pad].any()
        assert (batch["labels"][row, pad] == IGNORE_INDEX).all()
        assert not batch["mm_token_type_ids"][row, pad].any()
    assert batch["pixel_values"].shape[0] == sum(f["pixel_values"].shape[0] for f in feats)
    assert batch["image_grid_thw"].shape == (2, 3)


def test_a_collated_batch_trains(folder, processor):
    """transformers 5.19's Qwen3-VL needs mm_token_type_ids in training; the collated batch has them."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    convs = read_conversations(write(folder / "d.jsonl", [router_line("calendar"), router_line("claim-window")]))
    batch = collate([encode(processor, c.messages(), load_images(c), c.answer, SMALL) for c in convs],
                    processor.tokenizer.pad_token_id)
    model = Qwen3VLForConditionalGeneration.from_pretrained(build_tiny_model(), dtype=torch.float32)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()


def test_router_labels_follow_the_system_prompt_order():
    for labels in (["calendar"], ["b", "a"], LABELS, [*LABELS, "chandra-ocr"]):
        assert router_labels(router_system_prompt(labels)) == labels
    assert router_labels("Describe the screen.") is None
    assert router_labels(None) is None


def test_describe_a_classification_dataset(folder):
    convs = read_conversations(write(folder / "d.jsonl", [router_line("provider-select"), router_line("calendar")]))
    info = describe(convs)
    assert info.labels == LABELS  # the prompt's order, not the answers' order
    assert info.system_prompt == router_system_prompt(LABELS)
    assert info.user_prompt == ROUTER_USER_PROMPT


def test_expert_data_is_not_classification(folder):
    lines = [{"image": "images/a.png", "conversations": [{"from": "human", "value": f"<image>\nClick day {i}."},
                                                         {"from": "gpt", "value": '{"name":"click"}'}]}
             for i in range(2)]
    info = describe(read_conversations(write(folder / "d.jsonl", lines)))
    assert info.labels is None and info.system_prompt is None and info.user_prompt is None


def _gpt_less(line):
    line["conversations"] = line["conversations"][:2]
    return line


def _two_placeholders(line):
    line["conversations"][1]["value"] = "<image>\n<image>\nWhich adapter should handle this screenshot?"
    return line


def _multi_turn(line):
    line["conversations"] += [{"from": "human", "value": "sure?"}, {"from": "gpt", "value": "calendar"}]
    return line


def _late_system(line):
    line["conversations"] = line["conversations"][1:2] + line["conversations"][:1] + line["conversations"][2:]
    return line


BAD_LINES = [
    # (case, the second line of the file, expected message after "FILE:2: ")
    ("missing image", router_line("calendar", image="images/missing.png"), "image file not found: "),
    ("no gpt turn", _gpt_less(router_line("calendar")), "conversation has no gpt turn"),
    ("unknown class", router_line("weather"), "unknown class 'weather' (labels: calendar, claim-window, "
                                              "provider-select)"),
    ("<image> count differs from images", _two_placeholders(router_line("calendar")),
     "the human turn has 2 <image> placeholder(s) but the line has 1 image(s)"),
    ("image but no placeholder", {**router_line("calendar"), "image": ["images/a.png", "images/b.png"]},
     "has 1 <image> placeholder(s) but the line has 2 image(s)"),
    ("malformed JSON", '{"image": "images/a.png", ', "malformed JSON"),
    ("not an object", "[1, 2]", "expected a JSON object, got list"),
    ("no conversations", {"image": "images/a.png"}, "missing or empty 'conversations' list"),
    ("unknown role", {"image": "images/a.png", "conversations": [{"from": "bot", "value": "x"}]}, "conversations[0]"),
    ("multi-turn", _multi_turn(router_line("calendar")), "multi-turn conversations are not supported"),
    ("system not first", _late_system(router_line("calendar")), "a system turn may only come first"),
    ("empty answer", router_line(""), "the gpt answer is empty"),
]


@pytest.mark.parametrize("case, line, message", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_lines_fail_with_file_and_line(folder, case, line, message):
    path = write(folder / "bad.jsonl", [router_line("calendar"), line])
    with pytest.raises(DataError) as info:
        describe(read_conversations(path))
    assert str(info.value).startswith(f"{path}:2: ")
    assert message in str(info.value)


def test_eval_labels_must_match_the_trained_ones(folder):
    train = describe(read_conversations(write(folder / "t.jsonl", [router_line("calendar")])))
    four = read_conversations(write(folder / "e.jsonl", [router_line("calendar", labels=[*LABELS, "chandra-ocr"])]))
    with pytest.raises(DataError, match="names labels .* but the adapter was trained on"):
        describe(four, labels=train.labels)


def test_encoded_examples_are_kept_within_the_budget_and_collating_leaves_them_as_encoded(folder, processor):
    import torch

    convs = read_conversations(write(folder / "d.jsonl", [router_line("calendar"),
                                                          router_line("claim-window", image="images/b.png")]))
    first = encode(processor, convs[0].messages(), load_images(convs[0]), convs[0].answer, SMALL)
    one_item = sum(t.numel() * t.element_size() for t in first.values())
    dataset = ConversationDataset(convs, processor, SMALL, cache_bytes=one_item)  # room for the first only
    kept = dataset[0]
    dataset[1]  # read once too, past the budget
    assert all(torch.equal(kept[k], first[k]) for k in first)
    (folder / "images" / "a.png").unlink()  # a cached example no longer reads its image ...
    assert dataset[0] is kept
    collate([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)["input_ids"][0, 0] = -1
    assert torch.equal(dataset[0]["input_ids"], first["input_ids"])
    (folder / "images" / "b.png").unlink()  # ... one past the budget reads it every time
    with pytest.raises(DataError, match="cannot read image"):
        dataset[1]
