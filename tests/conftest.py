import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> Path:
    """The built-in toy datasets, generated once per test session."""
    from tools.make_toy_data import main

    out = tmp_path_factory.mktemp("toy")
    main(["--out", str(out), "--seed", "0"])
    return out


@pytest.fixture(scope="session")
def toy_backbone(toy_data, tmp_path_factory) -> Path:
    """A classification checkpoint of MobileNetV3-Large (width 1.0, 10 classes) trained 2 epochs on
    the toy ImageNet at 64 px: the `model.backbone_weights` of the toy detection/segmentation runs."""
    import subprocess

    out = tmp_path_factory.mktemp("toy_backbone")
    proc = subprocess.run([sys.executable, str(ROOT / "train_classification.py"), "--recipe",
                           str(ROOT / "recipes/toy/classification.yaml"), f"data.root={toy_data / 'imagenet'}",
                           f"run.output_dir={out}", "schedule.epochs=2", "data.workers=0", "run.print_freq=1000"],
                          capture_output=True, text=True, cwd=out, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoints" / "last.pt"
