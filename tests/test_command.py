"""The vLLM command line a deployment config produces (no server started)."""

from __future__ import annotations

import json
from pathlib import Path

from serving.adapters import AdapterInfo
from serving.command import build_command, cpu_threads
from serving.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_production_8b_config_builds_a_gpu_command():
    cfg = load_config(CONFIGS / "qwen3-vl-8b.yaml")
    adapters = [AdapterInfo(a.name, cfg.adapter_path(a), 16) for a in cfg.adapters]
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
    assert modules == [f"{a.name}={cfg.adapter_path(a)}" for a in cfg.adapters]
    assert modules[0].startswith("router=") and modules[0].endswith("checkpoints/router-classifier")
    assert _flag(argv, "--gpu-memory-utilization") == "0.9"
    assert json.loads(_flag(argv, "--mm-processor-kwargs")) == {"size": {"shortest_edge": 262144, "longest_edge": 1310720}}
    assert json.loads(_flag(argv, "--limit-mm-per-prompt")) == {"image": 1, "video": 0}
    assert _flag(argv, "--tensor-parallel-size") == "1" and _flag(argv, "--data-parallel-size") == "1"
    assert not any(k.startswith("VLLM_CPU") for k in cmd.env)


def test_parallelism_key_and_rank_rounding_pass_through():
    cfg = load_config(CONFIGS / "qwen3-vl-8b.yaml",
                      ["engine.tensor_parallel_size=2", "engine.data_parallel_size=4", "engine.api_key=s3cret",
                       "engine.kv_cache_gib=20", "engine.extra_args=[--enforce-eager]"])
    adapters = [AdapterInfo(a.name, cfg.adapter_path(a), 12) for a in cfg.adapters]
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
