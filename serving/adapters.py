"""Checks every adapter of a deployment before vLLM starts, so a bad adapter fails fast with its name.

vLLM itself either refuses such adapters late (after a minute of start-up) or, worse, serves them silently
doing nothing (vision-tower LoRA without engine.tower_lora, keys it cannot map). Each problem here names the adapter
and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_router.deployment import VLLM_LORA_RANKS, AdapterConfig, ConfigError, DeploymentConfig, EngineConfig
from lora_router.manifest import MANIFEST_NAME, AdapterManifest, file_sha256, model_fingerprint, touches_vision_tower

# The files that make one version of an adapter: its LoRA config, its weights and (labels, prompts) its manifest.
_VERSION_FILES = ("adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME)


class AdapterError(ConfigError):
    """One or more adapters cannot be served; `problems` lists each as 'adapter: what is wrong'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("adapter check failed:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class AdapterInfo:
    """What serving needs to know about one checked adapter: its public name, folder, rank, version fingerprint,
    the labels and calibration (temperature, threshold) of a router (from its manifest) and an expert's default
    prompt."""

    name: str
    path: Path
    rank: int
    fingerprint: str
    labels: tuple[str, ...] | None = None
    prompt: str = ""
    calibration: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    @property
    def served_as(self) -> str:
        """The versioned name vLLM serves it under."""
        return versioned_name(self.name, self.fingerprint)


def versioned_name(name: str, fingerprint: str) -> str:
    """vLLM's name for one version of an adapter: a new version never shares a name (nor stale prefix cache,
    vLLM issues 42125 and 30931) with an old one."""
    return f"{name}@{fingerprint}"


def adapter_fingerprint(folder: Path) -> str:
    """Hash of an adapter's config, weights and manifest: the same files give the same version wherever they lie."""
    h = hashlib.sha256()
    for name in _VERSION_FILES:
        path = folder / name
        h.update(f"{name}:{file_sha256(path) if path.exists() else '-'}\n".encode())
    return h.hexdigest()[:12]


def _weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), framework="numpy") as f:
        return list(f.keys())


def _read_manifest(name: str, folder: Path) -> tuple[AdapterManifest | None, str | None]:
    """An adapter's manifest, or None and what is wrong with it."""
    try:
        return AdapterManifest.read(folder), None
    except FileNotFoundError:
        return None, f"{name}: no manifest (lora_router_manifest.json) to tell which base model it was trained on"
    except ValueError as exc:
        return None, f"{name}: {exc}"


def _vision_tower_evidence(cfg: dict, lora_keys: list[str], manifest: AdapterManifest | None) -> str | None:
    """What shows that an adapter has LoRA on the vision tower or its mergers; None if nothing does."""
    if manifest is not None and manifest.vision_tower:
        return "its manifest says vision_tower: true"
    targets = cfg.get("target_modules") or []
    named = [t for t in ([targets] if isinstance(targets, str) else targets) if "visual" in t]
    if named:
        return f"adapter_config.json targets {named[0]}"
    visual = [k for k in lora_keys if touches_vision_tower(k)]
    if visual:
        return f"{len(visual)} LoRA weights such as {visual[0]}"
    return None


@dataclass(frozen=True)
class PixelLimits:
    """The image area limits the engine serves at (min_pixels, max_pixels), each with where it comes from; None:
    not known here (the model processor's default of a hub model, or an engine setting left unset at runtime)."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    min_source: str = "engine.min_pixels"
    max_source: str = "engine.max_pixels"


def processor_pixel_limits(model_dir: str | None) -> tuple[int | None, int | None]:
    """A local model's processor defaults (min_pixels, max_pixels): image_processor.size in processor_config.json
    or preprocessor_config.json (Qwen-VL's shortest_edge and longest_edge are areas); (None, None) if not found."""
    folder = Path(model_dir) if model_dir else None
    for name in ("processor_config.json", "preprocessor_config.json"):
        if folder is None or not (folder / name).is_file():
            continue
        data = json.loads((folder / name).read_text())
        size = data.get("image_processor", data).get("size") or {}
        return size.get("shortest_edge"), size.get("longest_edge")
    return None, None


def served_pixel_limits(engine: EngineConfig, model_dir: str | None = None) -> PixelLimits:
    """The limits the engine serves images at: engine.min_pixels / max_pixels, else the model processor's own."""
    default_min, default_max = processor_pixel_limits(model_dir)
    return PixelLimits(
        min_pixels=engine.min_pixels or default_min, max_pixels=engine.max_pixels or default_max,
        min_source="engine.min_pixels" if engine.min_pixels else "the model processor's default",
        max_source="engine.max_pixels" if engine.max_pixels else "the model processor's default")


def _pixel_problems(name: str, manifest: AdapterManifest, served: PixelLimits) -> list[str]:
    """Each pixel limit the adapter was trained at that the engine serves otherwise (unrecorded ones pass)."""
    problems = []
    for field_name, trained, serving, source in (
            ("min_pixels", manifest.min_pixels, served.min_pixels, served.min_source),
            ("max_pixels", manifest.max_pixels, served.max_pixels, served.max_source)):
        if trained is not None and serving is not None and trained != serving:
            problems.append(f"{name}: trained at {field_name}={trained}, but the engine serves {field_name}="
                            f"{serving} ({source}); a router's accuracy depends on the image size it sees: set "
                            f"engine.{field_name}: {trained}, retrain the adapter at {serving}, or accept it with "
                            "engine.accept_pixel_mismatch: true")
    return problems


def _check_one(adapter: AdapterConfig, folder: Path, base_fingerprint: str | None, tower_lora: bool
               ) -> tuple[list[str], int, AdapterManifest | None]:
    """Problems with one adapter (empty if none) and its rank."""
    name = adapter.name
    if not folder.is_dir():
        return [f"{name}: adapter folder not found: {folder}"], 0, None
    config_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(config_path.read_text())
    except FileNotFoundError:
        return [f"{name}: no adapter_config.json in {folder}"], 0, None
    except json.JSONDecodeError as exc:
        return [f"{name}: adapter_config.json does not parse: {exc}"], 0, None
    problems = []
    manifest, manifest_problem = _read_manifest(name, folder)
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
    lora: list[str] = []
    if not (folder / "adapter_model.safetensors").exists():
        problems.append(f"{name}: no adapter_model.safetensors in {folder}")
    else:
        lora = [k for k in _weight_keys(folder) if ".lora_A." in k or ".lora_B." in k]
        if not lora:
            problems.append(f"{name}: adapter_model.safetensors holds no LoRA A/B weights")
        if lora and not any(".language_model." in k for k in lora):
            problems.append(f"{name}: no LoRA weight is on the language model (keys like {lora[0]}); "
                            "vLLM would load it and change nothing")
    evidence = _vision_tower_evidence(cfg, lora, manifest)
    if evidence and not tower_lora:
        problems.append(f"{name}: LoRA on the vision tower ({evidence}), which vLLM ignores unless engine.tower_lora "
                        "is on: set `engine.tower_lora: true` (or --set engine.tower_lora=true). It costs encoder "
                        "sharing: vLLM then keys the vision-encoder cache by adapter, so router and expert no longer "
                        "share a screenshot's encoding")
    if base_fingerprint is not None:
        if manifest is None:
            problems.append(manifest_problem)
        elif manifest.base_model_fingerprint != base_fingerprint:
            problems.append(f"{name}: trained on another base model ({manifest.base_model}, fingerprint "
                            f"{manifest.base_model_fingerprint}); this deployment serves fingerprint {base_fingerprint}")
    return problems, rank, manifest


def _manifest_routing(folder: Path) -> tuple[tuple[str, ...] | None, dict[str, Any] | None]:
    """A router's labels and calibration from its manifest; None for an expert, or when the manifest is missing or
    broken."""
    try:
        manifest = AdapterManifest.read(folder)
    except (FileNotFoundError, ValueError):
        return None, None  # reported by _check_one when the base model is known
    return (tuple(manifest.labels) if manifest.labels is not None else None), manifest.calibration


def router_label_problems(name: str, folder: Path, experts: Sequence[str], exact: bool) -> list[str]:
    """Why a router's manifest labels cannot route to `experts` (empty if they can).

    `exact`: the labels must be the experts in order (a deployment config); else each label must name one of
    them (a router added while more experts are loaded than it knows).
    """
    try:
        labels = AdapterManifest.read(folder).labels
    except (FileNotFoundError, ValueError):
        return []  # reported by _check_one
    if labels is None:
        return [f"{name}: its manifest has no labels, so it is not a router"]
    if exact and list(labels) != list(experts):
        return [f"{name}: router labels {labels} do not match the configured experts "
                f"{list(experts)} (retrain the router or fix `experts:`)"]
    unknown = [label for label in labels if label not in experts]
    if unknown:
        return [f"{name}: router labels {unknown} name no loaded expert (loaded: {', '.join(experts) or 'none'}); "
                "add those experts first"]
    return []


def max_rank_for(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"LoRA rank {rank} exceeds vLLM's largest ({VLLM_LORA_RANKS[-1]})")


def base_fingerprint(base_model_dir: str | None) -> str | None:
    """The fingerprint adapter manifests must name: the base model's, when it is a local folder (else None)."""
    return model_fingerprint(base_model_dir) if base_model_dir and Path(base_model_dir).is_dir() else None


def check_adapter(adapter: AdapterConfig, folder: Path, base: str | None, engine: EngineConfig,
                  pixels: PixelLimits | None = None) -> tuple[list[str], AdapterInfo]:
    """The problems with one adapter (empty if none) and its info; `base` is base_fingerprint(), `engine` the
    served engine settings (its max_lora_rank, None: no limit yet, tower_lora and accept_pixel_mismatch), `pixels`
    the limits it serves images at (None: the engine's settings only, the processor's defaults unknown)."""
    problems, rank, manifest = _check_one(adapter, folder, base, engine.tower_lora)
    if manifest is not None and not engine.accept_pixel_mismatch:
        problems += _pixel_problems(adapter.name, manifest, pixels or served_pixel_limits(engine))
    if engine.max_lora_rank is not None and rank > engine.max_lora_rank:
        problems.append(f"{adapter.name}: rank {rank} is above engine.max_lora_rank={engine.max_lora_rank}")
    fingerprint = adapter_fingerprint(folder) if folder.is_dir() else ""
    labels, calibration = _manifest_routing(folder)
    return problems, AdapterInfo(adapter.name, folder, rank, fingerprint, labels, adapter.prompt, calibration)


def check_adapters(config: DeploymentConfig, base_model_dir: str | None = None, *, slots: int | None = None,
                   exact_labels: bool = True) -> list[AdapterInfo]:
    """Check every adapter; raise AdapterError listing all problems, or return their infos (router first).

    `base_model_dir` is the resolved base model; when it is a local folder each adapter's manifest must
    name the same fingerprint. The router's labels must be the experts in order (`exact_labels`), or each name
    one of them (a deployment brought back from the admin API's state). Also checks engine.max_loras and
    engine.max_lora_rank; `slots` is how many adapters must fit in a batch (default: the config's).
    """
    base = base_fingerprint(base_model_dir)
    pixels = served_pixel_limits(config.engine, base_model_dir)
    problems: list[str] = []
    infos = []
    for adapter in config.adapters:
        folder = config.adapter_path(adapter)
        found, info = check_adapter(adapter, folder, base, config.engine, pixels)
        if config.router is adapter and not found:
            found += router_label_problems(adapter.name, folder, config.labels, exact_labels)
        problems += found
        infos.append(info)
    n = len(config.adapters) if slots is None else slots
    if config.engine.max_loras is not None and config.engine.max_loras < n:
        problems.append(f"engine.max_loras={config.engine.max_loras} is too small: the router and every expert "
                        f"({n} adapters) must fit in one batch")
    if problems:
        raise AdapterError(problems)
    return infos
