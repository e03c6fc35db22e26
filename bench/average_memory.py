"""Peak memory of average_checkpoints.py averaging 10 MobileNetV3-Large checkpoints.

    python bench/average_memory.py [--n 10]

Writes n project checkpoints (weights + RMSprop state, as training writes them) to a temp folder,
then averages them in a fresh process and reports its peak resident memory above the interpreter's
baseline (after imports), in units of one checkpoint's size. Target: <= 3.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from engine import checkpoint  # noqa: E402
from models import build  # noqa: E402

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, average_checkpoints
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = status("VmRSS:")
state, _ = average_checkpoints.average(sys.argv[2:])
print(json.dumps({"baseline": base, "peak": status("VmHWM:")}))
"""


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10)
    args = ap.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.n):
            torch.manual_seed(i)
            model = build("mobilenet_v3_large")
            opt = torch.optim.RMSprop(model.parameters(), lr=0.064, momentum=0.9, alpha=0.9, eps=0.0316)
            model(torch.randn(2, 3, 64, 64)).sum().backward()
            opt.step()
            paths.append(Path(tmp) / f"epoch_{i:03d}.pt")
            checkpoint.save(checkpoint.new(model.state_dict(), optimizer=opt.state_dict(), epoch=i), paths[-1])
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        file_size = paths[0].stat().st_size
        out = subprocess.run([sys.executable, "-c", CHILD, str(root), *map(str, paths)], capture_output=True,
                             text=True, check=True)
        mem = json.loads(out.stdout.strip().splitlines()[-1])
    above = mem["peak"] - mem["baseline"]
    print(f"machine: {machine()}")
    print(f"averaging {args.n} MobileNetV3-Large checkpoints: weights {weights / 2**20:.1f} MiB each, "
          f"file {file_size / 2**20:.1f} MiB each (with optimizer state)")
    print(f"  peak above baseline: {above / 2**20:.1f} MiB = {above / weights:.2f} x the weights, "
          f"{above / file_size:.2f} x a checkpoint file (target <= 3 checkpoints)")
    return {"above_mib": above / 2**20, "x_weights": above / weights, "x_file": above / file_size}


if __name__ == "__main__":
    main()
