"""No dead recipe key: every leaf key of a script's Config, changed to another valid value, changes
something observable in a short in-process run of the script's own main().

What counts as observable is what a user can see afterwards: the run directory (metrics.jsonl
without timings, every tensor of every checkpoint, the files present, eval.json, report.md) and
the run's log with timings masked. config.yaml and env.json are left out: they echo every key, so
they would make every key look alive. A key that legitimately changes nothing in a short CPU run is
exempted by the caller, with a one-line reason.

Used by tests/test_recipe_keys.py (classification) and by each other script's test module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import torch

from engine.config import load_config

TIMING = re.compile(r"(eta \S+|img_s \S+|\S+ img/s|data-wait \S+|images_per_s\S*|\d+(\.\d+)? ?s\b)")


def leaf_keys(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


def get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(yaml_value(x) for x in v) + "]"
    return str(v)


def generic_alternative(tp: Any, value: Any) -> Any:
    """Another valid value of the same type (the caller overrides where the field's rules need more)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return generic_alternative(args[0], None)
        for a in args:
            if typing.get_origin(a) is Literal and value in typing.get_args(a):
                others = [b for b in args if b is not a]  # e.g. accumulate: "auto" -> an int
                return generic_alternative(others[0], None) if others else generic_alternative(a, value)
            if typing.get_origin(a) is not Literal and isinstance(value, _py(a)):
                return generic_alternative(a, value)
    if origin is Literal:
        choices = typing.get_args(tp)
        return choices[0] if value is None else choices[(choices.index(value) + 1) % len(choices)]
    if tp is bool:
        return not value
    if tp is int:
        return 2 if value is None else value + 1
    if tp is float:
        return 0.1 if value in (None, 0.0) else value * 1.5
    if origin in (list, tuple) and value is not None:
        v = list(value)
        v[-1] = v[-1] * 0.9 if isinstance(v[-1], float) else v[-1] + 1
        return v
    raise NotImplementedError(f"no generic alternative for {tp!r} = {value!r}; give one explicitly")


def _py(tp: Any) -> type:
    origin = typing.get_origin(tp)
    return {list: (list, tuple), tuple: (list, tuple)}.get(origin, tp if isinstance(tp, type) else object)


def fingerprint(run_dir: Path, log: str) -> dict[str, Any]:
    """What a user can observe of a finished run (see the module docstring)."""
    obs: dict[str, Any] = {}
    root = str(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        obs["metrics"] = [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait")} for r in rows]
    ckpts = run_dir / "checkpoints"
    obs["files"] = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")
                          if p.is_file() and "tensorboard" not in p.parts)
    if ckpts.is_dir():
        for p in sorted(ckpts.glob("*.pt")):
            state = torch.load(p, map_location="cpu", weights_only=True)
            obs[f"ckpt:{p.name}"] = _digest({k: v for k, v in state.items() if k not in ("config", "rng")})
    for name in ("eval.json", "report.md"):
        if (run_dir / name).exists():
            text = (run_dir / name).read_text().replace(root, "<run>")
            obs[name] = re.sub(r"(commit|hostname|date|time|python|torch\w*)\W+\S+", "", text)
    obs["log"] = [TIMING.sub("", line.replace(root, "<run>")) for line in log.splitlines()]
    return obs


def _digest(obj: Any) -> str:
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(str(k).encode())
                feed(o[k])
        elif isinstance(o, (list, tuple)):
            for x in o:
                feed(x)
        else:
            h.update(repr(o).encode())

    feed(obj)
    return h.hexdigest()


def dead_keys(cls: type, recipe: Path, base: list[str], run: Callable[[Any], None], out_root: Path,
              capture: Callable[[], str], alternatives: dict[str, tuple[list[str], Any]],
              exempt: dict[str, str]) -> tuple[list[str], list[str]]:
    """Run main once per key; returns (keys whose change was not observable, keys checked).

    alternatives: key -> (context overrides applied to both arms, the changed value); by default the
    context is empty and the value is generic_alternative(type, recipe value). Each arm writes to its
    own output directory; the directory name is masked, so only run.output_dir's own arm differs.
    """
    cache: dict[tuple[str, ...], dict] = {}

    def observe(overrides: list[str]) -> dict:
        key = tuple(overrides)
        if key not in cache:
            out = out_root / f"arm{len(cache)}"
            args = [*base, *overrides]
            if not any(a.startswith("run.output_dir=") for a in overrides):
                args.append(f"run.output_dir={out}")
            cfg = load_config(cls, recipe, args)
            capture()
            try:
                run(cfg)
            except Exception as exc:
                raise AssertionError(f"the run with {overrides} failed: {type(exc).__name__}: {exc}") from exc
            cache[key] = fingerprint(Path(cfg.run.output_dir), capture())
        return cache[key]

    dead, checked = [], []
    base_cfg = load_config(cls, recipe, base)
    for key, tp in leaf_keys(cls):
        if key in exempt:
            continue
        context, alt = alternatives.get(key, ([], None))
        if key not in alternatives:
            alt = generic_alternative(tp, get(base_cfg, key))
        checked.append(key)
        if observe(list(context)) == observe([*context, f"{key}={yaml_value(alt)}"]):
            dead.append(key)
    return dead, checked
