"""Batch-1 CPU latency of each export (ONNX Runtime, ExecuTorch) beside eager PyTorch, 1 thread and all.

    python bench/export_latency.py RUN/export/*.onnx RUN/export/*.pte [--reps 30]

Each file's sidecar (tools/export.py) names its weights and recipe, from which the eager PyTorch model is
rebuilt: the float model for float exports, the eager int8 model of the published QAT/PTQ row (its
backend's engine) for int8 ones. Input: one image at the size the sidecar states (classification the
crop, segmentation the eval size squared, detection min_size x 4/3 min_size). Each figure is the median
of --reps calls after 3 warm-up calls; eager and export are timed alternately, in blocks of 5 calls, so
that load on a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402


def _models(path: Path, threads: int):
    """(eager callable, export callable, input, kind) for one exported file."""
    from deploy import onnx
    from deploy.source import build_float, build_int8, resolve

    info = json.loads(path.with_name(path.name + ".json").read_text())
    src = resolve(info["source"]["weights"], info["source"]["recipe"])
    task, cfg = src.task, src.cfg
    if task == "detection":
        m = cfg.model
        x = torch.rand(3, m.min_size, m.min_size * 4 // 3)
        model = build_float(src)
        eager = lambda t: model([t])  # noqa: E731
    elif task == "segmentation":
        x = torch.randn(1, 3, cfg.data.eval_size, cfg.data.eval_size)
        model = build_float(src)
        eager = lambda t: model(t)["out"]  # noqa: E731
    else:
        x = torch.randn(1, 3, cfg.data.val_crop, cfg.data.val_crop)
        model = build_int8(src) if task in ("qat", "ptq") else build_float(src)
        if task in ("qat", "ptq"):
            torch.backends.quantized.engine = cfg.qat.backend
        eager = model
    kind = "detection" if task == "detection" else "classification"
    if path.suffix == ".onnx":
        run = onnx.runner(str(path), kind, threads, spin=False)
    else:
        from executorch.extension.pybindings import portable_lib

        from deploy import executorch as et

        portable_lib._unsafe_reset_threadpool(threads)
        run = et.runner(str(path))
    return eager, run, x, info


@torch.no_grad()
def _time(fns, x, reps: int) -> list[float]:
    """Median ms per call of each fn, interleaved in blocks of 5 calls."""
    for fn in fns:
        for _ in range(3):
            fn(x)
    times = [[] for _ in fns]
    while len(times[0]) < reps:
        for fn, t in zip(fns, times):
            for _ in range(5):
                start = time.perf_counter()
                fn(x)
                t.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="exported .onnx / .pte files (with their sidecars)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = ap.parse_args(argv)
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}; median of {args.reps} batch-1 calls")
    print("| model | file | precision | threads | eager PyTorch ms | export ms | speed-up |")
    print("|---|---|---|---:|---:|---:|---:|")
    for path in args.files:
        for threads in args.threads:
            torch.set_num_threads(threads)
            eager, run, x, info = _models(path, threads)
            t_eager, t_export = _time([eager, run], x, args.reps)
            label = "int8 (eager: " + torch.backends.quantized.engine + ")" if info["precision"] == "int8" else "float32"
            print(f"| {info['model']} | {path.name} | {label} | {threads} | {t_eager:.2f} | {t_export:.2f} | "
                  f"{t_eager / t_export:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
