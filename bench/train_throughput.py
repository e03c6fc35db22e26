"""Training images/s of train_classification.py's step against a plain torchvision baseline, on CPU.

    python bench/train_throughput.py [--model mobilenet_v3_large] [--batch 32] [--steps 5]

Ours: this project's model in channels_last, uint8 batch normalized and erased on the device
(BatchTransform), RMSprop as in the recipe. Baseline: torchvision's model, NCHW fp32, a batch that
is already normalized float (the baseline is not even charged for normalization), same optimizer
and batch. Both run forward, loss, backward and optimizer step. ratio = ours / baseline.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved, machine  # noqa: E402
from data.classification import IMAGENET_MEAN, IMAGENET_STD, BatchTransform  # noqa: E402
from models import build  # noqa: E402


def _step(model, opt, inputs, targets):
    loss = torch.nn.functional.cross_entropy(model(inputs()), targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v3_large")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    opt_kw = dict(lr=0.064, alpha=0.9, eps=math.sqrt(1e-3), momentum=0.9, weight_decay=1e-5)
    uint8 = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8)  # as the loader yields
    erase = torch.zeros(args.batch, 5, dtype=torch.int32)
    erase[::5] = torch.tensor([1, 20, 30, 60, 50], dtype=torch.int32)
    targets = torch.randint(0, 1000, (args.batch,))

    ref = getattr(torchvision.models, args.model)().train()
    ref_opt = torch.optim.RMSprop(ref.parameters(), **opt_kw)
    ref_input = BatchTransform(IMAGENET_MEAN, IMAGENET_STD, channels_last=False)(uint8, erase)

    ours = build(args.model).train().to(memory_format=torch.channels_last)
    ours_opt = torch.optim.RMSprop(ours.parameters(), **opt_kw)
    batch_tf = BatchTransform(IMAGENET_MEAN, IMAGENET_STD, channels_last=True)

    t = interleaved({"baseline": lambda: _step(ref, ref_opt, lambda: ref_input, targets),
                     "ours": lambda: _step(ours, ours_opt, lambda: batch_tf(uint8, erase), targets)},
                    reps=args.steps, warmup=2)
    res = {k: args.batch / v for k, v in t.items()}
    print(f"machine: {machine()}")
    print(f"{args.model}, batch {args.batch}, {args.size} px, RMSprop, fp32 on CPU")
    print(f"  torchvision NCHW baseline: {res['baseline']:7.1f} images/s")
    print(f"  ours (channels_last, uint8 batch transform): {res['ours']:7.1f} images/s")
    print(f"  ratio ours / baseline: {res['ours'] / res['baseline']:.2f}")
    return {**res, "ratio": res["ours"] / res["baseline"]}


if __name__ == "__main__":
    main()
