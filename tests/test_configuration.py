"""lora_router.configuration: one typed path from defaults, YAML and flags to a checked config, and one error line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lora_router.configuration import (
    CommandError,
    ConfigError,
    Repeated,
    apply_overrides,
    check_types,
    from_mapping,
    parse_command,
    run_command,
)


@dataclass
class Args:
    data: Path = field(metadata={"help": "Input JSONL."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    max_pixels: int | None = field(default=None, metadata={"help": "Largest image area."})
    bf16: bool = field(default=False, metadata={"help": "Train in bfloat16."})
    epochs: int = field(default=3, metadata={"help": "Passes over the data."})
    mix: dict[str, float] = field(default_factory=dict, metadata={"help": "Weight per class."})
    overrides: list[str] = field(default_factory=list, metadata={
        "help": "Overrides.", "aliases": ["--set"], "action": Repeated})

    def __post_init__(self) -> None:
        check_types(self)
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")


@dataclass
class Engine:
    port: int = field(default=8000, metadata={"help": "Port."})
    max_pixels: int | None = field(default=None, metadata={"help": "Largest image area."})
    kv_cache_gib: float = field(default=1.0, metadata={"help": "KV cache in GiB."})

    def __post_init__(self) -> None:
        check_types(self, "engine")


@dataclass
class Item:
    name: str = field(metadata={"help": "Name."})


@dataclass
class Deployment:
    engine: Engine = field(default_factory=Engine, metadata={"help": "Engine section."})
    items: list[Item] = field(default_factory=list, metadata={"help": "Items."})

    def __post_init__(self) -> None:
        check_types(self)


def parse(argv: list[str], **kwargs) -> Args:
    (args,) = parse_command(Args, argv, prog="test", **kwargs)
    return args


def test_defaults_then_yaml_then_flags(tmp_path):
    assert parse(["--data", "x.jsonl"]) == Args(data=Path("x.jsonl"))
    config = tmp_path / "run.yaml"
    config.write_text("data: from-yaml.jsonl\nepochs: 5\nlearning_rate: 2e-3\n")
    args = parse(["--config", str(config), "--epochs", "7"])
    assert (args.data, args.epochs, args.learning_rate) == (Path("from-yaml.jsonl"), 7, 0.002)
    assert parse(["--config", str(config), "--data", "flag.jsonl"]).data == Path("flag.jsonl")


def test_both_flag_spellings_booleans_and_repeated_lists():
    snake = parse(["--data", "d", "--max_pixels", "1024", "--learning_rate", "1e-4", "--bf16", "True"])
    kebab = parse(["--data", "d", "--max-pixels", "1024", "--learning-rate", "1e-4", "--bf16", "true"])
    assert snake == kebab and (snake.max_pixels, snake.learning_rate, snake.bf16) == (1024, 1e-4, True)
    assert parse(["--data", "d", "--bf16", "False"]).bf16 is False
    assert parse(["--data", "d", "--bf16"]).bf16 is True
    assert parse(["--data", "d", "--set", "a.b=1", "--set", "c=[]"]).overrides == ["a.b=1", "c=[]"]
    assert parse(["--data", "d", "--mix", "calendar=27,claim-window=3e3"]).mix == {"calendar": 27.0,
                                                                                   "claim-window": 3000.0}


def test_positional_field():
    (args,) = parse_command(Args, ["--epochs", "2", "x.jsonl"], prog="test", positional=["data"])
    assert (args.data, args.epochs) == (Path("x.jsonl"), 2)


def test_help_shows_every_flag_with_its_help_and_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--learning_rate", "--learning-rate", "--max-pixels", "--bf16", "--mix", "--set",
                 "--config"):
        assert flag in text
    assert "Peak learning rate. (default: 0.001)" in text


@pytest.mark.parametrize("argv, message", [
    (["--data", "d", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    (["--data", "d", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--data", "d", "--mix", "calendar"], "expected KEY=VALUE"),
    (["--data", "d", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--data", "d", "--learn", "1"], "unrecognized arguments: --learn"),  # no abbreviations
    ([], "the following arguments are required: --data"),
])
def test_bad_flags_exit_2_with_the_problem(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_yaml_problems_are_named_with_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data: d\nepoch: 3\nlr: 1\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(config)])
    assert f"{config}: unknown setting(s) epoch, lr" in capsys.readouterr().err
    config.write_text("data: d\nmax_pixels: abc\nepochs: 1.5\n")
    with pytest.raises(SystemExit):
        parse(["--config", str(config)])
    assert "invalid int value: 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(["--config", str(tmp_path / "missing.yaml")])
    assert f"config file not found: {tmp_path / 'missing.yaml'}" in capsys.readouterr().err


def test_check_types_coerces_yaml_strings_and_lists_every_problem():
    args = Args(data="d", learning_rate="2e-3", max_pixels="1024", bf16="yes", mix={"a": "1e1"})
    assert (args.data, args.learning_rate, args.max_pixels, args.bf16, args.mix) == (Path("d"), 0.002, 1024, True,
                                                                                        {"a": 10.0})
    with pytest.raises(ConfigError) as info:
        Args(data=3, learning_rate="fast", max_pixels="abc", bf16="maybe")
    message = str(info.value)
    for part in ("data must be a path, got 3", "learning_rate must be a number, got 'fast'",
                 "max_pixels must be an integer, got 'abc'", "bf16 must be true or false, got 'maybe'"):
        assert part in message


def test_from_mapping_names_nested_keys_and_lists_every_problem():
    deployment = from_mapping(Deployment, {"engine": {"kv_cache_gib": "1e0", "max_pixels": 1024},
                                           "items": [{"name": "a"}]})
    assert deployment == Deployment(engine=Engine(max_pixels=1024), items=[Item("a")])
    assert isinstance(deployment.engine.kv_cache_gib, float)
    with pytest.raises(ConfigError, match=r"engine\.max_pixels must be an integer, got 'abc'"):
        from_mapping(Deployment, {"engine": {"max_pixels": "abc"}})
    with pytest.raises(ConfigError) as info:
        from_mapping(Deployment, {"engine": {"max_pixels": "abc", "port": "http", "gpus": 2},
                                  "items": [{"name": "a"}, {}], "extra": 1})
    message = str(info.value)
    for part in ("unknown top-level key(s): extra", "unknown key(s) in engine: gpus",
                 "engine.max_pixels must be an integer", "engine.port must be an integer",
                 "items[1]: missing required key(s): name"):
        assert part in message


def test_overrides_set_nested_values_read_as_yaml():
    data = apply_overrides({"engine": {"port": 1}}, ["engine.port=8001", "engine.kv_cache_gib=2e0", "items=[]"])
    assert data == {"engine": {"port": 8001, "kv_cache_gib": "2e0"}, "items": []}
    assert from_mapping(Deployment, data).engine.kv_cache_gib == 2.0
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_overrides({}, ["engine.port"])


@pytest.mark.parametrize("error, status", [
    (ConfigError("engine.port must be an integer"), 2),
    (CommandError("no server answers at http://127.0.0.1:9/v1"), 1),
    (FileExistsError("output folder x exists"), 1),
])
def test_run_command_prints_one_error_line_and_exits(capsys, error, status):
    def work() -> int:
        raise error

    assert run_command(work, runtime_errors=(FileExistsError,)) == status
    captured = capsys.readouterr()
    assert captured.err == f"error: {error}\n" and captured.out == ""


def test_run_command_returns_the_work_status_and_leaves_other_errors_alone():
    assert run_command(lambda: None) == 0
    assert run_command(lambda: 3) == 3
    with pytest.raises(KeyError):
        run_command(lambda: {}["x"])
