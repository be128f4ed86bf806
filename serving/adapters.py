"""Checks every adapter of a deployment before vLLM starts, so a bad adapter fails fast with its name.

vLLM itself either refuses such adapters late (after a minute of start-up) or, worse, serves them silently
doing nothing (vision-tower LoRA, keys it cannot map). Each problem here names the adapter and what is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from serving.config import VLLM_LORA_RANKS, AdapterConfig, ConfigError, DeploymentConfig
from training.manifest import AdapterManifest, model_fingerprint


class AdapterError(ConfigError):
    """One or more adapters cannot be served; `problems` lists each as 'adapter: what is wrong'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("adapter check failed:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class AdapterInfo:
    """What serving needs to know about one checked adapter."""

    name: str
    path: Path
    rank: int


def _weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        return list(f.keys())


def _check_one(adapter: AdapterConfig, folder: Path, base_fingerprint: str | None) -> tuple[list[str], int]:
    """Problems with one adapter (empty if none) and its rank."""
    name = adapter.name
    if not folder.is_dir():
        return [f"{name}: adapter folder not found: {folder}"], 0
    config_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(config_path.read_text())
    except FileNotFoundError:
        return [f"{name}: no adapter_config.json in {folder}"], 0
    except json.JSONDecodeError as exc:
        return [f"{name}: adapter_config.json does not parse: {exc}"], 0
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f"{name}: peft_type is {cfg.get('peft_type')!r}, only LORA can be served")
    rank = int(cfg.get("r") or 0)
    if rank < 1:
        problems.append(f"{name}: rank r={cfg.get('r')!r} is not a positive integer")
    if cfg.get("use_dora"):
        problems.append(f"{name}: DoRA adapters (use_dora=true) cannot be served by vLLM")
    if cfg.get("modules_to_save"):
        problems.append(f"{name}: modules_to_save={cfg['modules_to_save']} is not supported by vLLM LoRA")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append(f"{name}: trained biases (bias={cfg.get('bias')!r}) are not supported by vLLM LoRA")
    if not (folder / "adapter_model.safetensors").exists():
        problems.append(f"{name}: no adapter_model.safetensors in {folder}")
    else:
        keys = _weight_keys(folder)
        lora = [k for k in keys if ".lora_A." in k or ".lora_B." in k]
        if not lora:
            problems.append(f"{name}: adapter_model.safetensors holds no LoRA A/B weights")
        visual = [k for k in lora if ".visual." in k]
        if visual:
            problems.append(f"{name}: {len(visual)} LoRA weights are on the vision tower (e.g. {visual[0]}); "
                            "vLLM ignores them, so train LoRA on the language model only")
        if lora and not any(".language_model." in k for k in lora):
            problems.append(f"{name}: no LoRA weight is on the language model (keys like {lora[0]}); "
                            "vLLM would load it and change nothing")
    if base_fingerprint is not None:
        try:
            manifest = AdapterManifest.read(folder)
        except FileNotFoundError:
            problems.append(f"{name}: no manifest (lora_router_manifest.json) to tell which base model it was trained on")
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
        else:
            if manifest.base_model_fingerprint != base_fingerprint:
                problems.append(f"{name}: trained on another base model ({manifest.base_model}, fingerprint "
                                f"{manifest.base_model_fingerprint}); this deployment serves fingerprint {base_fingerprint}")
    return problems, rank


def _router_label_problems(config: DeploymentConfig, folder: Path) -> list[str]:
    try:
        manifest = AdapterManifest.read(folder)
    except (FileNotFoundError, ValueError):
        return []  # already reported by _check_one
    if manifest.labels is None:
        return [f"{config.router.name}: its manifest has no labels, so it is not a router"]
    if list(manifest.labels) != config.labels:
        return [f"{config.router.name}: router labels {manifest.labels} do not match the configured experts "
                f"{config.labels} (retrain the router or fix `experts:`)"]
    return []


def max_rank_for(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"LoRA rank {rank} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def check_adapters(config: DeploymentConfig, base_model_dir: str | None = None) -> list[AdapterInfo]:
    """Check every adapter; raise AdapterError listing all problems, or return their infos.

    `base_model_dir` is the resolved base model; when it is a local folder each adapter's manifest must
    name the same fingerprint. Also derives and checks engine.max_loras / engine.max_lora_rank.
    """
    fingerprint = model_fingerprint(base_model_dir) if base_model_dir and Path(base_model_dir).is_dir() else None
    problems: list[str] = []
    infos = []
    for adapter in config.adapters:
        folder = config.adapter_path(adapter)
        found, rank = _check_one(adapter, folder, fingerprint)
        problems += found
        if config.router is adapter and not found:
            problems += _router_label_problems(config, folder)
        if config.engine.max_lora_rank is not None and rank > config.engine.max_lora_rank:
            problems.append(f"{adapter.name}: rank {rank} is above engine.max_lora_rank={config.engine.max_lora_rank}")
        infos.append(AdapterInfo(adapter.name, folder, rank))
    n = len(config.adapters)
    if config.engine.max_loras is not None and config.engine.max_loras < n:
        problems.append(f"engine.max_loras={config.engine.max_loras} is too small: the router and every expert "
                        f"({n} adapters) must fit in one batch")
    if problems:
        raise AdapterError(problems)
    return infos
