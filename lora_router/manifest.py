"""What an adapter is: the manifest written next to every adapter (what it was trained on and for, so serving can
check it) and the shapes vLLM can serve (ranks, target modules: the language model's, the vision tower's).

Training writes it; serving reads it before starting vLLM (same base model? router labels = experts?).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "lora_router_manifest.json"
# vLLM accepts only these LoRA ranks for --max-lora-rank: an adapter's rank must fit one of them.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Language-model projections of Qwen3-VL; the vision tower's modules are named differently (qkv, proj,
# linear_fc1/2), so these names never put LoRA on it.
LANGUAGE_MODEL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Linear layers of Qwen3-VL's vision tower (blocks) and of its merger and deepstack mergers.
VISION_TOWER_TARGETS = ("qkv", "proj", "linear_fc1", "linear_fc2")
# PEFT's own shorthand for every linear layer but the output head (lm_head), the vision tower's included.
ALL_LINEAR = "all-linear"
# PEFT exclude_modules regexes over module names like model.visual.blocks.0.attn.qkv: the whole vision tower with
# its mergers, or only its patch embedding (a Conv3d that vLLM cannot put LoRA on).
_VISION_TOWER_RE = r"(.*\.)?visual(\..*)?"
_PATCH_EMBED_RE = r"(.*\.)?visual\.patch_embed(\..*)?"
# Files up to this size are hashed whole; larger weight shards by their ends and middle (an 8B model is 16 GB).
_FULL_HASH_LIMIT = 64 << 20
_SAMPLE = 1 << 20


def _file_digest(path: Path, h: "hashlib._Hash") -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= _FULL_HASH_LIMIT:
            h.update(f.read())
            return
        for offset in (0, size // 2, size - _SAMPLE):
            f.seek(offset)
            h.update(f.read(_SAMPLE))


def model_fingerprint(model_dir: str | Path) -> str:
    """Hash of a local model folder's config and weights; a hub id (no such folder) hashes its name."""
    folder = Path(model_dir)
    h = hashlib.sha256()
    if not folder.is_dir():
        h.update(f"hub:{model_dir}".encode())
        return h.hexdigest()[:16]
    for path in sorted(folder.glob("config.json")) + sorted(folder.glob("*.safetensors")):
        _file_digest(path, h)
    return h.hexdigest()[:16]


def touches_vision_tower(name: str) -> bool:
    """Whether a module name or PEFT weight key lies in the vision tower or its mergers (model.visual....)."""
    return ".visual." in f".{name}"


def lora_targets(target_modules: list[str], vision_tower: bool) -> dict[str, Any]:
    """PEFT LoraConfig's target_modules and exclude_modules: `target_modules` names (or [ALL_LINEAR], passed to PEFT
    as its shorthand), kept off the vision tower unless `vision_tower`, never on its patch embedding."""
    targets: str | list[str] = ALL_LINEAR if list(target_modules) == [ALL_LINEAR] else list(target_modules)
    return {"target_modules": targets, "exclude_modules": _PATCH_EMBED_RE if vision_tower else _VISION_TOWER_RE}


def file_sha256(path: str | Path) -> str:
    """Hash of a dataset file (the JSONL; images are named in it)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class AdapterManifest:
    """What an adapter is: its base model, LoRA shape, task prompts and (for a router) its labels."""

    base_model: str = field(metadata={"help": "Base model path or hub id the adapter was trained on."})
    base_model_fingerprint: str = field(metadata={"help": "model_fingerprint() of that base model."})
    rank: int = field(metadata={"help": "LoRA rank r."})
    target_modules: list[str] = field(metadata={"help": "Module names LoRA was applied to."})
    labels: list[str] | None = field(default=None, metadata={"help": "Router only: the answers it may give."})
    system_prompt: str | None = field(default=None, metadata={"help": "System turn used in training, if any."})
    user_prompt: str | None = field(default=None, metadata={"help": "User prompt used in training, if fixed."})
    dataset_sha256: str | None = field(default=None, metadata={"help": "Hash of the training JSONL."})
    metrics: dict[str, Any] = field(default_factory=dict, metadata={"help": "Final evaluation metrics."})
    calibration: dict[str, Any] | None = field(default=None, metadata={
        "help": "Router only: training.calibration.Calibration fitted on held-out data (temperature, threshold); "
                "serving routes with it unless the deployment's client: section says otherwise."})
    min_pixels: int | None = field(default=None, metadata={
        "help": "Smallest image area the processor resized training images to (the trainer's flag, else the model "
                "processor's default); serving refuses an engine that serves other limits. None: not recorded "
                "(manifests before this field, stand-in adapters)."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Largest image area the processor resized training images to; as min_pixels."})
    vision_tower: bool = field(default=False, metadata={
        "help": "Whether LoRA is also on the vision tower and its mergers (served only with engine.tower_lora); "
                "manifests written before this field read as False."})

    def write(self, adapter_dir: str | Path) -> Path:
        path = Path(adapter_dir) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, adapter_dir: str | Path) -> "AdapterManifest":
        """Read an adapter's manifest; raises FileNotFoundError or ValueError naming the file."""
        path = Path(adapter_dir) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
            return cls(**data)
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid adapter manifest: {exc}") from None
