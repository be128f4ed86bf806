"""Benchmarks: the pieces without a server (metrics parsing, the plan, the peer tool's input, the random 8B
writer on a scaled-down shape), and a smoke run against a real tiny server (report shape, every request
accounted for; no timing asserted)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from benchmarks import peer, random_8b
from benchmarks.config import BenchConfig
from benchmarks.report import write_report
from benchmarks.runner import build_plan, phase_name, run_benchmark
from benchmarks.server_metrics import parse_metrics
from benchmarks.workloads import two_stage
from router_client import PreparedImage

METRICS = """\
# HELP vllm:mm_cache_hits_total Multi-modal cache hits
vllm:mm_cache_hits_total{engine="0",model_name="base"} 3.0
vllm:mm_cache_hits_total{engine="1",model_name="base"} 2.0
vllm:mm_cache_queries_total{engine="0",model_name="base"} 10.0
vllm:mm_cache_hits_created{engine="0",model_name="base"} 1.7e+09
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="base"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="base"} 6.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="base"} 8.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="base"} 4.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="base"} 8.0
"""


def test_metrics_are_summed_over_engines_and_differenced():
    before = parse_metrics(METRICS)
    assert before.counters["vllm:mm_cache_hits_total"] == 5.0
    assert before.counters["vllm:generation_tokens_total"] == 0.0  # absent counters read as zero
    after = parse_metrics(METRICS.replace("} 3.0", "} 7.0").replace("} 10.0", "} 18.0"))
    delta = after.minus(before)
    assert delta.counters["vllm:mm_cache_hits_total"] == 4.0
    assert delta.ratio("vllm:mm_cache_hits_total", "vllm:mm_cache_queries_total") == 0.5
    assert delta.ttft_count == 0 and delta.ttft_quantile(0.5) is None


def test_ttft_quantiles_interpolate_inside_buckets():
    snap = parse_metrics(METRICS)
    assert snap.ttft_quantile(0.25) == pytest.approx(0.1)  # rank 2 is the top of the first bucket
    assert snap.ttft_quantile(0.5) == pytest.approx(0.3)  # rank 4: halfway through (0.1, 0.5]
    assert snap.ttft_quantile(0.99) == pytest.approx(0.5)  # in +Inf: the last finite bound


def test_plan_puts_compared_phases_side_by_side_and_names_them_once():
    bench = BenchConfig(concurrencies=[1, 4, 16, 32], compare_concurrency=16, per_expert_requests=2)
    plan = build_plan(bench, "one-token", ["calendar", "claim-window"])
    names = [p.name for p in plan.phases]
    assert len(names) == len(set(names))
    roles = plan.roles
    for role in ("two_stage_1", "router_1", "expert_1", "two_stage_c", "router_c", "expert_c", "mixed_c", "base_c",
                 "reduced_route_1", "reduced_two_stage_c"):
        assert getattr(roles, role) in names, role
    c = names.index(roles.router_c)
    assert names[c:c + 3] == [roles.router_c, roles.expert_c, roles.two_stage_c]
    assert names.index(roles.base_c) == names.index(roles.mixed_c) + 1
    for spec in plan.phases:
        if spec.reuse:
            assert names.index(spec.reuse) < names.index(spec.name)
    assert phase_name(two_stage("one-token"), 32) in names and names[-1] == phase_name(two_stage("one-token"), None)
    assert set(roles.per_expert) == {"calendar", "claim-window"}
    assert all("one-token" in n for n in roles.one_token)


def test_peer_dataset_carries_our_images_first_and_the_command_is_vllm_bench_serve(tmp_path):
    item = type("Item", (), {"image": PreparedImage("data:image/png;base64,AAAA", 4, 4, "x"), "prompt": "Do it."})
    path = tmp_path / "d.jsonl"
    peer.write_dataset([item, item], path)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                   {"type": "text", "text": "Do it."}]
    cmd = peer.bench_command(root_url="http://h:1", model="base", tokenizer="/m", experts=["a", "b"], dataset=path,
                             num_prompts=2, max_concurrency=2, output_len=7, seed=0, result_dir=tmp_path)
    assert cmd[1:3] == ["-m", "benchmarks.peer"]
    for flag, value in (("--dataset-name", "custom_image"), ("--backend", "openai-chat"),
                        ("--custom-output-len", "7"), ("--max-concurrency", "2")):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[cmd.index("--lora-modules") + 1:cmd.index("--lora-modules") + 3] == ["a", "b"]


SMALL_SHAPE = random_8b.Qwen3VLShape(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
    mrope_section=(12, 10, 10), intermediate_size=256, vocab_size=2048, regular_tokens=2000,
    max_position_embeddings=8192, vision_depth=2, vision_hidden_size=64, vision_intermediate_size=128,
    vision_heads=4, num_position_embeddings=1024, deepstack_visual_indexes=(0, 1))


def test_random_model_on_a_scaled_down_shape_loads_and_passes_serving_checks(tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from serving.config import load_config

    path = random_8b.build(tmp_path, SMALL_SHAPE, rank=4, seed=0,
                           base_config=random_8b.REPO_ROOT / "configs" / "qwen3-vl-8b.yaml", shard_bytes=300_000)
    deployment = load_config(path)  # build() already ran serving's adapter checks on it
    assert deployment.model.path == str(tmp_path / "model")
    assert [a.name for a in deployment.adapters] == ["router", "calendar", "claim-window", "provider-select"]
    index = json.loads((tmp_path / "model" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["vocab_size"], vision["depth"]) == (128, 2, 2048, 2)
    assert text["rope_parameters"]["mrope_section"] == [12, 10, 10]
    # Qwen's special tokens follow the regular tokens in Qwen's order, as in the real tokenizer.
    assert (config["vision_start_token_id"], config["image_token_id"], text["eos_token_id"]) == (2009, 2012, 2002)
    model, info = Qwen3VLForConditionalGeneration.from_pretrained(str(tmp_path / "model"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert float(model.model.language_model.norm.weight.detach().float().mean()) == 1.0
    PeftModel.from_pretrained(model, str(tmp_path / "adapters" / "calendar"))
    assert AutoProcessor.from_pretrained(str(tmp_path / "model")).tokenizer.convert_tokens_to_ids("<|im_end|>") == 2002


def test_the_default_shape_is_qwen3_vl_8b():
    shape = random_8b.Qwen3VLShape()
    tokenizer = random_8b.build_tokenizer(shape)
    assert len(tokenizer) == 151669
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>",
                                                        "<|image_pad|>", "</think>")] == [151643, 151645, 151652,
                                                                                         151655, 151668]
    shapes = random_8b.weight_shapes(random_8b.build_config(shape, tokenizer))
    assert sum(random_8b._numel(s) for s in shapes.values()) == pytest.approx(8.767e9, rel=1e-3)
    assert shapes["model.language_model.embed_tokens.weight"] == (151936, 4096)
    assert shapes["model.language_model.layers.35.mlp.gate_proj.weight"] == (12288, 4096)
    assert shapes["model.language_model.layers.0.self_attn.k_proj.weight"] == (1024, 4096)
    assert shapes["model.visual.blocks.26.mlp.linear_fc1.weight"] == (4304, 1152)


@pytest.mark.integration
def test_smoke_run_accounts_for_every_request(served, tmp_path):
    bench = BenchConfig(base_url=served.base_url, concurrencies=[1, 2], min_requests=2, requests_per_slot=1,
                        per_expert_requests=1, compare_concurrency=2, warmup_requests=1, request_rate=4.0,
                        poisson_requests=2, class_mix={"calendar": 1, "claim-window": 1}, expert_max_tokens=4,
                        peer_requests=2, hf_requests=1)
    result = asyncio.run(run_benchmark(bench, served.config, tmp_path))
    paths = write_report(result, tmp_path)

    plan = build_plan(bench, result.setup["router_mode"], ["calendar", "claim-window"])
    by_name = {p.name: p for p in result.phases}
    assert list(by_name) == [spec.name for spec in plan.phases]
    for spec in plan.phases:
        phase = by_name[spec.name]
        records = [r for r in result.records if r.phase == spec.name]
        assert phase.screenshots == len(records) == spec.requests
        assert phase.completed + phase.failed == spec.requests
    assert len(result.records) == sum(spec.requests for spec in plan.phases)
    # No screenshot is sent twice, except to the router at reduced resolution, on purpose.
    reusing = {spec.name: spec.reuse for spec in plan.phases if spec.reuse}
    fresh = [r.index for r in result.records if r.phase not in reusing]
    assert len(fresh) == len(set(fresh))
    for name, source in reusing.items():
        assert {r.index for r in result.records if r.phase == name} == {
            r.index for r in result.records if r.phase == source}
    assert result.warmup["screenshots"] == len({(s.workload, bool(s.reduced_router or s.reuse)) for s in plan.phases})

    data = json.loads(paths["json"].read_text())
    expected = {"setup", "phases", "targets", "resolution", "baselines", "peer", "server", "warmup", "requests"}
    assert expected <= set(data)
    assert data["server"]["before"].keys() == data["server"]["after"].keys()
    assert len(data["requests"]) == len(result.records)
    assert {t["name"].split(":")[0] for t in data["targets"]} >= {"chaining adds nothing", "pipelining adds nothing"}
    assert [b["name"] for b in data["baselines"]] == ["hf-two-stage-inference", "hf-single-load"]
    assert data["peer"]["returncode"] == 0 and data["peer"]["result"]["completed"] == 2
    assert {a.mode for a in result.resolution} == {"choice", "one-token"}
    assert 0 < sum(a.pairs for a in result.resolution) <= sum(by_name[name].screenshots for name in reusing)
    markdown = paths["markdown"].read_text()
    for section in ("## Targets", "## Phases", "## vLLM /metrics counters", "vllm bench serve"):
        assert section in markdown
    for kind in ("latency", "throughput"):
        assert paths[kind].read_bytes()[:4] == b"\x89PNG"
    assert Path(tmp_path / peer.RESULT_FILE).exists()
