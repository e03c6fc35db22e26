"""data.format shards end to end: the same short run on a folder and on its shard set (tools/make_shards.py)
gives the same checkpoint tensors bit for bit, for classification, detection and segmentation; a run on
shards killed mid-epoch (SIGKILL) resumes to the uninterrupted run's weights. The oracle is the folder run
(the reading path every other test checks against torchvision)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_classification as tc
import train_detection as td
import train_segmentation as ts
from engine.config import load_config
from tests.conftest import ROOT, run_in_process
from tests.test_recipe_keys import (C_BASE, C_RECIPE, D_BASE, D_RECIPE, S_BASE, S_RECIPE, _classifier_checkpoint,
                                    _tiny_coco, _tiny_imagefolder)
from tools import make_shards


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shard(src: Path, out: Path) -> Path:
    assert make_shards.main([str(src), str(out), "--shard-size", "64KB"]) == 0
    assert len(list(out.glob("*/shard-*.tar"))) > 2  # several shards per split: offsets and shard ids matter
    return out


def tensors(run: Path) -> dict:
    """Every tensor of every checkpoint of a run (model, optimizer state, EMA), by file and key."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, torch.Tensor):
            out[prefix] = v
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        elif isinstance(v, (list, tuple)):
            for k, x in enumerate(v):
                walk(f"{prefix}.{k}", x)

    for f in sorted((run / "checkpoints").glob("*.pt")):
        walk(f.name, torch.load(f, weights_only=True))
    return out


def assert_same_run(a: Path, b: Path):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and len(ta) > 100
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]
    metrics = [[{k: v for k, v in json.loads(line).items() if "per_s" not in k and "wait" not in k
                 and "time" not in k} for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b)]
    assert metrics[0] == metrics[1]


def test_classification_on_shards_is_the_folder_run_bit_for_bit(toy_data, tmp_path):
    folder = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=3, val=2)
    shards = shard(folder, tmp_path / "shards")
    base = [*C_BASE, "train.ema_decay=0.5", "data.random_erasing=0.5"]
    for name, extra in (("folder", [f"data.root={folder}"]), ("shards", [f"data.root={shards}", "data.format=shards"])):
        tc.main(load_config(tc.Config, C_RECIPE, [*base, *extra, f"run.output_dir={tmp_path / name}"]))
    assert_same_run(tmp_path / "folder", tmp_path / "shards")


def test_detection_on_shards_is_the_folder_run_bit_for_bit(toy_data, tmp_path):
    folder = _tiny_coco(toy_data / "coco", tmp_path / "coco", train=4, val=2)
    shards = shard(folder, tmp_path / "shards")
    backbone = _classifier_checkpoint(tmp_path / "backbone.pt", 0, randomized=False, num_classes=10)
    base = [*D_BASE, f"model.backbone_weights={backbone}"]
    for name, extra in (("folder", [f"data.root={folder}"]), ("shards", [f"data.root={shards}", "data.format=shards"])):
        td.main(load_config(td.Config, D_RECIPE, [*base, *extra, f"run.output_dir={tmp_path / name}"]))
    assert_same_run(tmp_path / "folder", tmp_path / "shards")
    assert (tmp_path / "folder/detections/epoch_000.json").read_bytes() == \
        (tmp_path / "shards/detections/epoch_000.json").read_bytes()


def test_segmentation_on_shards_is_the_folder_run_bit_for_bit(toy_data, tmp_path):
    folder = _tiny_coco(toy_data / "coco", tmp_path / "coco", train=4, val=2, voc=True)
    shards = shard(folder, tmp_path / "shards")
    backbone = _classifier_checkpoint(tmp_path / "backbone.pt", 0, num_classes=10)
    base = [*S_BASE, f"model.backbone_weights={backbone}"]
    for name, extra in (("folder", [f"data.root={folder}"]), ("shards", [f"data.root={shards}", "data.format=shards"])):
        # separate mask caches: the shards run computes its own masks from the copied annotation file
        ts.main(load_config(ts.Config, S_RECIPE, [*base, *extra, f"run.output_dir={tmp_path / name}",
                                                  f"data.mask_cache={tmp_path / name}-masks"]))
    assert_same_run(tmp_path / "folder", tmp_path / "shards")
    assert sorted(p.name for p in (tmp_path / "folder-masks").rglob("*.png")) == \
        sorted(p.name for p in (tmp_path / "shards-masks").rglob("*.png"))


def _script(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train_classification.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _popen(args, cwd):
    return subprocess.Popen([sys.executable, str(ROOT / "train_classification.py"), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _into_epoch(out: Path, proc: subprocess.Popen, epoch: int) -> None:
    """Until `epoch` trains: the row of the epoch before is written, then a moment for a few steps."""
    deadline = time.time() + 240
    while not any(r["epoch"] == epoch - 1 for r in _rows(out)):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    time.sleep(0.5)


@pytest.mark.slow
def test_preempted_mid_epoch_then_sigkilled_on_shards_resumes_bit_identical(toy_data, tmp_path):
    folder = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=30, val=2)  # 38 steps per epoch
    shards = shard(folder, tmp_path / "shards")
    args = ["--recipe", str(C_RECIPE), f"data.root={shards}", "data.format=shards", "model.name=mobilenet_v3_small",
            "model.width_mult=0.5", "data.crop_size=32", "data.val_resize=36", "data.val_crop=32", "data.workers=1",
            "data.batch_size=8", "schedule.epochs=3", "run.print_freq=100", "run.resume=auto",
            "model.stochastic_depth=0.1"]
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    tc.main(load_config(tc.Config, C_RECIPE, [*args[2:], f"run.output_dir={ref}"]))  # in-process: 1 thread too
    first = _popen([*args, f"run.output_dir={out}"], tmp_path)
    _into_epoch(out, first, 1)
    first.send_signal(signal.SIGTERM)  # preemption: a mid-epoch checkpoint, the loader's workers reading shards
    stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM at epoch 1" in stdout, stderr[-2000:]
    micro = torch.load(out / "checkpoints/last.pt", weights_only=True)["position"]["micro"]
    assert micro > 0, "expected a mid-epoch checkpoint"
    second = _popen([*args, f"run.output_dir={out}"], tmp_path)  # resumes mid-epoch 1 ...
    _into_epoch(out, second, 2)
    os.kill(second.pid, signal.SIGKILL)  # ... and dies without a word in epoch 2
    stdout = second.communicate()[0]
    assert f"micro-batch {micro}" in stdout
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 1, "finished before the kill"
    third = _script([*args, f"run.output_dir={out}"], tmp_path)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resumed from" in third.stdout
    a, b = tensors(ref), tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("last.pt.model"))
    assert [(r["epoch"], r["train_loss"], r["acc1"]) for r in _rows(ref)] == \
        [(r["epoch"], r["train_loss"], r["acc1"]) for r in _rows(out)]


def test_a_folder_read_as_shards_and_shards_read_as_a_folder_are_named(toy_data, tmp_path):
    folder = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=1, val=1)
    proc = run_in_process("train_classification.py", ["--recipe", C_RECIPE, *C_BASE, f"data.root={folder}",
                                                      "data.format=shards", f"run.output_dir={tmp_path / 'r'}"],
                          tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"train_classification.py: error: {folder / 'val/index.json'}: shard index not found; data.format shards "
        f"expects data.root/val/index.json as tools/make_shards.py writes it (it holds image files: set "
        "data.format=folder)")
    shards = shard(folder, tmp_path / "shards")
    proc = run_in_process("train_classification.py", ["--recipe", C_RECIPE, *C_BASE, f"data.root={shards}",
                                                      f"run.output_dir={tmp_path / 'r'}"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"train_classification.py: error: {shards / 'val'}: a shard set (it holds "
                                   "index.json), read as a folder of images; set data.format=shards")
