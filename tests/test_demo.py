import subprocess
import sys

from tests.conftest import ROOT
from tests.test_train_classification import fast


def test_demo_trains_averages_and_prints_the_table(toy_data, tmp_path):
    out = tmp_path / "demo"
    overrides = fast(toy_data / "imagenet", out)[2:]  # the fast toy settings, minus --recipe
    overrides = [o for o in overrides if not o.startswith(("data.root=", "run.output_dir="))]
    cmd = [sys.executable, str(ROOT / "tools/demo.py"), "--data", str(toy_data), "--out", str(out), *overrides,
           "schedule.epochs=4", "optimizer.lr=0.01"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from engine.runlog import improved, read_metrics

    epochs = improved(read_metrics(out), "acc1")
    k = min(3, len(epochs))  # the recipe's 3, or every improved epoch of this short run if fewer
    label = f"toy, + averaging (last-improved:{k} = epochs {[r['epoch'] for r in epochs[-k:]]})"
    assert label in proc.stdout, proc.stdout[-2000:]
    assert "published ImageNet: MobileNetV3-Large, + checkpoint averaging (released)" in proc.stdout
    assert list(out.glob("averaged-*.pth"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # re-running is idempotent
    assert again.returncode == 0 and "nothing to train" in again.stdout
    rows = (out / "metrics.jsonl").read_text().count("checkpoint averaging")
    assert rows == 1
