"""CPU inference latency: this project's models against torchvision's builders, same weights.

    python bench/latency.py [--reps 30]

Batch 1, 224 px, eval mode, no_grad, NCHW for both; median of interleaved repetitions.
ratio = torchvision time / ours (>= 0.95 means ours is no slower).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved, machine  # noqa: E402
from models import build  # noqa: E402


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"{'model':24s} {'torchvision ms':>15s} {'ours ms':>9s} {'ratio':>6s}")
    rows = []
    x = torch.randn(1, 3, 224, 224)
    for name in ("mobilenet_v3_large", "mobilenet_v3_small"):
        ref = getattr(torchvision.models, name)().eval()
        ours = build(name).eval()
        ours.load_state_dict(ref.state_dict())
        with torch.inference_mode():
            torch.testing.assert_close(ours(x), ref(x))
            t = interleaved({"tv": lambda r=ref: r(x), "ours": lambda m=ours: m(x)}, args.reps, warmup=5)
        ratio = t["tv"] / t["ours"]
        rows.append({"model": name, "torchvision_ms": 1e3 * t["tv"], "ours_ms": 1e3 * t["ours"], "ratio": ratio})
        print(f"{name:24s} {1e3 * t['tv']:15.2f} {1e3 * t['ours']:9.2f} {ratio:6.2f}")
    return rows


if __name__ == "__main__":
    main()
