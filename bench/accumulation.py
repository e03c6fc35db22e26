"""Images/s of the shared training loop (engine.loop.Loop) with gradient accumulation 8 against
accumulation 1 at the same micro-batch, on CPU; with --device cuda and under torchrun, also DDP.

    python bench/accumulation.py [--model mobilenet_v3_small] [--size 128] [--micro 16]

Both arms run the same Loop (forward under loop.forward(), loop.backward(); RMSprop as in the
recipe): accumulation 1 steps the optimizer after every micro-batch, accumulation 8 after every 8th
(and skips DDP's all-reduce on the others). Measured in alternating blocks of 8 micro-batches, so
drift hits both arms equally. Target: ratio >= 0.97 (accumulation must cost nothing per image).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from engine import distributed  # noqa: E402
from engine.loop import BatchPlan, EpochBatches, Loop  # noqa: E402
from engine.optim import EpochSchedule, OptimizerConfig, ScheduleConfig, build_optimizer  # noqa: E402
from engine.runlog import RunLog  # noqa: E402
from models import build  # noqa: E402


def _arm(model_name, accumulate, micro, size, n_micro, dist, tmp):
    torch.manual_seed(0)
    model = build(model_name).to(dist.device, memory_format=torch.channels_last).train()
    train_model = model
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda" else None)
    opt = build_optimizer(OptimizerConfig(name="rmsprop", lr=1e-4, weight_decay=1e-5, momentum=0.9, alpha=0.9,
                                          tf_eps=1e-3), [{"params": list(model.parameters())}])
    cfg = SimpleNamespace(schedule=SimpleNamespace(epochs=1000),
                          run=SimpleNamespace(print_freq=10**9, divergence_factor=None, keep_checkpoints=None, seed=0))
    run = SimpleNamespace(log=RunLog(tmp, enabled=False), ckpt_dir=Path(tmp), out_dir=Path(tmp), state=None, changes={})
    sched = EpochSchedule(ScheduleConfig(epochs=1000, name="constant"), opt)
    loop = Loop(cfg, dist, run, model, opt, sched, BatchPlan(dist.world_size, micro, accumulate, None, "none"),
                train_model=train_model)
    x = torch.randn(micro * n_micro, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (micro * n_micro,))
    loader = DataLoader(TensorDataset(x, y), batch_sampler=EpochBatches(SequentialSampler(range(len(x))), micro))
    epoch = [0]

    def block():
        for xb, yb in loop.batches(loader, epoch[0]):
            xb, yb = xb.to(dist.device), yb.to(dist.device)
            with loop.forward():
                loss = torch.nn.functional.cross_entropy(train_model(xb), yb)
            loop.backward(loss, images=len(xb))
        loop.epoch_stats()
        epoch[0] += 1
        if dist.device.type == "cuda":
            torch.cuda.synchronize()
    return block


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--micro", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    dist = distributed.init(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        arms = {n: _arm(args.model, n, args.micro, args.size, 8, dist, tmp) for n in (1, 8)}
        for fn in arms.values():
            fn()  # warm-up
        times = {n: [] for n in arms}
        for _ in range(args.blocks):
            for n, fn in arms.items():
                t = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t)
    res = {n: 8 * args.micro * dist.world_size / statistics.median(v) for n, v in times.items()}
    ratio = res[8] / res[1]
    if dist.is_main:
        print(f"machine: {machine()}; {dist.world_size} process(es) on {dist.device}"
              + (" (DDP)" if dist.distributed else ""))
        print(f"{args.model}, micro-batch {args.micro}, {args.size} px, RMSprop, 8 micro-batches per block")
        print(f"  accumulation 1: {res[1]:7.1f} images/s")
        print(f"  accumulation 8: {res[8]:7.1f} images/s")
        print(f"  ratio accumulation 8 / accumulation 1: {ratio:.3f} (target >= 0.97)")
    distributed.shutdown()
    return {"accumulate_1": res[1], "accumulate_8": res[8], "ratio": ratio}


if __name__ == "__main__":
    main()
