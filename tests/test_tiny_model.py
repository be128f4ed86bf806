"""The embedded tiny Qwen3-VL: reproducible from its seed, loadable by transformers, Qwen3-VL's rendering."""

from __future__ import annotations

import hashlib

import pytest

from training.tiny_random import TinyModelSpec, build_tiny_model, mrope_section


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    a = build_tiny_model(TinyModelSpec(seed=3), tmp_path_factory.mktemp("a"))
    b = build_tiny_model(TinyModelSpec(seed=3), tmp_path_factory.mktemp("b"))
    return a, b


def test_same_seed_gives_identical_files(two_builds):
    a, b = two_builds
    assert _digests(a) == _digests(b)
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(_digests(a))


def test_other_seed_gives_other_weights_and_a_cached_build_is_reused(tmp_path, two_builds):
    other = build_tiny_model(TinyModelSpec(seed=4), tmp_path)
    assert _digests(other)["model.safetensors"] != _digests(two_builds[0])["model.safetensors"]
    marker = other / "marker"
    marker.write_text("kept")
    assert build_tiny_model(TinyModelSpec(seed=4), tmp_path) == other and marker.exists()


@pytest.mark.parametrize("case, kwargs, message", [
    ("head too small for vLLM CPU attention", {"head_dim": 16}, "head_dim"),
    ("heads not a multiple of kv heads", {"num_attention_heads": 3, "num_key_value_heads": 2}, "multiple"),
    ("vocab smaller than bytes + specials", {"vocab_size": 200}, "vocab_size"),
    ("pixel limits reversed", {"min_pixels": 10, "max_pixels": 5}, "min_pixels"),
])
def test_bad_spec_is_refused(case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinyModelSpec(**kwargs)


def test_mrope_section_sums_to_half_head_dim():
    assert mrope_section(64) == [12, 10, 10]
    assert sum(mrope_section(128)) == 64


def test_chat_template_renders_like_qwen3_vl(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Route it."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which adapter?"}]},
        {"role": "assistant", "content": "calendar"},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\nRoute it.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which adapter?<|im_end|>\n"
                    "<|im_start|>assistant\ncalendar<|im_end|>\n")
    prompt = processor.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_transformers_generates_from_an_image(tiny_model_dir):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    config = model.config
    tok = processor.tokenizer
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.new("RGB", (640, 480), (10, 120, 200))], return_tensors="pt")
    # 640x480 at 32 px per merged token is 20x15 = 300 image tokens.
    assert int((inputs["input_ids"] == config.image_token_id).sum()) == 300
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_router_labels_are_single_tokens(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    firsts = [tok.tokenize(label)[0] for label in ("calendar", "claim-window", "provider-select", "chandra-ocr")]
    assert len(set(firsts)) == 4, firsts
