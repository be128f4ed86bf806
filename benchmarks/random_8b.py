"""A random-weight Qwen3-VL-8B-Instruct (exact architecture), random adapters and a deployment config for it.

For GPU machines that cannot download weights: the benchmark then runs unchanged on the production shape.

    python -m benchmarks.random_8b --out /data/random-8b
    python -m benchmarks.load --config /data/random-8b/deployment.yaml

writes OUT/model (config.json, bf16 safetensors shards + index, tokenizer, processor, chat template, generation
config), OUT/adapters/<router and each expert> (PEFT LoRA on the language model, random, non-zero B, with the
manifest serving checks) and OUT/deployment.yaml (configs/qwen3-vl-8b.yaml with these paths).

Shape: Qwen/Qwen3-VL-8B-Instruct's config.json (text: hidden 4096, 36 layers, 32 heads, 8 KV heads, head_dim 128,
MLP 12288, vocab 151936, interleaved M-RoPE [24, 20, 20], theta 5e6; vision: depth 27, hidden 1152, MLP 4304,
16 heads, patch 16, merge 2, 2304 position embeddings, DeepStack at blocks 8/16/24), 8.77 B parameters.
The tokenizer is a small byte-level BPE padded with never-produced filler tokens to Qwen's 151643 regular tokens,
so Qwen's special tokens keep their real ids (<|endoftext|> 151643 ... <|im_end|> 151645, <|vision_start|> 151652,
<|image_pad|> 151655, ..., </think> 151668); text is therefore tokenized differently from Qwen's own tokenizer
(more tokens per word), image token counts are the same.

Weights are never materialised as a model: shapes come from a meta-device model, and each tensor is drawn in
chunks of rows and streamed into its safetensors shard, so memory holds one chunk (the model is 16 GB in bf16).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from lora_router.configuration import ConfigError, check_types, parse_command, run_command
from lora_router.deployment import load_config
from lora_router.manifest import AdapterManifest, model_fingerprint
from lora_router.prompts import ROUTER_USER_PROMPT, router_system_prompt
from lora_router.resources import configs_dir
from serving.adapters import check_adapters
from training.random_adapter import LANGUAGE_MODEL_TARGETS
from training.tasks import build_example
from training.tiny_random import CHAT_TEMPLATE, SPECIAL_TOKENS

# Qwen3's special tokens after those in training.tiny_model.SPECIAL_TOKENS, in id order.
MORE_SPECIAL_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                       "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>")
_CHUNK_BYTES = 64 << 20
_SHARD_BYTES = 5 << 30
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Qwen3VLShape:
    """Architecture numbers; the defaults are Qwen/Qwen3-VL-8B-Instruct's."""

    hidden_size: int = field(default=4096, metadata={"help": "Language model width."})
    num_hidden_layers: int = field(default=36, metadata={"help": "Language model layers."})
    num_attention_heads: int = field(default=32, metadata={"help": "Attention heads."})
    num_key_value_heads: int = field(default=8, metadata={"help": "KV heads (grouped-query attention)."})
    head_dim: int = field(default=128, metadata={"help": "Head size."})
    intermediate_size: int = field(default=12288, metadata={"help": "Language model MLP width."})
    vocab_size: int = field(default=151936, metadata={"help": "Embedding rows (tokenizer tokens padded up)."})
    regular_tokens: int = field(default=151643, metadata={"help": "Tokenizer tokens before the special ones."})
    max_position_embeddings: int = field(default=262144, metadata={"help": "Longest context."})
    rope_theta: float = field(default=5_000_000.0, metadata={"help": "M-RoPE base."})
    mrope_section: tuple[int, int, int] = field(default=(24, 20, 20), metadata={
        "help": "Rotary frequencies for time, height, width (sum = head_dim / 2)."})
    vision_depth: int = field(default=27, metadata={"help": "Vision transformer blocks."})
    vision_hidden_size: int = field(default=1152, metadata={"help": "Vision width."})
    vision_intermediate_size: int = field(default=4304, metadata={"help": "Vision MLP width."})
    vision_heads: int = field(default=16, metadata={"help": "Vision attention heads."})
    num_position_embeddings: int = field(default=2304, metadata={"help": "Vision position table (a square)."})
    deepstack_visual_indexes: tuple[int, ...] = field(default=(8, 16, 24), metadata={
        "help": "Vision blocks whose features feed the language model's first layers."})

    def __post_init__(self) -> None:
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {self.head_dim // 2}")
        if self.regular_tokens + len(SPECIAL_TOKENS) + len(MORE_SPECIAL_TOKENS) > self.vocab_size:
            raise ValueError("vocab_size must hold the regular and the special tokens")
        if max(self.deepstack_visual_indexes, default=-1) >= self.vision_depth:
            raise ValueError("deepstack_visual_indexes must name vision blocks")

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each LoRA target module of a language model layer."""
        attn, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        h, m = self.hidden_size, self.intermediate_size
        return {"q_proj": (h, attn), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (attn, h),
                "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h)}


# A scaled-down shape with the same structure (tests, and benchmarks.gpu_8b --small on a CPU).
SMALL_SHAPE = Qwen3VLShape(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
    mrope_section=(12, 10, 10), intermediate_size=256, vocab_size=2048, regular_tokens=2000,
    max_position_embeddings=8192, vision_depth=2, vision_hidden_size=64, vision_intermediate_size=128,
    vision_heads=4, num_position_embeddings=1024, deepstack_visual_indexes=(0, 1))


def build_tokenizer(shape: Qwen3VLShape):
    """Byte-level BPE learned from the project's prompts and answers, padded to `regular_tokens`, then Qwen's
    special tokens: the ids of the real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    labels = ["calendar", "claim-window", "provider-select", "chandra-ocr"]
    corpus = [router_system_prompt(labels), ROUTER_USER_PROMPT, "\n".join(labels * 50)]
    for kind in ("calendar", "claim-window", "provider-select", "chandra-ocr"):
        for seed in range(8):
            example = build_example(kind, seed)
            corpus += [example.prompt, example.answer]
    trainer = trainers.BpeTrainer(vocab_size=min(4096, shape.regular_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train_from_iterator(corpus * 4, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = dict(learned["vocab"])
    filler = 0
    while len(vocab) < shape.regular_tokens:  # never produced: no merge leads to them
        vocab.setdefault(f"<|filler_{filler}|>", len(vocab))
        filler += 1
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS + MORE_SPECIAL_TOKENS))
    return Qwen2TokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, bos_token=None,
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def build_config(shape: Qwen3VLShape, tokenizer):
    """The transformers Qwen3VLConfig of `shape`, token ids from `tokenizer`."""
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": shape.vocab_size, "hidden_size": shape.hidden_size,
            "intermediate_size": shape.intermediate_size, "num_hidden_layers": shape.num_hidden_layers,
            "num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_key_value_heads,
            "head_dim": shape.head_dim, "hidden_act": "silu", "max_position_embeddings": shape.max_position_embeddings,
            "rms_norm_eps": 1e-6, "attention_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": shape.rope_theta,
                                "mrope_section": list(shape.mrope_section), "mrope_interleaved": True},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": shape.vision_depth, "hidden_size": shape.vision_hidden_size, "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": shape.vision_intermediate_size, "num_heads": shape.vision_heads, "in_channels": 3,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "out_hidden_size": shape.hidden_size, "num_position_embeddings": shape.num_position_embeddings,
            "deepstack_visual_indexes": list(shape.deepstack_visual_indexes),
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    config.dtype = "bfloat16"
    return config


def build_processor(tokenizer):
    """Qwen3-VL-8B-Instruct's processor settings (pixels 65536 .. 16777216, patch 16, merge 2, mean/std 0.5)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 65536, "longest_edge": 16777216},
                                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 4096, "longest_edge": 25165824})
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                            chat_template=CHAT_TEMPLATE)


def weight_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the checkpoint holds, from a meta-device model (no memory)."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _init_std(name: str, shape: tuple[int, ...]) -> float | None:
    """Normal std for a weight; None: norms get ones, biases zeros."""
    if name.endswith("bias") or len(shape) == 1:
        return None
    return 0.02


def _chunks(name: str, shape: tuple[int, ...], generator, std: float | None) -> Iterator[memoryview]:
    """The bf16 tensor's bytes in chunks of whole rows, each drawn when needed."""
    import torch

    row = _numel(shape[1:]) if len(shape) > 1 else shape[0]
    rows = shape[0] if len(shape) > 1 else 1
    per_chunk = max(1, _CHUNK_BYTES // (row * 2))
    for start in range(0, rows, per_chunk):
        n = min(per_chunk, rows - start)
        if std is None:
            fill = 0.0 if name.endswith("bias") else 1.0
            chunk = torch.full((n * row,), fill, dtype=torch.bfloat16)
        else:
            chunk = torch.empty(n * row, dtype=torch.bfloat16).normal_(0.0, std, generator=generator)
        yield memoryview(chunk.view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]],
                      data: Iterator[tuple[str, Iterator[memoryview]]]) -> int:
    """Stream bf16 tensors of known shapes into one safetensors file: header first, then each tensor's chunks as
    `data` yields them (in the order of `tensors`). Returns the bytes of tensor data written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors.items():
        end = offset + _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, chunks in data:
            expected, written = header[name]["data_offsets"][1] - header[name]["data_offsets"][0], 0
            for chunk in chunks:
                f.write(chunk)
                written += chunk.nbytes
            if written != expected:
                raise RuntimeError(f"{name}: wrote {written} bytes, its shape needs {expected}")
    return offset


def write_weights(config, out: Path, seed: int, shard_bytes: int = _SHARD_BYTES) -> int:
    """Random bf16 weights for `config` in safetensors shards (+ index when more than one); returns parameters."""
    import torch

    shapes = weight_shapes(config)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    used = 0
    for name, shape in shapes.items():
        nbytes = _numel(shape) * 2
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = shape
        used += nbytes
    generator = torch.Generator().manual_seed(seed)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        data = ((n, _chunks(n, s, generator, _init_std(n, s))) for n, s in shard.items())
        total += write_safetensors(out / file_name, shard, data)
        weight_map.update(dict.fromkeys(shard, file_name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return sum(_numel(s) for s in shapes.values())


def write_model(shape: Qwen3VLShape, out: Path, seed: int = 0, shard_bytes: int = _SHARD_BYTES) -> int:
    """Config, weights, tokenizer, processor and generation config of a random model in `out`; returns parameters."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape)
    config = build_config(shape, tokenizer)
    config.save_pretrained(out)
    eos, pad = config.text_config.eos_token_id, config.text_config.pad_token_id
    GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False).save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    (out / "random_shape.json").write_text(json.dumps({**asdict(shape), "seed": seed}, indent=2) + "\n")
    return write_weights(config, out, seed, shard_bytes)


def write_adapter(shape: Qwen3VLShape, model_dir: Path, out: Path, rank: int, seed: int,
                  labels: list[str] | None = None) -> Path:
    """A PEFT LoRA adapter (language model q/k/v/o/gate/up/down, random A, non-zero random B) and its manifest."""
    import torch
    from peft import LoraConfig

    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, tuple[int, ...]] = {}
    for layer in range(shape.num_hidden_layers):
        for module, (fan_in, fan_out) in shape.lora_shapes().items():
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.language_model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rank, fan_in)
            tensors[f"{prefix}.lora_B.weight"] = (fan_out, rank)
    generator = torch.Generator().manual_seed(seed)
    data = ((name, _chunks(name, s, generator, s[1] ** -0.5 if "lora_A" in name else 0.05))
            for name, s in tensors.items())
    write_safetensors(out / "adapter_model.safetensors", tensors, data)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LANGUAGE_MODEL_TARGETS), lora_dropout=0.0,
               bias="none", base_model_name_or_path=str(model_dir)).save_pretrained(out)
    AdapterManifest(
        base_model=str(model_dir), base_model_fingerprint=model_fingerprint(model_dir), rank=rank,
        target_modules=list(LANGUAGE_MODEL_TARGETS), labels=list(labels) if labels else None,
        system_prompt=router_system_prompt(labels) if labels else None,
        user_prompt=ROUTER_USER_PROMPT if labels else None, metrics={"random": True},
    ).write(out)
    return out


def write_deployment(base_config: Path, out: Path, model_dir: Path, adapters_dir: Path) -> Path:
    """`base_config` with the model and adapter paths replaced, as OUT/deployment.yaml."""
    data = yaml.safe_load(base_config.read_text())
    data["model"]["path"] = str(model_dir)
    data["router"]["path"] = str(adapters_dir / data["router"]["name"])
    for expert in data["experts"]:
        expert["path"] = str(adapters_dir / expert["name"])
    path = out / "deployment.yaml"
    header = f"# Random-weight stand-in written by benchmarks.random_8b from {base_config.name}.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def build(out: Path, shape: Qwen3VLShape, rank: int, seed: int, base_config: Path,
          shard_bytes: int = _SHARD_BYTES) -> Path:
    """Model, adapters and deployment config in `out`; the config is checked as serving will check it.
    Returns the deployment config's path."""
    model_dir, adapters_dir = out / "model", out / "adapters"
    params = write_model(shape, model_dir, seed, shard_bytes)
    log.info("model: %.3f B parameters in %s", params / 1e9, model_dir)
    base = load_config(base_config)
    labels = base.labels
    write_adapter(shape, model_dir, adapters_dir / base.router.name, rank, seed + 1, labels=labels)
    for i, name in enumerate(labels, start=2):
        write_adapter(shape, model_dir, adapters_dir / name, rank, seed + i)
    path = write_deployment(base_config, out, model_dir, adapters_dir)
    check_adapters(load_config(path), str(model_dir))
    return path


@dataclass
class Random8bArguments:
    """The flags of `python -m benchmarks.random_8b`."""

    out: Path = field(metadata={"help": "Folder to write (about 17 GB)."})
    rank: int = field(default=16, metadata={
        "help": "LoRA rank of the random adapters (match the trained adapters)."})
    seed: int = field(default=0, metadata={"help": "Weights seed."})
    base_config: Path = field(default=configs_dir() / "qwen3-vl-8b.yaml", metadata={
        "help": "Deployment config whose model and adapter paths are replaced."})

    def __post_init__(self) -> None:
        check_types(self)
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}")


def write_random_8b(args: Random8bArguments) -> int:
    """Build everything, then print the deployment config's path and the benchmark command."""
    path = build(args.out, Qwen3VLShape(), args.rank, args.seed, args.base_config)
    print(f"deployment: {path}\nbenchmark:  python -m benchmarks.load --config {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_command(Random8bArguments, argv, prog="python -m benchmarks.random_8b", description=__doc__)
    return run_command(lambda: write_random_8b(args))


if __name__ == "__main__":
    raise SystemExit(main())
