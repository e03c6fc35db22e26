"""The run directory: one run of one recipe, never mixed, never lost.

`open_run(cfg, dist)` is the first thing a training script does after setting up processes. It
only reads, and refuses, before anything is written:
- a directory that cannot be created or written is an error naming it;
- a directory another run is using is refused, naming that run's host and pid: the main process
  holds an exclusive lock on `run.lock` for the run's lifetime. The OS releases it when the process
  ends, however it ends, so a requeued job never meets a stale lock. It is a POSIX record lock
  (fcntl.lockf), not flock: a flock would be shared with the loader workers the process forks and
  outlive a killed main process for as long as they do. The other ranks learn rank 0's answer from
  a collective, so a refusal stops every rank;
- temporary files of an interrupted save are removed;
- a directory that already holds a run (checkpoints, or metrics) is refused unless
  `run.resume=auto` (or a path) continues it; an eval-only run into it writes to its `eval/`;
- the checkpoint to resume is `checkpoints/last.pt`, or, when it is missing or cannot be read
  (a truncated file: `last.pt` is a hard link to its epoch file), the newest epoch file that can,
  with a warning;
- a resume whose recipe differs from the run's in a key that changes the math is refused, listing
  each key with its old and new value, unless `run.allow_changes=true`; then the changes take
  effect and are logged and recorded in metrics.jsonl. Operational keys (OPERATIONAL) change freely.
`Run.start(facts)` then writes config.yaml and env.json.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
from pathlib import Path
from typing import Any, Callable

from engine import checkpoint, distributed, runlog
from engine.config import load_config_dict, save_config, to_dict
from engine.distributed import DistState
from engine.errors import RunDirError

# Keys that change how a run executes, not what it computes. Everything else must match on resume.
OPERATIONAL = frozenset({
    "run.output_dir", "run.device", "run.resume", "run.eval_only", "run.keep_checkpoints", "run.print_freq",
    "run.allow_changes", "run.check_data", "data.root", "data.workers", "train.cudnn_benchmark",
    "data.mask_cache", "data.eval_batch_size", "train.draw_images",  # segmentation/detection: cache, eval batching, TB
    "qat.export",  # QAT/PTQ: whether export/ is written
})
OPERATIONAL_SECTIONS = ("expected.",)  # the published numbers a run is compared with


LOCK_FILE = "run.lock"
EVAL_SUBDIR = "eval"  # where an eval-only run into a training run's directory writes


class Run:
    report: Callable[[Path], Path] | None = None  # out_dir -> report.md written; set by open_run

    def __init__(self, cfg: Any, dist: DistState, out_dir: Path, log: runlog.RunLog, state: dict | None,
                 resume_path: Path | None, changes: dict[str, tuple[Any, Any]], notes: list[str], lock=None):
        self.cfg, self.dist, self.out_dir, self.log = cfg, dist, out_dir, log
        self.lock = lock  # the open run.lock (main process): the lock lasts until it is closed
        self.state, self.resume_path, self.changes = state, resume_path, changes
        for note in notes:
            log.info(note)
        self.ckpt_dir = out_dir / "checkpoints"

    def start(self, facts: dict[str, Any]) -> None:
        """Write config.yaml and env.json (main process), log the resume notes and accepted changes."""
        if self.changes:
            self.log.info("run.allow_changes=true: the recipe changed since the checkpoint; from now on:")
            for key, (old, new) in self.changes.items():
                self.log.info(f"  {key}: {old!r} -> {new!r}")
        if not self.dist.is_main:
            return
        save_config(self.cfg, self.out_dir / "config.yaml")
        self.log.write_env({**runlog.environment(self.dist.world_size, self.dist.device), "derived": facts})

    def write_eval(self, payload: dict[str, Any]) -> None:
        """eval-only: eval.json (the weights evaluated, the metrics, the published numbers) and report.md."""
        if not self.dist.is_main:
            return
        checkpoint.atomic_write_text(self.out_dir / "eval.json", json.dumps(
            {**payload, "expected": to_dict(self.cfg.expected)}, indent=2, default=str) + "\n")
        if not (self.out_dir / "config.yaml").exists():
            save_config(self.cfg, self.out_dir / "config.yaml")
            self.log.write_env(runlog.environment(self.dist.world_size, self.dist.device))
        self.write_report()

    def write_report(self) -> None:
        """report.md through the report the script handed to open_run (reproduce.report.write_run_report:
        the report is a layer above engine/, which never imports it)."""
        if self.report is not None and self.dist.is_main:
            self.log.info(f"report: {self.report(self.out_dir)}")

    def release(self) -> None:
        """Give up the run directory (at the end of a run; a process that dies releases it anyway)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def open_run(cfg: Any, dist: DistState, operational: frozenset[str] = frozenset(),
             report: Callable[[Path], Path] | None = None) -> Run:
    """The run for `cfg` (see the module's docstring). report: out_dir -> report.md written (the scripts
    hand in reproduce.report.write_run_report: the report is a layer above engine/, never imported here)."""
    out_dir = Path(cfg.run.output_dir)
    note = None
    if cfg.run.eval_only and _holds_training(out_dir):
        # An evaluation beside a training run (e.g. of one of its checkpoints) must not replace the run's
        # report.md: its eval.json and report.md go to EVAL_SUBDIR, where the user is told to look.
        note = f"{out_dir} holds a training run: this evaluation is written to {out_dir / EVAL_SUBDIR}"
        out_dir = out_dir / EVAL_SUBDIR
    _make_dir(out_dir)
    lock = lock_dir(out_dir, dist)
    try:
        run = _open(cfg, dist, out_dir, operational)
        if note:
            run.log.info(note)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    run.lock, run.report = lock, report
    return run


def lock_dir(out_dir: Path, dist: DistState = DistState()):
    """The main process's exclusive lock on the run directory (the open file: the lock lasts until it is
    closed or the process ends), or RunDirError on every rank when another process holds it. Also taken
    by average_checkpoints.py --eval, which rewrites the run's metrics.jsonl and report.md."""
    fh, problem = None, None
    if dist.is_main:
        path = out_dir / LOCK_FILE
        fh = open(path, "a+")
        try:
            fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            fh = None
            problem = (f"{out_dir} is in use by another run ({holder}; {path} is locked); wait for it to end "
                       "or give this run another run.output_dir")
        else:
            fh.truncate(0)
            fh.write(f"host {platform.node()}, pid {os.getpid()}\n")
            fh.flush()
    problem = distributed.all_gather_object(problem, dist)[0]  # rank 0's answer on every rank
    if problem:
        raise RunDirError(problem)
    return fh


def _open(cfg: Any, dist: DistState, out_dir: Path, operational: frozenset[str]) -> Run:
    ckpt_dir = out_dir / "checkpoints"
    log = runlog.RunLog(out_dir, dist.is_main)
    if dist.is_main:
        _remove_temporaries(out_dir)
    notes: list[str] = []
    epoch_files = sorted(ckpt_dir.glob("epoch_*.pt"))
    last = ckpt_dir / "last.pt"
    has_run = _holds_training(out_dir)
    resume = cfg.run.resume
    if cfg.run.eval_only:  # writes eval.json and report.md only: never mixes with a training run's files
        return Run(cfg, dist, out_dir, log, None, None, {}, notes)
    if resume is None:
        if has_run:
            held = ", ".join(p.name for p in (epoch_files[-3:] or [last])) if (epoch_files or last.exists()) \
                else "metrics.jsonl"
            raise RunDirError(
                f"{out_dir} already holds a run ({held}); continue it with run.resume=auto, "
                f"or give this run another run.output_dir")
        return Run(cfg, dist, out_dir, log, None, None, {}, notes)

    state, path = None, None
    if resume == "auto":
        state, path = _newest_readable(last, epoch_files, notes)
    else:
        path = Path(resume)
        if not path.is_file():
            what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
            raise RunDirError(f"run.resume: {path} {what} (use run.resume=auto to continue {out_dir})")
        state = checkpoint.load(path, map_location="cpu")
    if state is None:
        notes.append(f"run.resume=auto: no checkpoint in {ckpt_dir}, starting from scratch")

    old_config = state.get("config") if state is not None else _read_config(out_dir / "config.yaml")
    changes = {}
    if old_config:
        skip = OPERATIONAL | operational
        changes = {k: v for k, v in _diff(old_config, to_dict(cfg)).items()
                   if k not in skip and not k.startswith(OPERATIONAL_SECTIONS)}
        if changes and not cfg.run.allow_changes:
            what = f"the checkpoint {path}" if state is not None else f"{out_dir / 'config.yaml'}"
            lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise RunDirError(
                f"{out_dir} holds a run of another recipe: this command differs from {what} in\n{lines}\n"
                f"Nothing was written. To continue this run with these changes, add run.allow_changes=true; "
                f"to start a new run, choose another run.output_dir.")
    return Run(cfg, dist, out_dir, log, state, path, changes, notes)


def _holds_training(out_dir: Path) -> bool:
    ckpt_dir = out_dir / "checkpoints"
    return (out_dir / "metrics.jsonl").exists() or (ckpt_dir / "last.pt").exists() \
        or any(ckpt_dir.glob("epoch_*.pt"))


def _make_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"run.output_dir: cannot create {out_dir} ({exc.strerror or exc})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"run.output_dir: {out_dir} is not writable")


def _remove_temporaries(out_dir: Path) -> None:
    """Files of a save that was interrupted (checkpoint.save writes `.NAME.*.tmp`, then renames)."""
    for d in (out_dir, out_dir / "checkpoints"):
        if d.is_dir():
            for tmp in d.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def _newest_readable(last: Path, epoch_files: list[Path], notes: list[str]) -> tuple[dict | None, Path | None]:
    candidates = ([last] if last.exists() else []) + epoch_files[::-1]
    for i, path in enumerate(candidates):
        try:
            state = checkpoint.load(path, map_location="cpu")
        except ValueError as exc:
            notes.append(f"warning: {exc}; trying an older checkpoint")
            continue
        if path != last and (last.exists() or i > 0):
            notes.append(f"warning: resuming from {path}, the newest checkpoint that could be read; "
                         "metrics of later epochs are dropped")
        elif path != last:
            notes.append(f"warning: {last} is missing; resuming from {path}, the newest epoch checkpoint")
        return state, path
    if candidates:
        raise RunDirError(f"{last.parent}: no checkpoint can be read ({', '.join(p.name for p in candidates)}); "
                          "move the directory away to start again")
    return None, None


def _read_config(path: Path) -> dict | None:
    if not path.exists():
        return None
    return load_config_dict(path)


def _diff(old: dict, new: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    out: dict[str, tuple[Any, Any]] = {}
    for k in list(new) + [k for k in old if k not in new]:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(_diff(a, b, f"{prefix}{k}."))
        elif _plain(a) != _plain(b):
            out[f"{prefix}{k}"] = (a, b)
    return out


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v
