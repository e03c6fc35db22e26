"""The run directory's logs: env.json, metrics.jsonl (written, and read back with its improving
epochs), TensorBoard scalars, console progress.

metrics.jsonl is appended one whole line per write; a process killed while appending leaves a torn
last line (a prefix of a row, no newline). Readers drop that line with a warning (the row is written
again: a checkpoint carries its epoch's row); any other line that is not a JSON object is an error
naming the file and line.

Only the main process writes; other ranks get a RunLog whose methods do nothing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import atomic_write_text
from engine.errors import UserError


def environment(world_size: int, device: torch.device) -> dict[str, Any]:
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {
        "python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
        "platform": platform.platform(), "git_commit": commit, "argv": sys.argv, "world_size": world_size,
        "device": str(device), "cpu_threads": torch.get_num_threads(), "hostname": platform.node(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    if device.type == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["cuda"] = torch.version.cuda
    return env


class RunLog:
    def __init__(self, output_dir: str | Path, enabled: bool):
        self.dir = Path(output_dir)
        self.enabled = enabled
        self._tb = None

    # ----------------------------------------------------------------- files
    def write_env(self, env: dict) -> None:
        if self.enabled:
            atomic_write_text(self.dir / "env.json", json.dumps(env, indent=2, default=str) + "\n")

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def truncate_after(self, epoch: int) -> None:
        """On resume from `epoch`, drop lines of later epochs (written before the checkpoint was); every row
        has an integer epoch (read_rows checks)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        keep = [row for row in read_rows(self.metrics_path) if row["epoch"] <= epoch]
        atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in keep))

    def ensure_row(self, row: dict[str, Any]) -> None:
        """Append an epoch's row if metrics.jsonl lacks it (the run stopped between checkpoint and row)."""
        if not self.enabled:
            return
        rows = read_rows(self.metrics_path) if self.metrics_path.exists() else []
        if not any(r.get("epoch") == row["epoch"] and "row" not in r for r in rows):
            self.metrics(row)

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    # ----------------------------------------------------------------- tensorboard
    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        self._writer(step)
        for k, v in values.items():
            if v is not None:
                self._tb.add_scalar(f"{prefix}{k}", v, step)
        self._tb.flush()

    def images(self, step: int, images: dict) -> None:
        """uint8 (3, H, W) images into TensorBoard beside the scalars (predictions drawn on val images)."""
        if not self.enabled or not images:
            return
        self._writer(step)
        for tag, image in images.items():
            self._tb.add_image(tag, image, step)
        self._tb.flush()

    def _writer(self, step: int) -> None:
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    def info(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return read_rows(path)


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl: a torn last line is dropped with a warning (stderr), any other
    malformed line is a UserError naming the file and line."""
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            if number == len(lines):  # the last line, without its newline: a write that was cut short
                print(f"warning: {path}: line {number} is incomplete (a process stopped while writing it); "
                      "ignored", file=sys.stderr, flush=True)
                continue
            raise UserError(f"{path}: line {number} is not valid JSON ({exc}); fix or delete that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
            raise UserError(f"{path}: line {number} is not a metrics row (a JSON object with an integer "
                            f"\"epoch\"): {line[:80]}")
        rows.append(row)
    return rows


def improved(history: list[dict], metric: str, mode: str = "max") -> list[dict]:
    """The epochs of `history` whose metric beat every earlier epoch's (ties do not count), in epoch order."""
    rows = sorted((r for r in history if metric in r and "row" not in r), key=lambda r: r["epoch"])
    better = (lambda a, b: a > b) if mode == "max" else (lambda a, b: a < b)
    out, best = [], None
    for r in rows:
        if best is None or better(r[metric], best):
            out.append(r)
            best = r[metric]
    return out


class Progress:
    """A bar redrawn in place on a terminal; a line every `every` steps in batch jobs (SLURM logs)."""

    def __init__(self, header: str, total: int, every: int, enabled: bool, interactive: bool | None = None):
        self.header, self.total, self.every, self.enabled = header, total, every, enabled
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.start = time.perf_counter()

    def due(self, step: int) -> bool:
        """Whether update(step) would print: every step on a terminal, every `every` steps and the last otherwise."""
        done = step + 1
        return self.enabled and (self.interactive or done % self.every == 0 or done == self.total)

    def update(self, step: int, **fields: float) -> None:
        if not self.due(step):
            return
        done = step + 1
        last = done == self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        text = " ".join(f"{k} {v:.4g}" for k, v in fields.items())
        if self.interactive:
            width = 24
            fill = int(width * done / self.total)
            print(f"\r{self.header} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                  f"eta {_hms(eta)} {text}", end="\n" if last else "", flush=True)
        else:
            print(f"{self.header} {done}/{self.total} eta {_hms(eta)} {text}", flush=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
