"""Bad deployments are refused before vLLM starts, each with a message naming the problem."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from lora_router.deployment import AdapterConfig, ConfigError, from_dict, load_config
from lora_router.manifest import MANIFEST_NAME, AdapterManifest
from serving.adapters import AdapterError, check_adapters
from serving.launcher import VLLMServer
from tests.conftest import EXPERTS, deployment
from training.random_adapter import make_random_adapter
from training.tiny_random import TinyModelSpec, build_tiny_model


@pytest.fixture(scope="module")
def bad_adapters(tmp_path_factory, tiny_model_dir):
    """Adapters that must be refused, each broken in one way."""
    root = tmp_path_factory.mktemp("bad")
    make_random_adapter(str(tiny_model_dir), root / "rank16", rank=16)
    make_random_adapter(str(tiny_model_dir), root / "dora", use_dora=True)
    make_random_adapter(str(tiny_model_dir), root / "saves", modules_to_save=["lm_head"])
    make_random_adapter(str(tiny_model_dir), root / "router4", labels=[*EXPERTS, "chandra-ocr"])
    other_base = build_tiny_model(TinyModelSpec(seed=5), tmp_path_factory.mktemp("other-base"))
    make_random_adapter(str(other_base), root / "other-base")
    return root


def _with_expert(adapters_dir, path, **engine):
    """The good deployment with its calendar expert replaced by the adapter at `path`."""
    cfg = deployment(adapters_dir, engine={"port": 0, **engine})
    cfg.experts[0].path = str(path)
    return cfg


CASES = [
    # (case, build the config from (good adapters, bad adapters, tmp), expected message fragment)
    ("missing adapter folder", lambda g, b, t: _with_expert(g, t / "nope"), "calendar: adapter folder not found"),
    ("rank above max", lambda g, b, t: _with_expert(g, b / "rank16", max_lora_rank=8), "rank 16 is above engine.max_lora_rank=8"),
    ("DoRA adapter", lambda g, b, t: _with_expert(g, b / "dora"), "calendar: DoRA adapters"),
    ("modules_to_save", lambda g, b, t: _with_expert(g, b / "saves"), "calendar: modules_to_save"),
    ("router labels differ from experts", lambda g, b, t: deployment(g, router={"name": "router", "path": str(b / "router4")}),
     "router labels ['calendar', 'claim-window', 'provider-select', 'chandra-ocr'] do not match"),
    ("max_loras too small", lambda g, b, t: deployment(g, engine={"port": 0, "max_loras": 2}), "engine.max_loras=2 is too small"),
    ("trained on another base", lambda g, b, t: _with_expert(g, b / "other-base"), "calendar: trained on another base model"),
]


@pytest.mark.parametrize("case, make, message", CASES, ids=[c[0] for c in CASES])
def test_bad_deployment_refused_before_vllm_starts(case, make, message, adapters_dir, bad_adapters, tmp_path):
    config = make(adapters_dir, bad_adapters, tmp_path)
    server = VLLMServer(config, log_path=tmp_path / "vllm.log")
    with pytest.raises(AdapterError) as info:
        asyncio.run(server.start())
    assert message in str(info.value)
    assert server.process is None and not (tmp_path / "vllm.log").exists()


def test_weights_on_the_vision_tower_are_refused(adapters_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "visual"
    shutil.copytree(adapters_dir / "calendar", bad)
    weights = load_file(bad / "adapter_model.safetensors")
    save_file({k.replace(".language_model.", ".visual."): v for k, v in weights.items()},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="on the vision tower"):
        check_adapters(_with_expert(adapters_dir, bad))


@pytest.fixture(scope="module")
def tower_adapter(tmp_path_factory, tiny_model_dir):
    """An all-linear adapter on the language model, the vision tower and its mergers."""
    return make_random_adapter(str(tiny_model_dir), tmp_path_factory.mktemp("tower") / "tower", vision_tower=True)


def test_a_vision_tower_adapter_needs_tower_lora(adapters_dir, tower_adapter, tiny_model_dir):
    with pytest.raises(AdapterError) as info:
        check_adapters(_with_expert(adapters_dir, tower_adapter), str(tiny_model_dir))
    (problem,) = info.value.problems
    # Named, with how to enable it and what that costs.
    assert problem.startswith("calendar: LoRA on the vision tower (its manifest says vision_tower: true)")
    for part in ("`engine.tower_lora: true`", "--set engine.tower_lora=true",
                 "keys the vision-encoder cache by adapter, so router and expert no longer share"):
        assert part in problem
    on = check_adapters(_with_expert(adapters_dir, tower_adapter, tower_lora=True), str(tiny_model_dir))
    assert on[1].path == tower_adapter


def test_vision_tower_weights_are_found_without_the_manifest_saying_so(adapters_dir, tower_adapter, tmp_path):
    # A manifest written before the vision_tower field: it reads as False, the weights still tell.
    old = tmp_path / "old"
    shutil.copytree(tower_adapter, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    del manifest["vision_tower"]
    (old / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert AdapterManifest.read(old).vision_tower is False
    with pytest.raises(AdapterError, match=r"calendar: LoRA on the vision tower \(\d+ LoRA weights such as "
                                           r"base_model\.model\.model\.visual\."):
        check_adapters(_with_expert(adapters_dir, old))


def test_the_admin_api_refuses_a_vision_tower_adapter_without_tower_lora(adapters_dir, tower_adapter):
    from serving.gateway.lifecycle import AdapterLifecycle
    from serving.gateway.metrics import GatewayMetrics
    from serving.gateway.protocol import GatewayError
    from serving.gateway.upstream import Upstream
    from serving.lifecycle import AdapterSet

    async def add(**engine) -> GatewayError:
        config = deployment(adapters_dir, router=None, experts=[], engine={"port": 0, "max_loras": 4, **engine},
                            gateway={"admin_api_key": "admin", "adapter_dirs": [str(tower_adapter.parent)]})
        lifecycle = AdapterLifecycle(config, Upstream("http://127.0.0.1:9", "key", 5), AdapterSet(None, ()),
                                     GatewayMetrics(),
                                     base=None, config_adapters=[])
        with pytest.raises(GatewayError) as info:
            await lifecycle.add_adapter("tower", str(tower_adapter), "")
        return info.value

    refused = asyncio.run(add())
    assert (refused.status, refused.code) == (400, "adapter_refused")
    assert "tower: LoRA on the vision tower" in refused.message and "engine.tower_lora" in refused.message
    # With tower_lora it passes the checks and goes on to load it into vLLM (not started here).
    assert asyncio.run(add(tower_lora=True)).code != "adapter_refused"


def test_good_deployment_passes_and_derives_rank(adapters_dir, tiny_model_dir):
    infos = check_adapters(deployment(adapters_dir), str(tiny_model_dir))
    assert [i.name for i in infos] == ["router", *EXPERTS]
    assert {i.rank for i in infos} == {8}


def test_every_problem_is_listed_at_once(adapters_dir, tmp_path):
    cfg = deployment(adapters_dir, engine={"port": 0, "max_loras": 1})
    cfg.experts[1].path = str(tmp_path / "gone")
    with pytest.raises(AdapterError) as info:
        check_adapters(cfg)
    assert len(info.value.problems) == 2


CONFIG_CASES = [
    ("unknown top-level key", {"expert": []}, "unknown top-level key(s): expert"),
    ("unknown engine key", {"engine": {"gpus": 2}}, "unknown key(s) in engine: gpus"),
    ("bad device", {"engine": {"device": "tpu"}}, "engine.device must be 'cpu' or 'cuda'"),
    ("rank vLLM does not accept", {"engine": {"max_lora_rank": 12}}, "engine.max_lora_rank must be one of"),
    ("duplicate adapter names", {"experts": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "repeated: a"),
    ("adapter without a path", {"experts": [{"name": "a"}]}, "experts[0]"),
    ("bad adapter name", {"experts": [{"name": "a b", "path": "x"}]}, "adapter name 'a b'"),
    ("base name clashes with adapter", {"model": {"served_name": "a"}, "experts": [{"name": "a", "path": "x"}]}, "clashes"),
    ("zero KV cache on CPU", {"engine": {"kv_cache_gib": 0}}, "kv_cache_gib must be > 0 on CPU"),
    ("negative kernel cache", {"engine": {"cpu_kernel_cache": -1}}, "engine.cpu_kernel_cache must be >= 0, got -1"),
]


@pytest.mark.parametrize("case, data, message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values_are_refused(case, data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert message in str(info.value)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "configs" / "d.yaml"
    path.parent.mkdir()
    path.write_text(json.dumps({"experts": [{"name": "a", "path": "ck/a"}], "engine": {"port": 9000}}))
    cfg = load_config(path, ["engine.port=9100", "engine.max_loras=4"])
    assert (cfg.engine.port, cfg.engine.max_loras) == (9100, 4)
    assert cfg.adapter_path(cfg.experts[0]) == tmp_path / "ck" / "a"  # relative to the project root
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["engine.port"])


def test_value_types_are_checked_in_one_place_and_every_problem_is_listed(tmp_path):
    with pytest.raises(ConfigError, match=r"engine\.max_pixels must be an integer, got 'abc'"):
        from_dict({"engine": {"max_pixels": "abc"}})
    path = tmp_path / "d.yaml"
    path.write_text("engine:\n  kv_cache_gib: 1e0\n  gpu_memory_utilization: 9e-1\nclient:\n  min_confidence: 5e-1\n")
    cfg = load_config(path)
    assert (cfg.engine.kv_cache_gib, cfg.engine.gpu_memory_utilization) == (1.0, 0.9)
    assert cfg.client.min_confidence == 0.5
    path.write_text("model: {served_name: 7}\nengine: {max_pixels: abc, port: http, gpus: 2}\n"
                    "experts: [{name: a}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["engine.max_num_seqs=many"])
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for part in ("model.served_name must be a string, got 7", "unknown key(s) in engine: gpus",
                 "engine.max_pixels must be an integer, got 'abc'", "engine.port must be an integer, got 'http'",
                 "engine.max_num_seqs must be an integer, got 'many'", "experts[0]: missing required key(s): path"):
        assert part in message


def test_client_and_serving_config_errors_are_one_kind():
    from lora_router.configuration import ConfigError as SharedConfigError
    from router_client.errors import ClientConfigError, RouterClientError

    assert ConfigError is SharedConfigError
    assert issubclass(ClientConfigError, SharedConfigError) and issubclass(ClientConfigError, RouterClientError)


@pytest.mark.parametrize("command", ["serving", "serving --check", "router_client", "router_client.batch",
                                     "serving.admin"])
def test_a_typo_in_the_routing_section_is_refused_by_every_command_before_anything_starts(command, tmp_path, capsys):
    import router_client.__main__
    import router_client.batch
    import serving.__main__
    import serving.admin

    mains = {"serving": serving.__main__.main, "router_client": router_client.__main__.main,
             "router_client.batch": router_client.batch.main, "serving.admin": serving.admin.main}
    module, *flags = command.split()
    path = tmp_path / "configs" / "d.yaml"
    path.parent.mkdir()
    path.write_text(load_config("configs/tiny-cpu.yaml").source.read_text().replace(
        "  fallback: error", "  fallback: expert:weather\n  min_confidense: 0.5\n  temperature: -1"))
    extra = {"router_client": [str(tmp_path / "screen.png")], "serving.admin": ["state"],
             "router_client.batch": ["--input", str(tmp_path), "--output", str(tmp_path / "out.jsonl")]}
    code = mains[module](["--config", str(path), *flags, *extra.get(module, [])])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: {path}: ") and len(err.strip().splitlines()) == 1
    for part in ("unknown key(s) in client: min_confidense", "client.temperature must be > 0"):
        assert part in err


@pytest.fixture
def model_with_processor(tmp_path):
    """A model folder whose processor resizes images to 8192-32768 pixels by default (as the tiny base's)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"size": {"shortest_edge": 8192, "longest_edge": 32768}}}))
    return folder


@pytest.mark.parametrize("trained, engine, refused", [
    ({"min_pixels": 8192, "max_pixels": 65536}, {}, ["trained at max_pixels=65536, but the engine serves "
                                                     "max_pixels=32768 (the model processor's default)"]),
    ({"min_pixels": 8192, "max_pixels": 65536}, {"max_pixels": 65536}, []),
    ({"min_pixels": 4096, "max_pixels": 32768}, {"min_pixels": 2048, "max_pixels": 32768},
     ["trained at min_pixels=4096, but the engine serves min_pixels=2048 (engine.min_pixels)"]),
    ({"min_pixels": 8192, "max_pixels": 65536}, {"accept_pixel_mismatch": True}, []),
    ({}, {"max_pixels": 65536}, []),  # a manifest from before the fields: nothing recorded, nothing compared
])
def test_an_adapter_trained_at_other_pixel_limits_is_refused_naming_both(tmp_path, model_with_processor, trained,
                                                                         engine, refused):
    from serving.adapters import check_adapter, served_pixel_limits
    from tests.gateway_on_fake import stand_in_adapter

    engine = from_dict({"engine": engine}).engine
    folder = stand_in_adapter(tmp_path / "calendar", **trained)
    problems, _ = check_adapter(AdapterConfig(name="calendar", path=str(folder)), folder, None, engine,
                                served_pixel_limits(engine, str(model_with_processor)))
    assert len(problems) == len(refused)
    for problem, words in zip(problems, refused):
        assert problem.startswith("calendar: ") and words in problem and "engine.accept_pixel_mismatch" in problem
