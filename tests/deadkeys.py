"""No dead recipe key: every leaf key of a script's Config, changed to another valid value, changes
something observable in a short in-process run of the script's own main().

What counts as observable is what a user can see afterwards: the run directory (metrics.jsonl
without timings, every tensor of every checkpoint, the files present, every JSON file such as
detections/epoch_NNN.json, eval.json, report.md, the images drawn in TensorBoard) and the run's
log with timings masked. What only echoes configuration is left out, since it would make every key
look alive: config.yaml, env.json, the report's provenance table, the log's summary of derived values. A key that legitimately changes nothing in a short CPU run is
exempted by the caller, with a one-line reason.

Used by tests/test_recipe_keys.py for every script.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import traceback
import types
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Literal, Union

import torch

from engine.config import load_config
from engine.errors import UserError

# What only repeats configuration values is not an effect: the log's summary of the derived values
# (lr, batch sizes, ...) and the report's provenance table; a key seen only there would look alive.
ECHO = re.compile(r"batch_per_process|global batch \d+ = ")
ECHO_SECTION = "## Provenance"
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
        seen: dict[tuple[int, int], str] = {}  # last.pt is a hard link to the newest epoch file
        for p in sorted(ckpts.glob("*.pt")):
            inode = (p.stat().st_dev, p.stat().st_ino)
            if inode not in seen:
                state = torch.load(p, map_location="cpu", weights_only=True)
                seen[inode] = _digest({k: v for k, v in state.items() if k not in ("config", "rng")})
            obs[f"ckpt:{p.name}"] = seen[inode]
    for p in sorted(run_dir.rglob("*.json")):  # e.g. detections/epoch_NNN.json (env.json: see above)
        if p.name not in ("env.json", "eval.json"):
            obs[f"json:{p.relative_to(run_dir)}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    if (run_dir / "tensorboard").is_dir():  # the drawn images (its scalars repeat metrics.jsonl)
        obs["images"] = _tensorboard_images(run_dir / "tensorboard")
    for name in ("eval.json", "report.md"):
        if (run_dir / name).exists():
            text = (run_dir / name).read_text().replace(root, "<run>").split(ECHO_SECTION)[0]
            obs[name] = re.sub(r"(commit|hostname|date|time|python|torch\w*)\W+\S+", "", text)
    obs["log"] = [TIMING.sub("", line.replace(root, "<run>")) for line in log.splitlines() if not ECHO.search(line)]
    return obs


def _tensorboard_images(folder: Path) -> list[tuple[str, int, str]]:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={IMAGES: 0}).Reload()
    return [(tag, e.step, hashlib.sha256(e.encoded_image_string).hexdigest())
            for tag in sorted(events.Tags()["images"]) for e in events.Images(tag)]


def _digest(obj: Any) -> str:
    h = hashlib.sha256()

    def feed(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())
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


def dead_keys(script: str, recipe: Path, base: list[str], out_root: Path,
              alternatives: dict[str, tuple[list[str], Any]], exempt: dict[str, str],
              workers: int | None = None) -> tuple[list[str], list[str]]:
    """Run the script's main() once per key; returns (keys whose change was not observable, keys checked).

    script: the module name (e.g. "train_detection"); its Config and main are used. alternatives: key ->
    (context overrides applied to both arms, the changed value); by default the context is empty and the
    value is generic_alternative(type, recipe value). Each arm writes to its own output directory; the
    directory name is masked, so only run.output_dir's own arm differs. The unchanged arm must run; the
    changed one may be refused with a clear error (engine.errors.UserError, e.g. a checkpoint that does
    not fit model.num_classes): the refusal is its observable effect.

    The arms are independent runs, so they run in `workers` spawned processes (default: up to 4, one
    per core; kept for the session's later walks) of one thread each: the same thread count in every arm
    keeps CPU results bit-comparable, and tiny runs scale better over processes than over threads.
    """
    cls = importlib.import_module(script).Config
    base_cfg = load_config(cls, recipe, base)
    pairs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    for key, tp in leaf_keys(cls):
        if key in exempt:
            continue
        context, alt = alternatives.get(key, ([], None))
        if key not in alternatives:
            alt = generic_alternative(tp, get(base_cfg, key))
        pairs[key] = (tuple(context), (*context, f"{key}={yaml_value(alt)}"))
    arms = list(dict.fromkeys(arm for pair in pairs.values() for arm in pair))
    jobs = [(script, str(recipe), [*base, *arm], str(out_root / f"arm{i}"), str(out_root)) for i, arm in enumerate(arms)]
    observed = dict(zip(arms, _pool(workers).map(_observe, jobs)))
    unchanged = {arm for arm, _ in pairs.values()}
    for arm, obs in observed.items():
        if "failed" in obs or (arm in unchanged and "refused" in obs):
            raise AssertionError(f"the run with {list(arm)} failed: {obs.get('failed') or obs['refused']}")
    dead = [key for key, (a, b) in pairs.items() if observed[a] == observed[b]]
    return dead, list(pairs)


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _pool(workers: int | None) -> ProcessPoolExecutor:
    """One pool of spawned workers per size for the whole test session: every walk after the first skips
    the workers' start (importing torch and the scripts, seconds each)."""
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    if workers not in _POOLS:
        _POOLS[workers] = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_one_thread)
        atexit.register(_POOLS[workers].shutdown)
    return _POOLS[workers]


def _one_thread() -> None:
    torch.set_num_threads(1)


def _observe(job: tuple[str, str, list[str], str, str]) -> dict:
    """One arm, in a worker process: the run's fingerprint, its clear refusal, or its failure."""
    script, recipe, args, out, out_root = job
    module = importlib.import_module(script)
    if not any(a.startswith("run.output_dir=") for a in args):
        args = [*args, f"run.output_dir={out}"]
    stdout = io.StringIO()
    run_dir = Path(out)
    try:
        cfg = load_config(module.Config, Path(recipe), args)
        run_dir = Path(cfg.run.output_dir)
        with contextlib.redirect_stdout(stdout):
            module.main(cfg)
        return fingerprint(run_dir, stdout.getvalue())
    except UserError as exc:  # a clear refusal of the changed value is an effect the user sees
        return {"refused": str(exc).replace(out_root, "<arms>")}
    except BaseException as exc:  # noqa: BLE001 - reported with the arm's overrides by the caller
        return {"failed": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"}
    finally:  # only the fingerprint is kept: a detection walk's checkpoints alone would fill ~12 GB
        if run_dir.resolve().is_relative_to(Path(out_root).resolve()):
            shutil.rmtree(run_dir, ignore_errors=True)


# ------------------------------------------------------------------ the sections every script shares
# Each context sets what the changed key needs in order to act at all, whatever the script's recipe says
# (an eps acts only in RMSprop/AdamW, a milestone only in a multistep schedule of two epochs, ...).

SHARED_EXEMPT = {
    "data.workers": "by design: augmentation is seeded per sample, so results do not depend on the worker count",
    "run.device": "'auto' and 'cpu' are the same device on a machine without a GPU",
    "train.cudnn_benchmark": "CUDA only",
    "train.tf32": "CUDA (Ampere and newer) only",
    "train.channels_last": "memory layout only (tests/data check the batch layout; bench/ measures the speed)",
    "run.allow_changes": "acts only when a run resumes with a changed recipe (tests/test_run_safety.py)",
    "run.divergence_factor": "acts only when the loss explodes (tests/test_run_safety.py, tests/engine/test_loop.py)",
    "run.output_dir": "the arms' directories are masked; checked directly in test_output_dir_is_where_the_run_goes",
    "data.format": "by design: a shard set holds the folder's bytes in its order, so the run is the same bit for bit "
                   "(tests/test_train_shards.py)",
}

_RMSPROP = ["optimizer.name=rmsprop", "optimizer.alpha=0.9", "optimizer.momentum=0.9", "optimizer.tf_eps=null",
            "optimizer.eps=0.01"]
_STEP = ["schedule.name=step", "schedule.step_size=1", "schedule.gamma=0.5", "schedule.epochs=2",
         "schedule.per_iteration=false"]


def shared_alternatives(batch_size: int, per_iteration: bool) -> dict[str, tuple[list[str], Any]]:
    """The optimizer, schedule, run and shared train keys: key -> (context for both arms, changed value).
    batch_size: the walk's data.batch_size; per_iteration: the walk's schedule.per_iteration."""
    return {
        "optimizer.name": ([], "adamw"),
        "optimizer.weight_decay": ([], 0.05),
        "optimizer.momentum": ([], 0.5),
        "optimizer.norm_weight_decay": ([], 0.5),
        "optimizer.alpha": (_RMSPROP, 0.5),
        "optimizer.eps": (_RMSPROP, 0.5),
        "optimizer.tf_eps": ([*_RMSPROP, "optimizer.eps=null", "optimizer.tf_eps=0.001"], 0.1),
        "optimizer.nesterov": (["optimizer.name=sgd", "optimizer.tf_eps=null", "optimizer.eps=null",
                                "optimizer.momentum=0.9"], True),
        "optimizer.betas": (["optimizer.name=adamw", "optimizer.tf_eps=null", "optimizer.alpha=null"], [0.5, 0.9]),
        "optimizer.lr_scaling": ([f"run.global_batch={2 * batch_size}", "train.accumulate=1"], "linear"),
        # epoch 1 of 2 at 0.25 x lr (step, multistep, poly) against cosine's 0.5 x lr
        "schedule.name": (["schedule.epochs=2", "schedule.gamma=0.25", "schedule.step_size=1", "schedule.power=2.0",
                           "schedule.milestones=[1]"], "cosine"),
        "schedule.milestones": (["schedule.name=multistep", "schedule.gamma=0.5", "schedule.milestones=[5]",
                                 "schedule.epochs=2"], [1]),
        "schedule.gamma": (_STEP, 0.25),
        "schedule.step_size": ([*_STEP, "schedule.step_size=5"], 1),
        "schedule.power": (["schedule.name=poly", "schedule.power=1.0", "schedule.epochs=2"], 2.0),
        "schedule.min_lr": (["schedule.name=cosine", "schedule.epochs=2", "schedule.per_iteration=false"], 0.001),
        "schedule.warmup_epochs": (["schedule.epochs=2"], 1),
        "schedule.warmup_lr_init": (["schedule.epochs=2", "schedule.warmup_epochs=1"], 0.0005),
        "schedule.warmup_iters": (["schedule.warmup_iters=0"], 2),
        "schedule.warmup_factor": (["schedule.warmup_iters=2"], 0.5),
        "schedule.per_iteration": (["schedule.name=poly", "schedule.power=1.0"], not per_iteration),
        "schedule.lr_noise": (_STEP, [0, 2]),
        "schedule.lr_noise_pct": ([*_STEP, "schedule.lr_noise=[0,2]"], 0.1),
        "schedule.lr_noise_std": ([*_STEP, "schedule.lr_noise=[0,2]"], 0.1),
        "schedule.lr_noise_seed": ([*_STEP, "schedule.lr_noise=[0,2]"], 7),
        "run.resume": ([], None),
        "run.print_freq": ([], 1),
        "run.keep_checkpoints": (["schedule.epochs=2"], 1),
        "run.global_batch": ([], 2 * batch_size),
        "run.world_size": ([], 8),
        "run.check_data": ([], True),
        "train.accumulate": ([], 2),
        "train.amp": ([], "bf16"),
        "train.clip_grad_norm": ([], 0.01),
        "expected.source": ([], "another source"),
    }
