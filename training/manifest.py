"""What an adapter is: the manifest written next to every adapter (what it was trained on and for, so serving can
check it) and the shapes vLLM can serve (ranks, language-model target modules).

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
# linear_fc1/2), so these names never put LoRA on it (vLLM ignores vision LoRA anyway).
LANGUAGE_MODEL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
