"""CPU latency of the int8 export against the float model, per quantized backend, batch 1 and 32.

    python bench/qat_latency.py [--export RUN/export] [--weights FLOAT.pth] [--reps 20] [--size 224]

For each backend this machine has (x86 = fbgemm/oneDNN, qnnpack), the float MobileNetV3-Large is
quantized with that backend's qconfig (fuse, prepare, calibrate on random images, convert), written
with models.quantize.export_int8 and read back with load_int8: the timed int8 model is the export
as a fresh process would load it. With --export, that export (e.g. the QAT recipe's qnnpack model)
is timed too, on each backend (loading re-packs its weights for the active engine).
The float baseline is the eager float model, timed in NCHW and channels_last; the faster of the two
is the baseline (blog: int8 about 2.5x faster than float on CPU). Latency does not depend on the
weight values, so random weights stand in unless --weights is given. Median over rounds of blocks
(each model runs `reps` times in a row per round, the models alternate between rounds): not call by call,
because qnnpack's thread pool and ATen's OpenMP threads spin-wait after work, and alternating them call
by call on few cores measures that contention instead of either model. inference_mode, the process's
torch thread count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from models import build, load_weights, quantize  # noqa: E402

BLOG_SPEEDUP = 2.5  # blog: float 0.0411 s/img, quantized 0.0162 s/img


def blocked(fns: dict, reps: int, rounds: int = 3, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn: `rounds` rounds, each fn timed for `reps` calls in a row."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(warmup):
                fn()
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _int8_export(float_model: torch.nn.Module, backend: str, size: int, out: Path):
    q = build("quantizable_mobilenet_v3_large")
    q.load_state_dict(float_model.state_dict())
    quantize.prepare_ptq(q, backend)
    with quantize.engine(backend):
        quantize.calibrate(q, [torch.randn(2, 3, size, size)])  # ranges only; latency does not depend on them
    quantize.export_int8(quantize.convert_int8(q, backend), out, backend, size)
    return quantize.load_int8(out)[0]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", help="an int8 export directory (train_qat.py's RUN/export) to time as well")
    ap.add_argument("--weights", help="float weights (latency does not depend on them)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--backends", nargs="+", default=["x86", "qnnpack"])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    torch.manual_seed(0)
    float_model = build("mobilenet_v3_large").eval()
    if args.weights:
        load_weights(float_model, args.weights)
    backends = [b for b in args.backends if b in torch.backends.quantized.supported_engines]
    rows = []
    print(f"{'int8 model':34s} {'engine':8s} {'batch':>5s} {'float ms':>9s} {'int8 ms':>9s} {'speed-up':>8s} "
          f"{'blog':>5s}")
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for backend in backends:
            models = {f"PTQ export ({backend} qconfig)": _int8_export(float_model, backend, args.size,
                                                                     Path(tmp) / backend)}
            if args.export:
                models[f"{Path(args.export).parent.name} export"] = quantize.load_int8(args.export, backend)[0]
            for batch in args.batches:
                x = torch.randn(batch, 3, args.size, args.size)
                x_cl = x.contiguous(memory_format=torch.channels_last)
                reps = args.reps if batch == 1 else max(2, args.reps // 8)
                fns = {"float": lambda x=x: float_model(x), "float_cl": lambda x=x_cl: float_model(x)}
                fns.update({name: (lambda m=m, x=x: m(x)) for name, m in models.items()})
                with quantize.engine(backend):
                    t = blocked(fns, reps, warmup=1 if batch > 1 else 3)
                base = min(t["float"], t["float_cl"])
                for name in models:
                    row = {"model": name, "engine": backend, "batch": batch, "float_ms": 1e3 * base,
                           "float_nchw_ms": 1e3 * t["float"], "float_channels_last_ms": 1e3 * t["float_cl"],
                           "int8_ms": 1e3 * t[name], "speedup": base / t[name]}
                    rows.append(row)
                    print(f"{name:34s} {backend:8s} {batch:5d} {row['float_ms']:9.2f} {row['int8_ms']:9.2f} "
                          f"{row['speedup']:7.2f}x {BLOG_SPEEDUP:4.1f}x")
    return rows


if __name__ == "__main__":
    main()
