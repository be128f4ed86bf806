"""Shared fixtures: the random tiny model (mechanics need no pre-training), random stand-in adapters, and a real vLLM server on a free port."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from serving.config import DeploymentConfig, from_dict
from serving.launcher import VLLMServer
from training.tiny_random import build_tiny_model

EXPERTS = ("calendar", "claim-window", "provider-select")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The embedded tiny model (built once into the user cache, then reused)."""
    return build_tiny_model()


@pytest.fixture(scope="session")
def pretrained_base() -> Path:
    """The default base 'tiny': the tiny model pre-trained on screen captions (cached per machine; a few minutes
    on 2 cores the first time)."""
    from training.tiny_model import resolve_base_model

    return Path(resolve_base_model("tiny"))


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A router and three experts with random non-zero LoRA weights on the tiny model."""
    from training.random_adapter import make_random_adapter

    root = tmp_path_factory.mktemp("adapters")
    make_random_adapter(str(tiny_model_dir), root / "router", labels=list(EXPERTS), seed=1)
    for seed, name in enumerate(EXPERTS, start=2):
        make_random_adapter(str(tiny_model_dir), root / name, seed=seed)
    return root


def deployment(adapters_dir: Path, **sections) -> DeploymentConfig:
    """A tiny-model deployment of the adapters in `adapters_dir`, on a free port; sections override."""
    data = {
        "model": {"path": "tiny-random", "served_name": "base"},
        "router": {"name": "router", "path": str(adapters_dir / "router")},
        "experts": [{"name": n, "path": str(adapters_dir / n), "prompt": f"Do the {n} task."} for n in EXPERTS],
        "engine": {"port": 0, "kv_cache_gib": 1, "startup_timeout_s": 600},
    }
    data.update(sections)
    return from_dict(data)


def start_server(config: DeploymentConfig, log_path: Path, **kwargs) -> VLLMServer:
    """Start a real vLLM server and return it once ready (the caller stops it)."""
    server = VLLMServer(config, log_path=log_path, **kwargs)
    try:
        asyncio.run(server.start())
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def served(tmp_path_factory, adapters_dir) -> VLLMServer:
    """One real vLLM CPU server for the session: tiny base, router and three experts, API key required."""
    log = tmp_path_factory.mktemp("logs") / "vllm-session.log"
    config = deployment(adapters_dir, engine={"port": 0, "kv_cache_gib": 1, "api_key": "test-key"})
    server = start_server(config, log)
    yield server
    server.stop()
