"""Every command line is built the same way: a typed dataclass parsed by lora_router.configuration, with help on
every flag, and `--help` that works."""

from __future__ import annotations

import importlib

import pytest

from lora_router import configuration

COMMANDS = ["serving.__main__", "serving.admin", "router_client.__main__", "router_client.batch", "benchmarks.quickstart",
            "benchmarks.load", "benchmarks.soak", "benchmarks.random_8b", "training.generate_dataset",
            "training.convert_routing_to_classification", "training.expert_datasets", "training.evaluate_expert",
            "training.validate_router", "training.pretrain", "training.tiny_model", "training.random_adapter",
            "training.screens.sheet"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_flag_has_help_and_help_works(module, monkeypatch, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "usage: python -m " in capsys.readouterr().out

    def no_help(parser, argv=None):
        raise SystemExit([a.option_strings or a.dest for a in parser._parser._actions if not a.help])

    monkeypatch.setattr(configuration.ArgumentParser, "parse", no_help)
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == []


# command -> (module, its arguments dataclass, what it needs besides the deployment flags, parse options)
DEPLOYMENT_COMMANDS = {
    "serving": ("serving.__main__", "ServeArguments", [], {}),
    "admin": ("serving.admin", "AdminArguments", ["promote"], {"positional": ["action"]}),
    "one screenshot": ("router_client.__main__", "RouteArguments", ["screen.png"], {"positional": ["image"]}),
    "batch": ("router_client.batch", "BatchArguments", ["--input", "in", "--output", "out.jsonl"], {}),
    "quickstart": ("benchmarks.quickstart", "QuickstartArguments", [], {}),
    "load test": ("benchmarks.load", "LoadArguments", [], {}),
}


@pytest.mark.parametrize("name", list(DEPLOYMENT_COMMANDS))
def test_every_deployment_command_takes_config_and_set_the_same_way(name, tmp_path):
    module, cls, extra, kwargs = DEPLOYMENT_COMMANDS[name]
    arguments = getattr(importlib.import_module(module), cls)
    path = tmp_path / "configs" / "d.yaml"
    path.parent.mkdir()
    path.write_text("experts: [{name: a, path: ck/a}]\nengine: {port: 9000}\n")
    argv = ["--config", str(path), "--set", "engine.port=9100", *extra, "--set", "engine.kv_cache_gib=2e0"]
    args = configuration.parse_command(arguments, argv, prog=name, yaml_option=False, **kwargs)[0]
    deployment = args.deployment()
    assert (deployment.engine.port, deployment.engine.kv_cache_gib) == (9100, 2.0)
    assert deployment.adapter_path(deployment.experts[0]) == tmp_path / "ck" / "a"
