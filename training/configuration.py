"""One way to configure every command: typed config dataclasses, YAML then flags, types checked in one place.

    @dataclass
    class Args:
        data: Path = field(metadata={"help": "Input JSONL."})
        limit: int | None = field(default=None, metadata={"help": "Only the first N lines."})

        def __post_init__(self) -> None:
            check_types(self)

    def main(argv=None) -> int:
        return run_command(lambda: work(*parse_command(Args, argv, prog="python -m pkg.mod")))

- Flags come from the dataclass fields through transformers' HfArgumentParser (`--field_name` and
  `--field-name` both work; `--flag True|False` for booleans), with the field's help text.
- `--config FILE.yaml` gives settings by field name; precedence is defaults < YAML < flags.
- `check_types` is the one place a value's type is checked and coerced (YAML reads `2e-3` as a string; it
  becomes a float here, and `max_pixels: abc` is refused with a message naming the key). Every problem is
  reported at once.
- `run_command` prints an error once, as `error: ...`, with exit status 2 for a bad setting and 1 for a
  failure while running.

This is the lowest layer: everything above (serving, router_client, benchmarks) configures itself this way.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


class ConfigError(ValueError):
    """Settings that cannot be used; the message names every key at fault and why."""


class CommandError(RuntimeError):
    """A command that failed while running, for a reason the user can act on (exit status 1)."""


# ------------------------------------------------------------------------------------------- type checking

def _coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as type `hint`, or raise ConfigError naming `where`; strings of numbers and booleans convert."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                problems.append(str(exc))
        raise ConfigError(problems[0] if len(problems) == 1 else f"{where}: no type of {hint} fits {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple, set) or hint in (list, tuple):
        if isinstance(value, str) or not isinstance(value, (list, tuple, set)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return (origin or hint)(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {_coerce(k, key_type, f"{where} key"): _coerce(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(f"{where} must be a {hint.__name__} section, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{where} must be a path, got {value!r}")
    return value


def check_types(obj: Any, where: str = "") -> None:
    """Check and coerce, in place, every field of dataclass `obj` against its annotation.

    Raises one ConfigError listing every field at fault, each named `where.field`.
    """
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        name = f"{where}.{f.name}" if where else f.name
        try:
            setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], name))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))


def from_mapping(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping (as read from YAML), nested sections included.

    Unknown and missing keys are named with their path; field types are checked by the class (check_types).
    """
    label = where or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {label}: {', '.join(map(str, unknown))} "
                          f"(known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        values[name] = _nested(value, hints[name], f"{where}.{name}" if where else name)
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{label}: missing required key(s): {', '.join(missing)}")
    return cls(**values)


def _nested(value: Any, hint: Any, where: str) -> Any:
    """Sections (dataclasses), lists of sections and optional sections built from mappings; other values as is."""
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value or {}, where)
    if typing.get_origin(hint) in (Union, types.UnionType) and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
        return None if value is None else from_mapping(inner[0], value, where)
    if typing.get_origin(hint) is list and inner and dataclasses.is_dataclass(inner[0]):
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        return [from_mapping(inner[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


# ------------------------------------------------------------------------------------------------- YAML

def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file; ConfigError naming the file if it is missing, not YAML or not a mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """Split a `section.key=value` override; the value is read as YAML (8 is an int, null is None)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`data` with each `a.b.c=value` override set in place (nested sections created as needed)."""
    for text in overrides:
        dotted, value = parse_override(text)
        *parents, last = dotted.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node[last] = value
    return data


# ---------------------------------------------------------------------------------------------- commands

class ArgumentParser(argparse.ArgumentParser):
    """HfArgumentParser over the command's dataclasses, plus `--config FILE.yaml` (defaults < YAML < flags)."""

    def __init__(self, dataclass_types: Sequence[type], *, prog: str, description: str | None = None,
                 yaml_option: bool = True) -> None:
        from transformers import HfArgumentParser

        self._hf = HfArgumentParser(list(dataclass_types), prog=prog, description=description,
                                    formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        self.yaml_option = yaml_option
        if yaml_option:
            self._hf.add_argument("--config", type=Path, default=None,
                                  help="YAML file of settings named like the flags (snake_case); flags win over it")

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """An extra argument outside the dataclasses (a positional file, say); parse() returns it in a Namespace."""
        return self._hf.add_argument(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self._hf.error(message)

    def parse(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """The dataclasses (and a Namespace of extra arguments, if any were added), from YAML then flags.

        A bad flag or setting ends the process with status 2 and the message, as argparse does.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        if self.yaml_option:
            known, _ = self._hf.parse_known_args(argv)
            if known.config is not None:
                try:
                    self._set_yaml_defaults(known.config)
                except ConfigError as exc:
                    self.error(str(exc))
        try:
            parsed = self._hf.parse_args_into_dataclasses(argv, look_for_args_file=False)
        except ConfigError as exc:
            self.error(str(exc))
        except (TypeError, ValueError) as exc:  # a dataclass's own __post_init__ checks
            self.error(str(exc))
        extra = parsed[-1] if isinstance(parsed[-1], argparse.Namespace) else None
        if extra is not None:
            vars(extra).pop("config", None)  # already applied as defaults
            if not vars(extra):
                parsed = parsed[:-1]
        return tuple(parsed)

    def _set_yaml_defaults(self, path: Path) -> None:
        settings = load_yaml(path)
        # A key may be any of a flag's long names (aliases too: `evaluation_strategy` for `eval_strategy`).
        actions = {option[2:].replace("-", "_"): a for a in self._hf._actions for option in a.option_strings
                   if option.startswith("--") and a.dest not in ("help", "config")
                   and not isinstance(a, argparse._StoreFalseAction)}
        unknown = sorted(k for k in settings if str(k).replace("-", "_") not in actions)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(map(str, unknown))}")
        defaults = {}
        for key, value in settings.items():
            action = actions[str(key).replace("-", "_")]
            dest = action.dest
            # argparse converts string defaults with the flag's type; convert the other scalars the same way.
            if value is not None and not isinstance(value, (str, list, dict)) and action.type is not None:
                value = str(value)
            defaults[dest] = value
        self._hf.set_defaults(**defaults)


def parse_command(dataclass_types: type | Sequence[type], argv: Sequence[str] | None = None, *, prog: str,
                  description: str | None = None) -> tuple[Any, ...]:
    """Parse a command line into its config dataclass(es); see ArgumentParser."""
    if isinstance(dataclass_types, type):
        dataclass_types = [dataclass_types]
    return ArgumentParser(dataclass_types, prog=prog, description=description).parse(argv)


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines with time and source to stderr (idempotent); a command's result goes to stdout."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def run_command(work: Callable[[], int | None], runtime_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's body with logging set up; one `error: ...` line and an exit status on failure.

    2: a bad setting (ConfigError); 1: CommandError or one of `runtime_errors` while running; 130: Ctrl-C.
    """
    setup_logging()
    try:
        return int(work() or 0)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except (CommandError, *runtime_errors) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
