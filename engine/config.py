"""Recipes as strict, frozen, typed configs.

A script declares its config as nested frozen dataclasses; a recipe YAML maps onto them 1:1.
The CLI grammar is the same for every script:

    python train_x.py --recipe recipes/large.yaml [--print-config] section.key=value ...

Every problem (unknown key, wrong type, invalid choice, missing field) is collected and reported
at once, each naming where it came from (the recipe file or "command line"), the dotted key,
what was expected and, for misspelt keys, a did-you-mean. `cli()` turns that into exit status 2
with no traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

from engine.checkpoint import atomic_write_text

COMMAND_LINE = "command line"
_NONE_WORDS = ("None", "none", "null", "Null", "~")
# A decimal number as YAML 1.2 and Python write it. PyYAML (YAML 1.1) reads "2e-3" as a string (it wants
# "2.0e-3"); a float field takes such a string, in a recipe and on the command line alike.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


class ConfigError(Exception):
    """One or more problems with a recipe; `problems` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class _CliText(str):
    """A value typed on the command line: parsed by the target field's type, not by YAML alone."""


# --------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
        return f"a list of {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


class _Converter:
    def __init__(self, path_source: Callable[[str], str]):
        self.source = path_source
        self.problems: list[str] = []

    def fail(self, key: str, msg: str) -> None:
        self.problems.append(f"{self.source(key)}: {key}: {msg}")

    def convert(self, value: Any, tp: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        if isinstance(value, _CliText) and tp is not str:
            value = self._parse_cli(value, tp)
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, key)
        if origin in (Union, types.UnionType):
            args = typing.get_args(tp)
            if value is None or (isinstance(value, _CliText) and value in _NONE_WORDS):
                if type(None) in args:
                    return None
            non_none = [a for a in args if a is not type(None)]
            if value is None:
                self.fail(key, f"expected {_type_name(tp)}, got null")
                return None
            if len(non_none) == 1:
                return self.convert(value, non_none[0], key)
            for a in non_none:  # first alternative that takes the value without complaint
                sub = _Converter(self.source)
                out = sub.convert(value, a, key)
                if not sub.problems:
                    return out
            self.fail(key, f"expected {_type_name(tp)}, got {value!r}")
            return None
        if origin is Literal:
            choices = typing.get_args(tp)
            if value in choices:
                return value
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            self.fail(key, f"invalid choice {value!r}: expected one of {', '.join(map(repr, choices))}{extra}")
            return None
        if origin in (list, tuple):
            if not isinstance(value, (list, tuple)):
                self.fail(key, f"expected {_type_name(tp)}, got {value!r}")
                return None
            args = typing.get_args(tp)
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    self.fail(key, f"expected {_type_name(tp)}, got {len(value)} items: {value!r}")
                    return None
                return tuple(self.convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
            item = args[0] if args else Any
            out = [self.convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(out) if origin is tuple else out
        if tp is Any:
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str) and _NUMBER.fullmatch(value):
                return float(value)
        elif tp is str:
            if isinstance(value, str):
                return str(value)
        else:
            raise TypeError(f"config field {key}: unsupported annotation {tp!r}")
        self.fail(key, f"expected {_type_name(tp)}, got {value!r}")
        return None

    @staticmethod
    def _parse_cli(text: str, tp: Any) -> Any:
        if text in _NONE_WORDS:
            return None
        try:
            return yaml.load(text, Loader=_Loader)
        except yaml.YAMLError:
            return text

    def build(self, cls: type, raw: Any, prefix: str) -> Any:
        if not isinstance(raw, dict):
            self.fail(prefix or "<top>", f"expected {_type_name(cls)}, got {raw!r}")
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        problems_before = len(self.problems)
        for name, value in raw.items():
            key = f"{prefix}.{name}" if prefix else str(name)
            if name not in fields:
                hint = difflib.get_close_matches(str(name), list(fields), n=1, cutoff=0.6)
                extra = f" (did you mean {(prefix + '.' if prefix else '') + hint[0]!r}?)" if hint else ""
                valid = ", ".join(fields)
                self.fail(key, f"unknown key{extra}; valid keys here: {valid}")
                continue
            kwargs[name] = self.convert(value, hints[name], key)
        for name, f in fields.items():
            if name in kwargs:
                continue
            key = f"{prefix}.{name}" if prefix else name
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                if dataclasses.is_dataclass(hints[name]):
                    kwargs[name] = self.build(hints[name], {}, key)
                else:
                    self.fail(key, f"missing: expected {_type_name(hints[name])} (this field has no default)")
        if len(self.problems) > problems_before:
            return None  # reported above; cross-field checks need every field well-typed
        obj = cls(**kwargs)
        check = getattr(obj, "validate", None)
        if check is not None:
            for key, msg in check():
                self.fail(f"{prefix}.{key}" if prefix else key, msg)
        return obj


# --------------------------------------------------------------------------- loading


class _DuplicateKey(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: its keys may be overridden here
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, typing.Hashable) and key in seen:
                    raise _DuplicateKey(f"line {line}: key {key!r} is given twice (first on line {seen[key]}); "
                                        "a recipe names each key once")
                if isinstance(key, typing.Hashable):
                    seen[key] = line
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: recipe file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory; expected a recipe file (YAML)"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not a text file (byte {exc.start} is not UTF-8); expected a recipe "
                           "file (YAML)"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the recipe ({exc.strerror or exc})"]) from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except _DuplicateKey as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}"])
    return raw


def load_config_dict(path: str | Path) -> dict:
    """A recipe or config.yaml as a plain nested dict (no type checks)."""
    return _read_yaml(Path(path))


def parse_overrides(overrides: list[str]) -> tuple[dict, set[str], list[str]]:
    """`a.b=c` strings -> nested dict of _CliText, the set of dotted keys, and malformed ones."""
    nested: dict = {}
    keys: set[str] = set()
    bad: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or any(not part for part in key.split(".")):
            bad.append(f"{COMMAND_LINE}: {item!r}: expected section.key=value")
            continue
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                bad.append(f"{COMMAND_LINE}: {key}: conflicts with an earlier override")
                break
        else:
            node[parts[-1]] = _CliText(value)
            keys.add(key)
    return nested, keys, bad


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(cls: type, recipe: str | Path | None, overrides: list[str] = ()) -> Any:
    """Build `cls` from a recipe file plus dotted overrides; raise ConfigError listing every problem."""
    raw: dict = {}
    problems: list[str] = []
    file_label = str(recipe) if recipe is not None else "<no recipe>"
    if recipe is not None:
        raw = _read_yaml(Path(recipe))
    file_keys = set(_dotted_keys(raw))
    cli, cli_keys, bad = parse_overrides(list(overrides))
    problems += bad
    raw = _merge(raw, cli)

    def source(key: str) -> str:
        plain = key.split("[")[0]
        parts = plain.split(".")
        prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
        # a key typed on the command line, or a section that only the command line mentions
        if prefixes & cli_keys or (plain not in file_keys and any(k.startswith(plain + ".") for k in cli_keys)):
            return COMMAND_LINE
        return file_label

    conv = _Converter(source)
    cfg = conv.build(cls, raw, "")
    problems += conv.problems
    if problems:
        raise ConfigError(problems)
    return cfg


def _dotted_keys(raw: dict, prefix: str = ""):
    for k, v in raw.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _dotted_keys(v, f"{prefix}{k}.")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


class _Dumper(yaml.SafeDumper):
    """Sections as blocks, lists inline: `scale: [0.08, 1.0]`."""


_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def dump_config(cfg: Any) -> str:
    return yaml.dump(to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(Path(path), dump_config(cfg))


# --------------------------------------------------------------------------- the shared CLI


def cli(cls: type, argv: list[str] | None = None, derived: Callable[[Any], dict] | None = None,
        prog: str | None = None) -> Any:
    """Parse `--recipe PATH [--print-config] key=value ...` into `cls`.

    Config problems print one line each to stderr and exit with status 2 (no traceback).
    `--print-config` prints the resolved config and `derived(cfg)` and exits 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).name
    usage = f"usage: {prog} --recipe PATH [--print-config] [--check-data] [section.key=value ...]"
    recipe = None
    print_config = False
    overrides: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("-h", "--help"):
            print(usage)
            print(_field_help(cls))
            sys.exit(0)
        elif arg == "--recipe":
            recipe = next(it, None)
            if recipe is None:
                _die(prog, [f"{COMMAND_LINE}: --recipe needs a path"], usage)
        elif arg.startswith("--recipe="):
            recipe = arg.split("=", 1)[1]
        elif arg == "--print-config":
            print_config = True
        elif arg == "--check-data":  # decode every image up front (run.check_data), then train
            overrides.append("run.check_data=true")
        elif arg.startswith("-"):
            _die(prog, [f"{COMMAND_LINE}: unknown option {arg!r}"], usage)
        else:
            overrides.append(arg)
    if recipe is None:
        _die(prog, [f"{COMMAND_LINE}: --recipe PATH is required"], usage)
    try:
        cfg = load_config(cls, recipe, overrides)
    except ConfigError as exc:
        _die(prog, exc.problems, usage)
    if print_config:
        try:
            facts = derived(cfg) if derived is not None else None
        except ConfigError as exc:  # e.g. a global batch that processes x batch cannot meet, as main() says
            _die(prog, exc.problems, usage)
        print(dump_config(cfg), end="")
        if facts is not None:
            print("# derived")
            print(yaml.safe_dump({"derived": facts}, sort_keys=False), end="")
        sys.exit(0)
    return cfg


def _die(prog: str, problems: list[str], usage: str) -> typing.NoReturn:
    n = len(problems)
    print(f"{prog}: {n} problem{'s' if n != 1 else ''} with the configuration:", file=sys.stderr)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    print(usage, file=sys.stderr)
    sys.exit(2)


def _field_help(cls: type, prefix: str = "") -> str:
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(_field_help(hints[f.name], key + "."))
        else:
            lines.append(f"  {key}: {_type_name(hints[f.name])}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The `run` section every script shares."""

    output_dir: str
    seed: int
    device: str = "auto"                         # auto | cpu | cuda | cuda:N
    resume: str | None = None                    # None, "auto" (output_dir/checkpoints/last.pt) or a path
    eval_only: bool = False
    keep_checkpoints: int | None = None          # epoch_NNN.pt files kept; None keeps all (averaging needs them)
    print_freq: int = 50                         # steps between progress lines in batch jobs
    world_size: int | None = None                # processes the recipe was tuned for (documentation and
                                                 # --print-config; the global batch is what is enforced)
    global_batch: int | None = None              # images per optimizer step the recipe was tuned for; a run
                                                 # with fewer processes accumulates to it (train.accumulate)
    allow_changes: bool = False                  # resume even though the recipe changed (changes take effect)
    check_data: bool = False                     # decode every image before training (--check-data)
    divergence_factor: float | None = 10.0       # stop when a step's loss exceeds this x the run's starting
                                                 # loss (its first optimizer step's); None: off

    def validate(self):
        if self.keep_checkpoints is not None and self.keep_checkpoints < 0:
            yield "keep_checkpoints", f"expected a count >= 0 or null, got {self.keep_checkpoints}"
        if self.world_size is not None and self.world_size < 1:
            yield "world_size", f"expected a process count >= 1 or null, got {self.world_size}"
        if self.global_batch is not None and self.global_batch < 1:
            yield "global_batch", f"expected a positive number of images or null, got {self.global_batch}"
        if self.divergence_factor is not None and not self.divergence_factor > 1:
            yield "divergence_factor", f"expected a factor > 1 or null (off), got {self.divergence_factor}"
        if self.print_freq <= 0:
            yield "print_freq", f"expected a positive number of steps, got {self.print_freq}"
