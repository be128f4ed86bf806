"""The vLLM command line a deployment config produces (no server started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_router.deployment import ConfigError, load_config
from serving.adapters import AdapterInfo
from serving.command import build_command, build_worker_command, cpu_threads, lora_limits

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_production_8b_config_builds_a_gpu_command():
    cfg = load_config(CONFIGS / "qwen3-vl-8b.yaml")
    adapters = [AdapterInfo(a.name, cfg.adapter_path(a), 16, f"v{i}") for i, a in enumerate(cfg.adapters)]
    cmd = build_command(cfg, cfg.model.path, adapters, port=8000, python="python")
    argv = cmd.argv
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(argv, "--model") == "Qwen/Qwen3-VL-8B-Instruct"
    assert _flag(argv, "--served-model-name") == "qwen3-vl-8b"
    assert _flag(argv, "--host") == "0.0.0.0" and _flag(argv, "--port") == "8000"
    assert _flag(argv, "--max-loras") == "4"  # router + three experts in one batch
    assert _flag(argv, "--max-lora-rank") == "16"
    assert "--enable-lora" in argv
    modules = argv[argv.index("--lora-modules") + 1: argv.index("--lora-modules") + 5]
    # Each adapter under its versioned name: a new version never shares vLLM's name (or prefix cache) with an old one.
    assert modules == [f"{a.name}@v{i}={cfg.adapter_path(a)}" for i, a in enumerate(cfg.adapters)]
    assert modules[0].startswith("router@v0=") and modules[0].endswith("checkpoints/router-classifier")
    assert _flag(argv, "--gpu-memory-utilization") == "0.9"
    assert json.loads(_flag(argv, "--mm-processor-kwargs")) == {"size": {"shortest_edge": 262144, "longest_edge": 1310720}}
    assert json.loads(_flag(argv, "--limit-mm-per-prompt")) == {"image": 1, "video": 0}
    assert _flag(argv, "--tensor-parallel-size") == "1" and _flag(argv, "--data-parallel-size") == "1"
    assert not any(k.startswith("VLLM_CPU") for k in cmd.env)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in cmd.env  # the admin API is off


def test_tower_lora_adds_vllms_tower_connector_flag():
    cfg = load_config(CONFIGS / "qwen3-vl-8b.yaml")
    adapters = [AdapterInfo(a.name, cfg.adapter_path(a), 16, "v") for a in cfg.adapters]
    assert "--enable-tower-connector-lora" not in build_command(cfg, cfg.model.path, adapters, port=8000).argv
    on = load_config(CONFIGS / "qwen3-vl-8b.yaml", ["engine.tower_lora=true"])
    argv = build_command(on, on.model.path, adapters, port=8000).argv
    assert argv.index("--enable-tower-connector-lora") > argv.index("--enable-lora")


def test_the_admin_api_turns_on_runtime_loading_and_keeps_lora_headroom():
    cfg = load_config(CONFIGS / "qwen3-vl-8b.yaml", ["gateway.admin_api_key=admin", "engine.lora_headroom=3"])
    adapters = [AdapterInfo(a.name, cfg.adapter_path(a), 16, "v") for a in cfg.adapters]
    cmd = build_command(cfg, cfg.model.path, adapters, port=8000)
    assert cmd.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and "admin" not in cmd.argv
    assert _flag(cmd.argv, "--max-loras") == "7"  # router + three experts, and three free slots
    assert lora_limits(cfg, adapters) == (7, 16)
    # No adapter at start: LoRA is still on, so adapters can be added.
    empty = build_command(load_config(CONFIGS / "tiny-cpu.yaml", ["router=null", "experts=[]",
                                                                   "gateway.admin_api_key=admin"]), "/m", [], port=1)
    assert "--enable-lora" in empty.argv and "--lora-modules" not in empty.argv
    assert _flag(empty.argv, "--max-loras") == "2" and _flag(empty.argv, "--max-lora-rank") == "16"


def test_parallelism_key_and_rank_rounding_pass_through():
    cfg = load_config(CONFIGS / "qwen3-vl-8b.yaml",
                      ["engine.tensor_parallel_size=2", "engine.data_parallel_size=4", "engine.api_key=s3cret",
                       "engine.kv_cache_gib=20", "engine.extra_args=[--enforce-eager]"])
    adapters = [AdapterInfo(a.name, cfg.adapter_path(a), 12, "v") for a in cfg.adapters]
    cmd = build_command(cfg, cfg.model.path, adapters, port=8000)
    assert _flag(cmd.argv, "--tensor-parallel-size") == "2" and _flag(cmd.argv, "--data-parallel-size") == "4"
    assert _flag(cmd.argv, "--max-lora-rank") == "16"  # 12 rounded up to a rank vLLM accepts
    assert _flag(cmd.argv, "--kv-cache-memory-bytes") == str(20 << 30)
    assert cmd.argv[-1] == "--enforce-eager"
    assert cmd.env["VLLM_API_KEY"] == "s3cret" and "s3cret" not in cmd.argv


def test_tiny_cpu_config_sets_cpu_environment():
    cfg = load_config(CONFIGS / "tiny-cpu.yaml", ["router=null", "experts=[]"])
    cmd = build_command(cfg, "/models/tiny", [], port=8123)
    assert cmd.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and cmd.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert int(cmd.env["OMP_NUM_THREADS"]) == cpu_threads(cfg.engine) >= 1
    pinned = build_command(load_config(CONFIGS / "tiny-cpu.yaml", ["engine.cpu_threads=3"]), "/m", [], port=1)
    assert pinned.env["OMP_NUM_THREADS"] == "3"
    assert "--enable-lora" not in cmd.argv
    # oneDNN's kernel cache bounded (its default let the worker grow for 20 minutes), and settable.
    assert cmd.env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
    bigger = build_command(load_config(CONFIGS / "tiny-cpu.yaml", ["engine.cpu_kernel_cache=256"]), "/m", [], port=1)
    assert bigger.env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
    gpu = build_command(load_config(CONFIGS / "qwen3-vl-8b.yaml", ["router=null", "experts=[]"]), "/m", [], port=1)
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in gpu.env


def test_a_cpu_engine_runs_its_worker_in_the_engine_process_unless_told_otherwise():
    def command(config: str, *overrides: str):
        return build_command(load_config(CONFIGS / config, ["router=null", "experts=[]", *overrides]), "/m", [], port=1)

    # Worker apart, vLLM's shared-memory queue between the two spins a core while either waits.
    cmd = command("tiny-cpu.yaml")
    assert _flag(cmd.argv, "--distributed-executor-backend") == "uni"
    assert cmd.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # without it vLLM's CPU platform picks "mp" again
    for apart in (command("tiny-cpu.yaml", "engine.cpu_worker_in_engine=false"),
                  command("tiny-cpu.yaml", "engine.tensor_parallel_size=2"),  # two workers need their own processes
                  command("qwen3-vl-8b.yaml")):
        assert "--distributed-executor-backend" not in apart.argv
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in apart.env
    # Data-parallel engines each keep their worker: the flag reaches every engine, head and headless worker nodes.
    nodes = load_config(CONFIGS / "tiny-cpu.yaml", ["router=null", "experts=[]", *NODES])
    worker = build_worker_command(nodes, "/m", 2)
    assert _flag(worker.argv, "--distributed-executor-backend") == "uni"
    assert worker.env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


NODES = ["engine.data_parallel_size=4", "engine.data_parallel_size_local=2", "engine.data_parallel_address=10.0.0.5",
         "engine.data_parallel_rpc_port=13345", "engine.max_loras=6", "engine.max_lora_rank=16"]


def _engine_flags(argv: list[str]) -> list[str]:
    """argv from its first engine flag on (the part head and workers share)."""
    return argv[argv.index("--dtype"):]


def test_a_replica_over_nodes_gives_head_and_workers_the_same_engine_flags():
    cfg = load_config(CONFIGS / "qwen3-vl-8b.yaml", NODES)
    adapters = [AdapterInfo(a.name, cfg.adapter_path(a), 16, "v") for a in cfg.adapters]
    head = build_command(cfg, cfg.model.path, adapters, port=8000, python="python").argv
    assert _flag(head, "--data-parallel-size") == "4" and _flag(head, "--data-parallel-size-local") == "2"
    assert _flag(head, "--data-parallel-address") == "10.0.0.5" and _flag(head, "--data-parallel-rpc-port") == "13345"
    worker = build_worker_command(cfg, cfg.model.path, start_rank=2, python="python")
    assert worker.argv[:6] == ["python", "-m", "serving.vllm_headless", cfg.model.path, "--headless",
                               "--data-parallel-start-rank"]
    assert _flag(worker.argv, "--data-parallel-start-rank") == "2"
    head_engine = [f for f in _engine_flags(head) if f != "--lora-modules" and "=" not in f]
    assert _engine_flags(worker.argv) == head_engine  # LoRA slots and rank included: the head loads into every rank
    for api_only in ("--port", "--host", "--served-model-name", "--lora-modules"):
        assert api_only not in worker.argv
    assert "VLLM_API_KEY" not in worker.env


def test_one_node_replicas_keep_their_command_and_refuse_a_worker():
    cfg = load_config(CONFIGS / "tiny-cpu.yaml")
    assert "--data-parallel-size-local" not in build_command(cfg, "m", [], port=8000).argv
    with pytest.raises(ConfigError, match="--headless needs a replica that spans nodes"):
        build_worker_command(cfg, "m", start_rank=1)


@pytest.mark.parametrize("rank", [0, 3, 5])
def test_a_worker_s_start_rank_must_follow_the_head_s_ranks(rank):
    cfg = load_config(CONFIGS / "qwen3-vl-8b.yaml", NODES)
    with pytest.raises(ConfigError, match=f"--start-rank must be 1-2 \\(the head runs ranks 0-1 of 4\\), got {rank}"):
        build_worker_command(cfg, "m", start_rank=rank)


def test_a_replica_over_nodes_without_address_port_or_lora_limits_names_every_missing_setting():
    with pytest.raises(ConfigError) as refused:
        load_config(CONFIGS / "tiny-cpu.yaml", ["engine.data_parallel_size=2", "engine.data_parallel_size_local=1"])
    for name in ("data_parallel_address", "data_parallel_rpc_port", "max_loras"):
        assert f"engine.{name}" in str(refused.value)
    assert "engine.max_lora_rank" not in str(refused.value)  # tiny-cpu.yaml sets it
    with pytest.raises(ConfigError, match="data_parallel_size_local must be 1-2"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["engine.data_parallel_size=2", "engine.data_parallel_size_local=3"])
