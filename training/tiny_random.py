"""The random tiny Qwen3-VL (same architecture, random weights, its own tokenizer) that the embedded model starts from.

No weights can be downloaded on development and CI machines, so every command runs on the embedded model unless a
config names another (the names are in training.tiny_model). This module builds the random-init one; training.pretrain
pre-trains it. It is built from a seed, written once to a cache folder and reused; the same spec and seed give
byte-identical files. Both transformers and the vLLM CPU server load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_router.configuration import ConfigError, check_types

# Qwen's special tokens, in Qwen's order; the config's vision/image/video ids are looked up from them.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
)

# Qwen3-VL's chat template restricted to what this project sends (no tools, no thinking): system, user and
# assistant turns, string or list content, images and videos as vision placeholders.
CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}"
    "{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}"
    "{{- content['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the tokenizer's BPE merges are learned from: the words, labels, JSON and numbers this project's models
# read and write, so labels and tool calls take few tokens.
_CORPUS_WORDS = (
    "calendar claim-window provider-select chandra-ocr router "
    "You are a routing classifier for a multi-adapter system. Given a screenshot, identify which LoRA "
    "adapter should handle it. Respond with only the adapter name: Which adapter should handle this "
    "screenshot? Click on the highlighted day. Select the provider. Extract the claim fields as JSON. "
    "Transcribe this page to markdown. January February March April May June July August September "
    "October November December Mon Tue Wed Thu Fri Sat Sun Monday Tuesday Wednesday Thursday Friday "
    "Saturday Sunday AM PM Claim # Date of service Amount Member ID Provider Status Diagnosis code Submit "
    "Cancel Save Search providers Dr. Name Specialty Location Cardiology Dermatology Pediatrics Family "
    "Medicine Orthopedics Neurology The a an of and to in is for on with this that by from page table "
    "section report summary notes total title window screen form list text heading paragraph"
)
_CORPUS_JSON = (
    '{"name":"click","arguments":{"x":123,"y":456}} {"name":"select_provider","arguments":{"name":"Dr. Ann Lee"}} '
    '{"Claim #":"CLM-104233","Date of service":"03/14/2026","Amount":"$1,250.00","Member ID":"MBR-88213"} '
    "# Heading\n\n## Section\n\n- item one\n- item two\n\n| Name | Value |\n|---|---|\n| a | 1 |\n"
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. Defaults are the smallest that vLLM's CPU attention accepts (head_dim 64)."""

    seed: int = field(default=0, metadata={"help": "Seed for weights and tokenizer; same seed, same files."})
    vocab_size: int = field(default=1024, metadata={"help": "Target BPE vocabulary size, special tokens included."})
    hidden_size: int = field(default=128, metadata={"help": "Language model hidden size."})
    intermediate_size: int = field(default=256, metadata={"help": "Language model MLP width."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Language model layers."})
    num_attention_heads: int = field(default=2, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(default=1, metadata={"help": "KV heads (grouped-query attention)."})
    head_dim: int = field(default=64, metadata={"help": "Head size; vLLM's CPU attention rejects 16, accepts 64."})
    vision_depth: int = field(default=2, metadata={"help": "Vision transformer blocks."})
    vision_hidden_size: int = field(default=64, metadata={"help": "Vision transformer width."})
    vision_heads: int = field(default=4, metadata={"help": "Vision attention heads."})
    patch_size: int = field(default=16, metadata={"help": "Vision patch size in pixels (Qwen3-VL: 16)."})
    spatial_merge_size: int = field(default=2, metadata={"help": "Patches merged per side into one token."})
    max_position_embeddings: int = field(default=8192, metadata={"help": "Longest sequence, image tokens included."})
    min_pixels: int = field(default=64 * 32 * 32, metadata={"help": "Processor's smallest image area (pixels)."})
    max_pixels: int = field(default=320 * 32 * 32, metadata={"help": "Processor's largest image area (pixels)."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.head_dim % 2 or self.head_dim < 32:
            raise ConfigError(f"head_dim must be even and >= 32 for vLLM's CPU attention, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.vocab_size <= len(SPECIAL_TOKENS) + 256:
            raise ConfigError(f"vocab_size must exceed {len(SPECIAL_TOKENS) + 256} (bytes + special tokens)")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError("need 0 < min_pixels <= max_pixels")

    @property
    def fingerprint(self) -> str:
        """Short hash naming the cache folder: changes with any field or with this module's version."""
        blob = json.dumps({"spec": asdict(self), "version": BUILD_VERSION}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


# Bump when the build changes in a way the spec does not capture, so stale caches are not reused.
BUILD_VERSION = 1


def mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) as Qwen3-VL does (24/20/20 of 64)."""
    half = head_dim // 2
    height = width = half * 5 // 16
    return [half - height - width, height, width]


@dataclass
class CacheArguments:
    """Where `python -m training.pretrain` and `python -m training.tiny_model` keep the models they build."""

    cache_dir: Path | None = field(default=None, metadata={
        "help": "Cache root (default: $LORA_ROUTER_CACHE or ~/.cache/lora-router)."})

    def __post_init__(self) -> None:
        check_types(self)


def default_cache_dir() -> Path:
    """Where built models live: $LORA_ROUTER_CACHE, else $XDG_CACHE_HOME/lora-router, else ~/.cache/lora-router."""
    if env := os.environ.get("LORA_ROUTER_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora-router"


def _train_tokenizer(spec: TinyModelSpec):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    digits = " ".join(str(n) for n in range(0, 1000))
    # Labels repeated often enough to become single tokens, so the router can answer in one token.
    labels = "\n".join(["calendar", "claim-window", "provider-select", "chandra-ocr"] * 50)
    tok.train_from_iterator([_CORPUS_WORDS, _CORPUS_JSON, digits, labels] * 20, trainer=trainer)
    return Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )


def _build_config(spec: TinyModelSpec, tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": spec.hidden_size,
            "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_hidden_layers,
            "num_attention_heads": spec.num_attention_heads,
            "num_key_value_heads": spec.num_key_value_heads,
            "head_dim": spec.head_dim,
            "max_position_embeddings": spec.max_position_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": mrope_section(spec.head_dim),
                "mrope_interleaved": True,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": spec.vision_depth,
            "hidden_size": spec.vision_hidden_size,
            "intermediate_size": spec.vision_hidden_size * 2,
            "num_heads": spec.vision_heads,
            "patch_size": spec.patch_size,
            "spatial_merge_size": spec.spatial_merge_size,
            "out_hidden_size": spec.hidden_size,
            "num_position_embeddings": 1024,
            "deepstack_visual_indexes": list(range(spec.vision_depth)),
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    return config


def _build_processor(spec: TinyModelSpec, tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    image_processor = Qwen2VLImageProcessor(
        patch_size=spec.patch_size, merge_size=spec.spatial_merge_size, temporal_patch_size=2, size=size,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=spec.patch_size, merge_size=spec.spatial_merge_size, temporal_patch_size=2, size=size,
    )
    return Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _write_model(spec: TinyModelSpec, out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    tokenizer = _train_tokenizer(spec)
    config = _build_config(spec, tokenizer)
    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    # transformers' default init (std 0.02) caps the largest logit near 2.5 after the final RMSNorm, so no
    # token can be learned to high probability (see the vLLM-on-CPU notes); 1/sqrt(hidden) removes the cap.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, spec.hidden_size**-0.5)
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    _build_processor(spec, tokenizer).save_pretrained(out)
    (out / "tiny_model_spec.json").write_text(json.dumps({**asdict(spec), "build_version": BUILD_VERSION}, indent=2))


def build_tiny_model(spec: TinyModelSpec | None = None, cache_dir: Path | None = None) -> Path:
    """Return the folder of the tiny model for `spec`, building it first if the cache lacks it.

    The folder is written under a temporary name and renamed when complete, so an interrupted build never
    leaves a half-written model that later runs would reuse.
    """
    spec = spec or TinyModelSpec()
    root = cache_dir or default_cache_dir()
    out = root / f"tiny-qwen3-vl-{spec.fingerprint}"
    if (out / "tiny_model_spec.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=root))
    tmp.chmod(0o755)
    try:
        _write_model(spec, tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished the same build first
            if not (out / "tiny_model_spec.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
