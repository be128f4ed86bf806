"""Shared fixtures: the random tiny model (mechanics need no pre-training), random stand-in adapters, a real vLLM
server on a free port, and the 3- and 4-class routers trained on the pre-trained base (once per session)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_router.deployment import DeploymentConfig, from_dict
from serving.launcher import VLLMServer
from training.tiny_random import build_tiny_model

log = logging.getLogger(__name__)

EXPERTS = ("calendar", "claim-window", "provider-select")
THREE = EXPERTS
FOUR = (*THREE, "chandra-ocr")
TRAIN_PER_CLASS = 300
EVAL_PER_CLASS = 30
# The router recipe a user runs (configs/training/router-tiny.yaml: the seed's flags as YAML keys), paths appended.
ROOT = Path(__file__).resolve().parents[1]
ROUTER_RECIPE = ROOT / "configs" / "training" / "router-tiny.yaml"


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
    return from_dict(deployment_data(adapters_dir, **sections))


def deployment_data(adapters_dir: Path, **sections) -> dict:
    """deployment()'s settings as plain data, as a YAML file holds them."""
    data = {
        "model": {"path": "tiny-random", "served_name": "base"},
        "router": {"name": "router", "path": str(adapters_dir / "router")},
        "experts": [{"name": n, "path": str(adapters_dir / n), "prompt": f"Do the {n} task."} for n in EXPERTS],
        "engine": {"port": 0, "kv_cache_gib": 1, "startup_timeout_s": 600},
    }
    data.update(sections)
    return data


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


GW_KEY, GW_ADMIN = "gw-key", "gw-admin"


@pytest.fixture(scope="session")
def gw(tmp_path_factory, adapters_dir) -> VLLMServer:
    """vLLM + gateway for the gateway and batch tests: choice routing so every route names a label, small limits
    to reach 413 and 429, an admin key; capture on for flagged requests and feedback only."""
    log = tmp_path_factory.mktemp("logs") / "vllm-gateway.log"
    config = deployment(adapters_dir, engine={"port": 0, "kv_cache_gib": 1, "api_key": GW_KEY},
                        gateway={"max_body_mb": 2, "max_image_pixels": 1_000_000, "max_in_flight": 4,
                                 "max_queue": 4, "admin_api_key": GW_ADMIN,
                                 "capture": {"dir": str(tmp_path_factory.mktemp("captures")), "recent": 16}},
                        client={"router_mode": "choice"})
    server = start_server(config, log, probe=False)
    yield server
    server.stop()


def _routing_data(root: Path, classes: tuple[str, ...]) -> Path:
    from training.convert_routing_to_classification import convert_dataset
    from training.generate_dataset import RoutingDatasetConfig, generate_routing_dataset

    out = root / f"routing-{len(classes)}"
    cfg = RoutingDatasetConfig(classes=classes, train_images={c: TRAIN_PER_CLASS for c in classes},
                               eval_images=EVAL_PER_CLASS, train_val_split=1.0, seed=7, output=out)
    generate_routing_dataset(cfg)
    convert_dataset(out)
    return out


def _train_router(data: Path, out: Path) -> dict:
    from training.train_qwen import main as train_main

    started = time.perf_counter()
    code = train_main(["--config", str(ROUTER_RECIPE), "--disable_tqdm", "True", "--data_path",
                       str(data / "train-classification.jsonl"), "--eval_data_path", str(data / "eval-classification.jsonl"),
                       "--output_dir", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = round(time.perf_counter() - started, 1)
    return metrics


@pytest.fixture(scope="session")
def routers(pretrained_base, tmp_path_factory) -> dict:
    """The 3- and 4-class routers, trained with the router recipe on the pre-trained base and validated in-process
    by the validation CLI's code, once for every test that needs them (about 2 minutes each on 2 cores):
    {3: {"data", "adapter", "train", "in_process", "predictions"}, 4: {...}}; both adapters lie under
    result["root"]."""
    from training.validate_router import validate

    root = tmp_path_factory.mktemp("router-training")
    result: dict = {"root": root}
    for classes in (THREE, FOUR):
        n = len(classes)
        data = _routing_data(root, classes)
        adapter = root / f"router{n}"
        metrics = _train_router(data, adapter)
        out = root / f"validate{n}-in-process"
        report = validate(data / "eval-classification.jsonl", out, adapter=adapter, quiet=True)
        result[n] = {"data": data, "adapter": adapter, "train": metrics, "in_process": report,
                     "predictions": out / "predictions.jsonl"}
        log.info("%d-class router: trained in %s s, loss %s -> %s, in-process accuracy %s (%s/%s)", n,
                 metrics["wall_s"], metrics["loss_first"], metrics["loss_last"], report["accuracy"],
                 report["correct"], report["count"])
    return result


def make_tower_adapters(pretrained_base: Path, root: Path) -> None:
    """Random stand-in routers on the vision tower, in root: `tower` (PEFT's all-linear, the vision tower and its
    mergers included) and `vision-only` (the same adapter with the language model's LoRA B zeroed and the tower's
    scaled up, so any change from the base model comes from the tower)."""
    from safetensors.torch import load_file, save_file

    from training.random_adapter import make_random_adapter

    make_random_adapter(str(pretrained_base), root / "tower", seed=3, labels=list(THREE), vision_tower=True)
    shutil.copytree(root / "tower", root / "vision-only")
    weights = load_file(str(root / "tower" / "adapter_model.safetensors"))
    save_file({k: (v * 8 if ".visual." in k else v * 0) if ".lora_B." in k else v for k, v in weights.items()},
              str(root / "vision-only" / "adapter_model.safetensors"))


@pytest.fixture(scope="session")
def pretrained_served(routers, pretrained_base, tmp_path_factory) -> VLLMServer:
    """One vLLM CPU server on the pre-trained base, tower LoRA on, for the router and tower tests: the 3- and
    4-class routers as named adapters (router3, router4) and the tower stand-ins (tower, vision-only)."""
    root = tmp_path_factory.mktemp("pretrained-served")
    make_tower_adapters(pretrained_base, root)
    adapters = {**{f"router{n}": routers[n]["adapter"] for n in (3, 4)}, "tower": root / "tower",
                "vision-only": root / "vision-only"}
    config = deployment(root, model={"path": str(pretrained_base), "served_name": "base"}, router=None,
                        experts=[{"name": name, "path": str(path)} for name, path in adapters.items()],
                        engine={"port": 0, "kv_cache_gib": 1, "max_lora_rank": 32, "tower_lora": True,
                                "startup_timeout_s": 600})
    server = start_server(config, root / "vllm.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def plain_python(tmp_path_factory) -> Path:
    """A fresh virtual environment holding the plain install: the base dependencies as the lock pins them, then
    the project itself (built as a wheel, not editable)."""
    uv = shutil.which("uv")
    assert uv, "uv is on PATH wherever the README's commands ran"
    venv = tmp_path_factory.mktemp("plain") / "venv"
    requirements = venv.parent / "requirements.txt"
    run = lambda *args: subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    run(uv, "export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "--output-file", str(requirements))
    run(uv, "venv", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    run(uv, "pip", "install", "--python", str(python), "-r", str(requirements))
    run(uv, "pip", "install", "--python", str(python), "--no-deps", str(ROOT))
    return python


def pytest_terminal_summary(terminalreporter) -> None:
    """The gateway fuzzing's example counts (tests/test_gateway_fuzz.py), when it ran."""
    fuzz = sys.modules.get("tests.test_gateway_fuzz")
    if fuzz is not None and fuzz.EXAMPLES:
        counts = ", ".join(f"{name} {n}" for name, n in fuzz.EXAMPLES.items())
        terminalreporter.write_line(f"gateway fuzzing: {sum(fuzz.EXAMPLES.values())} examples ({counts})")
