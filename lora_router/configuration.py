"""One way to configure every command: typed config dataclasses, YAML then flags, types checked in one place.

    @dataclass
    class Args:
        data: Path = field(metadata={"help": "Input JSONL."})
        limit: int | None = field(default=None, metadata={"help": "Only the first N lines."})

        def __post_init__(self) -> None:
            check_types(self)

    def main(argv=None) -> int:
        return run_command(lambda: work(*parse_command(Args, argv, prog="python -m pkg.mod")))

- Flags come from the dataclass fields (DataclassArgumentParser: HfArgumentParser's conventions, without
  transformers: `--field_name` and `--field-name` both work; `--flag True|False` for booleans), with the field's
  help text and default. The trainer passes `parser_class=HfArgumentParser` for transformers' own arguments.
  A dict field's flag takes `key=value,key=value`; metadata `"action": Repeated` makes a list flag take one
  value per use (`--set a=1 --set b=2`); `positional=` names fields given by position.
- `--config FILE.yaml` gives settings by field name; precedence is defaults < YAML < flags. Commands whose
  `--config` is a deployment YAML (serving, the client, the benchmarks) pass `yaml_option=False`.
- `check_types` is the one place a value's type is checked and coerced (YAML reads `2e-3` as a string; it
  becomes a float here, and `max_pixels: abc` is refused with a message naming the key). `from_mapping`
  builds nested sections from YAML the same way. Every problem is reported at once.
- `run_command` prints an error once, as `error: ...`, with exit status 2 for a bad setting and 1 for a
  failure while running.

This is the shared core: training, serving, router_client and benchmarks all configure themselves this way.
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


def check_types(obj: Any, where: str = "", error: type[ConfigError] = ConfigError) -> None:
    """Check and coerce, in place, every field of dataclass `obj` (frozen ones too) against its annotation.

    Raises one `error` (ConfigError or a subclass) listing every field at fault, each named `where.field`.
    """
    hints = typing.get_type_hints(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        name = f"{where}.{f.name}" if where else f.name
        try:
            object.__setattr__(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], name))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise error("; ".join(problems))


def from_mapping(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping (as read from YAML), nested sections included.

    Every problem (unknown or missing keys, values of the wrong type, in any section) is named by its path,
    e.g. `engine.max_pixels`, and all are raised together in one ConfigError; then the class checks itself.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    problems = []
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        place = f"key(s) in {where}" if where else "top-level key(s)"
        problems.append(f"unknown {place}: {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        problems.append(f"{where or 'config'}: missing required key(s): {', '.join(missing)}")
    values, bad_values = {}, False
    for name in [n for n in data if n in fields]:
        try:
            values[name] = _nested(data[name], hints[name], f"{where}.{name}" if where else name)
        except ConfigError as exc:
            problems.append(str(exc))
            bad_values = True
    if not missing and not bad_values:
        # Beside unknown keys, the class's own checks on the known ones: every problem in one message.
        try:
            built = cls(**values)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("; ".join(problems))
    return built


def _nested(value: Any, hint: Any, where: str) -> Any:
    """A field's value from YAML: sections (dataclasses, optional or in lists) built by from_mapping, any other
    value coerced to the field's type."""
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value or {}, where)
    if typing.get_origin(hint) in (Union, types.UnionType) and len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
        return None if value is None else from_mapping(inner[0], value, where)
    if typing.get_origin(hint) is list and inner and dataclasses.is_dataclass(inner[0]):
        value = [] if value is None else value  # an empty YAML list (`experts:`) reads as null
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        built, problems = [], []
        for i, item in enumerate(value):
            try:
                built.append(from_mapping(inner[0], item, f"{where}[{i}]"))
            except ConfigError as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError("; ".join(problems))
        return built
    if value is None and typing.get_origin(hint) is dict:
        return {}  # an empty YAML section (`client:`) reads as null
    return _coerce(value, hint, where)


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

class Repeated(argparse.Action):
    """A list flag that takes one value and may be repeated (`--set a=1 --set b=2`), so it never swallows the
    positional arguments after it. Give it as the field's metadata `"action": Repeated`."""

    def __init__(self, option_strings: Sequence[str], dest: str, nargs: Any = None, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)  # the list field's nargs="+" dropped: one value a flag

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), values])


def parse_mapping(text: str) -> dict[str, str]:
    """A dict field's flag value `a=1,b=2` as {'a': '1', 'b': '2'}; check_types then types the values."""
    pairs = [pair for pair in text.split(",") if pair.strip()]
    if not all("=" in pair for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return {key.strip(): value.strip() for key, value in (pair.split("=", 1) for pair in pairs)}


def _string_to_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[text.strip().lower()]
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class DataclassArgumentParser(argparse.ArgumentParser):
    """argparse over config dataclasses, one flag per field, as HfArgumentParser does it (same interface, same
    conventions), so that a client command does not import transformers to read its flags.

    `--field_name` and `--field-name` (and metadata `aliases`); other metadata (help, action, choices) goes to
    add_argument. Optional[X] is X; a Literal is its choices; a bool takes an optional value (`--flag` is true)
    and, when it defaults to true, `--no_flag`; a list takes one or more values.
    """

    def __init__(self, dataclass_types: Sequence[type], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataclass_types = list(dataclass_types)
        for cls in self.dataclass_types:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.init:
                    self._add_field(f, hints[f.name])

    def _add_field(self, f: dataclasses.Field, hint: Any) -> None:
        options = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kwargs = dict(f.metadata)
        aliases = kwargs.pop("aliases", [])
        options += [aliases] if isinstance(aliases, str) else list(aliases)
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (Union, types.UnionType) and len(inner) == 1:
            hint = inner[0]
        default = (f.default if f.default is not dataclasses.MISSING else
                   f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if typing.get_origin(hint) is Literal:
            choices = {str(c): c for c in typing.get_args(hint)}
            kwargs.update(choices=list(choices.values()), type=lambda text: choices.get(text, text))
        elif hint is bool:
            kwargs.update(type=_string_to_bool, nargs="?", const=True)
            default = False if default is dataclasses.MISSING else default
        elif typing.get_origin(hint) is list:
            kwargs.update(type=typing.get_args(hint)[0], nargs="+")
        else:
            kwargs["type"] = hint
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        self.add_argument(*options, **kwargs)
        if hint is bool and default is True:
            self.add_argument(f"--no_{f.name}", f"--no-{f.name.replace('_', '-')}", action="store_false",
                              dest=f.name, help=f"Sets {f.name} to false.")

    def parse_args_into_dataclasses(self, args: Sequence[str] | None = None, return_remaining_strings: bool = False,
                                    look_for_args_file: bool = False) -> tuple[Any, ...]:
        """The dataclasses from the command line, then a Namespace of any other arguments, then (if asked) the
        strings no argument took."""
        namespace, remaining = self.parse_known_args(args)
        outputs: list[Any] = []
        for cls in self.dataclass_types:
            keys = {f.name for f in dataclasses.fields(cls) if f.init}
            outputs.append(cls(**{k: v for k, v in vars(namespace).items() if k in keys}))
            for key in keys & set(vars(namespace)):
                delattr(namespace, key)
        if vars(namespace):
            outputs.append(namespace)
        return (*outputs, remaining) if return_remaining_strings else tuple(outputs)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written; an optional flag's default after its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default in (None, argparse.SUPPRESS, [], {})
        if action.required or action.nargs == 0 or unset or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """DataclassArgumentParser (or `parser_class`, e.g. transformers' HfArgumentParser) over the command's
    dataclasses, plus `--config FILE.yaml` (defaults < YAML < flags).

    `yaml_option=False` leaves `--config` to the command (the deployment YAML of serving and the client, say).
    Fields named in `positional` are given by position instead of by flag. A dict field's flag takes
    `key=value,key=value`, a tuple field's one or more values; a field that is itself a dataclass (a nested
    section) has no flag.
    """

    def __init__(self, dataclass_types: Sequence[type], *, prog: str, description: str | None = None,
                 yaml_option: bool = True, positional: Sequence[str] = (),
                 parser_class: type = DataclassArgumentParser) -> None:
        self._parser = parser_class(list(dataclass_types), prog=prog, description=description,
                                    formatter_class=_HelpFormatter, allow_abbrev=False)
        self.yaml_option = yaml_option
        if yaml_option:
            self._parser.add_argument("--config", type=Path, default=None,
                                  help="YAML file of settings named like the flags (snake_case); flags win over it")
        flags = {a.dest: a for a in self._parser._actions}
        for cls in dataclass_types:
            for name, hint in typing.get_type_hints(cls).items():
                if name not in flags:  # init=False fields have none
                    continue
                inner = [a for a in typing.get_args(hint) if a is not type(None)]
                kind = inner[0] if typing.get_origin(hint) in (Union, types.UnionType) and len(inner) == 1 else hint
                if dataclasses.is_dataclass(kind):
                    self._parser.set_defaults(**{name: self._drop_flag(flags[name]).default})
                elif kind is dict or typing.get_origin(kind) is dict:
                    flags[name].type, flags[name].metavar = parse_mapping, "KEY=VALUE[,KEY=VALUE...]"
                elif typing.get_origin(kind) is tuple:  # like a list: one or more values, check_types makes the tuple
                    flags[name].type, flags[name].nargs = typing.get_args(kind)[0], "+"
        for name in positional:
            flag = self._drop_flag(flags[name])
            optional = {} if flag.required else {"nargs": "?", "default": flag.default}
            self._parser.add_argument(name, type=flag.type, help=flag.help, **optional)

    def _drop_flag(self, action: argparse.Action) -> argparse.Action:
        # What argparse itself does to an option replaced under conflict_handler="resolve".
        self._parser._handle_conflict_resolve(None, [(option, action) for option in list(action.option_strings)])
        return action

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """An extra argument outside the dataclasses; parse() returns it in a Namespace after them."""
        return self._parser.add_argument(*args, **kwargs)

    def add_argument_group(self, *args: Any, **kwargs: Any) -> argparse._ArgumentGroup:
        """A titled group of extra arguments (per-class flags, say); parse() returns them in the Namespace."""
        return self._parser.add_argument_group(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self._parser.error(message)

    def parse(self, argv: Sequence[str] | None = None) -> tuple[Any, ...]:
        """The dataclasses (and a Namespace of extra arguments, if any were added), from YAML then flags.

        A bad flag or setting ends the process with status 2 and the message, as argparse does.
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        if self.yaml_option:
            # Read apart from the full parse, whose required flags the YAML may be what gives.
            early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            early.add_argument("--config", type=Path, default=None)
            config = early.parse_known_args(argv)[0].config
            if config is not None:
                try:
                    self._set_yaml_defaults(config)
                except ConfigError as exc:
                    self.error(str(exc))
        try:
            *parsed, unknown = self._parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                                   look_for_args_file=False)
        except (TypeError, ValueError) as exc:  # check_types and a dataclass's own __post_init__ checks
            self.error(str(exc))
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")  # argparse's own words
        extra = parsed[-1] if isinstance(parsed[-1], argparse.Namespace) else None
        if extra is not None:
            vars(extra).pop("config", None)  # already applied as defaults
            if not vars(extra):
                parsed = parsed[:-1]
        return tuple(parsed)

    def _set_yaml_defaults(self, path: Path) -> None:
        settings = load_yaml(path)
        # A key may be any of a flag's long names (aliases too: `evaluation_strategy` for `eval_strategy`).
        actions = {option[2:].replace("-", "_"): a for a in self._parser._actions for option in a.option_strings
                   if option.startswith("--") and a.dest not in ("help", "config")
                   and not isinstance(a, argparse._StoreFalseAction)}
        unknown = sorted(str(k) for k in settings if str(k).replace("-", "_") not in actions)
        if unknown:
            raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)}")
        defaults = {}
        for key, value in settings.items():
            action = actions[str(key).replace("-", "_")]
            dest = action.dest
            # argparse converts string defaults with the flag's type; convert the other scalars the same way.
            if value is not None and not isinstance(value, (str, list, dict)) and action.type is not None:
                value = str(value)
            defaults[dest] = value
            action.required = False  # given by the file
        self._parser.set_defaults(**defaults)


def parse_command(dataclass_types: type | Sequence[type], argv: Sequence[str] | None = None, *, prog: str,
                  description: str | None = None, yaml_option: bool = True,
                  positional: Sequence[str] = ()) -> tuple[Any, ...]:
    """Parse a command line into its config dataclass(es); see ArgumentParser."""
    if isinstance(dataclass_types, type):
        dataclass_types = [dataclass_types]
    return ArgumentParser(dataclass_types, prog=prog, description=description, yaml_option=yaml_option,
                          positional=positional).parse(argv)


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
