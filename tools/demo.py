"""The main job on the built-in toy data: what `make demo` runs.

    python tools/demo.py [--data toy_data] [--out runs/demo]

1. writes the toy datasets if they are missing (tools/make_toy_data.py);
2. trains the toy classification recipe (recipes/toy/classification.yaml), resuming if interrupted;
3. averages the last 3 checkpoints that improved Acc@1 (fewer if fewer improved) and evaluates the average;
4. prints the toy results beside the published table.
Each step is the same command a user runs on ImageNet, with the toy recipe. Training and averaging
also write the run directory's report.md; to tabulate the run beside every published row:

    python tools/report.py runs/demo
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.runlog import improved, read_metrics  # noqa: E402

PUBLISHED = [  # (row, Acc@1, Acc@5): published-results.md
    ("MobileNetV3-Large, tuning row 4 (+ augmentation & tuned hyperparameters)", 73.86, 91.292),
    ("MobileNetV3-Large, + checkpoint averaging (released)", 74.042, 91.340),
    ("MobileNetV3-Small (released)", 67.668, 87.402),
]


def step(title: str, cmd: list[str]) -> float:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "toy_data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides for the toy recipe")
    args = ap.parse_args(argv)
    py = sys.executable
    start = time.perf_counter()
    if not (args.data / "imagenet" / "train").is_dir():
        step("toy data", [py, "tools/make_toy_data.py", "--out", str(args.data)])
    recipe = "recipes/toy/classification.yaml"
    step("train (toy recipe)", [py, "train_classification.py", "--recipe", recipe, f"data.root={args.data / 'imagenet'}",
                                f"run.output_dir={args.out}", "run.resume=auto", *args.overrides])
    # the recipe's 3; a short or noisy run (another thread count sums in another order) may improve fewer times
    k = min(3, len(improved(read_metrics(args.out), "acc1")))
    step("checkpoint averaging", [py, "average_checkpoints.py", "--run", str(args.out), "--select", f"last-improved:{k}",
                                  "--metric", "acc1", "--out", str(args.out / "averaged.pt"), "--eval", "--export"])
    rows = read_metrics(args.out)
    epochs = [r for r in rows if "row" not in r]
    last, best = epochs[-1], max(epochs, key=lambda r: r["acc1"])
    averaged = [r for r in rows if r.get("row") == "checkpoint averaging"][-1]
    n_classes = len(list((args.data / "imagenet" / "val").iterdir()))
    cfg = yaml.safe_load((args.out / "config.yaml").read_text())
    minutes = (time.perf_counter() - start) / 60
    print(f"\n=== results: toy data ({n_classes} classes, chance {100 / n_classes:.0f}%) beside the published table")
    print(f"{'row':72s} {'Acc@1':>7s} {'Acc@5':>7s}")
    print(f"{'toy ' + cfg['model']['name'] + ', last epoch (' + str(last['epoch']) + ')':72s} "
          f"{last['acc1']:7.2f} {last['acc5']:7.2f}")
    print(f"{'toy, best epoch (' + str(best['epoch']) + ')':72s} {best['acc1']:7.2f} {best['acc5']:7.2f}")
    label = f"toy, + averaging (last-improved:{k} = epochs {averaged['averaged_epochs']})"
    print(f"{label:72s} {averaged['acc1']:7.2f} {averaged['acc5']:7.2f}")
    for name, a1, a5 in PUBLISHED:
        print(f"{'published ImageNet: ' + name:72s} {a1:7.3f} {a5:7.3f}")
    print(f"\ndemo finished in {minutes:.1f} min; run directory {args.out}")


if __name__ == "__main__":
    main()
