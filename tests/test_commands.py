"""Every command line is built the same way: a typed dataclass parsed by training.configuration, with help on
every flag, and `--help` that works."""

from __future__ import annotations

import importlib

import pytest

from training import configuration

COMMANDS = ["serving.__main__", "router_client.__main__", "router_client.batch", "router_client.quickstart",
            "benchmarks.load", "benchmarks.random_8b", "training.generate_dataset",
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
        raise SystemExit([a.option_strings or a.dest for a in parser._hf._actions if not a.help])

    monkeypatch.setattr(configuration.ArgumentParser, "parse", no_help)
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == []
