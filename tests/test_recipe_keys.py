"""Every key of train_classification.py's Config has an effect a user can observe (tests/deadkeys.py):
its main() runs in-process once per key on a 20-image ImageFolder, 2 epochs of 3 micro-batches."""

import shutil
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from tests.conftest import ROOT
from tests.deadkeys import dead_keys

import train_classification as tc

RECIPE = ROOT / "recipes/toy/classification.yaml"
BASE = ["model.name=mobilenet_v3_small", "model.width_mult=0.5", "data.crop_size=32", "data.val_resize=36",
        "data.val_crop=32", "data.workers=0", "data.batch_size=8", "schedule.epochs=2", "run.print_freq=100",
        "schedule.step_size=1", "run.divergence_factor=null"]

EXEMPT = {  # keys that legitimately change nothing observable in a short CPU run, with the reason
    "data.workers": "by design: augmentation is seeded per sample, so results do not depend on the worker count",
    "run.device": "'auto' and 'cpu' are the same device on a machine without a GPU",
    "train.cudnn_benchmark": "CUDA only",
    "train.tf32": "CUDA (Ampere and newer) only",
    "train.compile": "speed only; compiling costs about a minute on 2 CPU cores",
    "train.channels_last": "memory layout only (tests/data/test_classification.py checks the batch layout)",
    "run.allow_changes": "acts only when a run resumes with a changed recipe (tests/test_run_safety.py)",
    "run.divergence_factor": "acts only when the loss explodes (tests/test_run_safety.py, tests/engine/test_loop.py)",
    "run.output_dir": "the arms' directories are masked; checked directly in test_output_dir_is_where_the_run_goes",
}


def _alternatives(root: Path, weights: Path, fewer: Path) -> dict:
    return {
        "data.root": ([], str(fewer)),
        "model.weights": ([], str(weights)),
        "model.num_classes": ([], 12),
        "run.resume": ([], None),
        "run.print_freq": ([], 1),
        "run.keep_checkpoints": ([], 1),
        "run.global_batch": ([], 16),
        "train.accumulate": ([], 2),
        "train.amp": ([], "bf16"),
        "train.ema_every": (["train.ema_decay=0.5"], 2),
        "train.ema_decay": ([], 0.5),
        "train.clip_grad_norm": ([], 0.01),
        "optimizer.name": ([], "rmsprop_tf"),
        "optimizer.alpha": ([], 0.5),
        "optimizer.momentum": ([], 0.5),
        "optimizer.eps": (["optimizer.tf_eps=null", "optimizer.eps=0.01"], 0.5),
        "optimizer.tf_eps": ([], 0.1),
        "optimizer.nesterov": (["optimizer.name=sgd", "optimizer.tf_eps=null"], True),
        "optimizer.betas": (["optimizer.name=adamw", "optimizer.tf_eps=null", "optimizer.alpha=null"], [0.5, 0.9]),
        "optimizer.norm_weight_decay": ([], 0.5),
        "optimizer.weight_decay": ([], 0.05),
        "optimizer.lr_scaling": (["run.global_batch=16", "train.accumulate=1"], "linear"),
        "schedule.name": ([], "cosine"),
        "schedule.milestones": (["schedule.name=multistep", "schedule.gamma=0.5", "schedule.milestones=[5]"], [1]),
        "schedule.power": (["schedule.name=poly", "schedule.power=1.0"], 2.0),
        "schedule.min_lr": (["schedule.name=cosine", "schedule.epochs=3"], 0.001),
        "schedule.warmup_lr_init": (["schedule.warmup_epochs=1"], 0.0005),
        "schedule.warmup_iters": ([], 2),
        "schedule.warmup_factor": (["schedule.warmup_iters=2"], 0.5),
        "schedule.per_iteration": (["schedule.name=poly", "schedule.power=1.0"], True),
        "schedule.lr_noise": ([], [0, 2]),
        "schedule.lr_noise_pct": (["schedule.lr_noise=[0,2]"], 0.1),
        "schedule.lr_noise_std": (["schedule.lr_noise=[0,2]"], 0.1),
        "schedule.lr_noise_seed": (["schedule.lr_noise=[0,2]"], 7),
        "schedule.gamma": ([], 0.5),
        "data.hflip": ([], 1.0),
        "data.random_erasing": ([], 1.0),
        "data.erasing_scale": (["data.random_erasing=1.0"], [0.3, 0.6]),
        "data.erasing_ratio": (["data.random_erasing=1.0"], [1.0, 2.0]),
        "data.auto_augment": ([], None),
        "data.val_resize": ([], 64),
        "data.mean": ([], [0.4, 0.456, 0.406]),
        "data.std": ([], [0.3, 0.224, 0.225]),
        "run.world_size": ([], 8),
        "run.check_data": ([], True),
        "expected.acc1": ([], 50.0),
        "expected.acc5": ([], 90.0),
        "expected.source": ([], "another source"),
    }


def _tiny_imagefolder(src: Path, dst: Path, train: int, val: int) -> Path:
    for split, n in (("train", train), ("val", val)):
        for cls in sorted((src / split).iterdir()):
            (dst / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, dst / split / cls.name / f.name)
    return dst


@pytest.mark.slow
def test_every_classification_key_has_an_observable_effect(toy_data, tmp_path, capsys):
    root = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=2, val=1)
    fewer = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "fewer", train=1, val=1)
    weights = tmp_path / "weights.pth"
    torch.manual_seed(1)
    torch.save(tc.build_model(load_config(tc.Config, RECIPE, BASE)).state_dict(), weights)
    dead, checked = dead_keys(tc.Config, RECIPE, [*BASE, f"data.root={root}"], tc.main, tmp_path / "arms",
                              lambda: capsys.readouterr().out, _alternatives(root, weights, fewer), EXEMPT)
    assert not dead, f"recipe keys whose change had no observable effect: {dead}"
    assert len(checked) + len(EXEMPT) == len(__import__("tests.deadkeys", fromlist=["x"]).leaf_keys(tc.Config))
    assert len(EXEMPT) <= 10


def test_output_dir_is_where_the_run_goes(toy_data, tmp_path):
    root = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=1, val=1)
    out = tmp_path / "somewhere" / "else"
    tc.main(load_config(tc.Config, RECIPE, [*BASE, "schedule.epochs=1", f"data.root={root}",
                                             f"run.output_dir={out}"]))
    assert (out / "metrics.jsonl").exists() and (out / "checkpoints/epoch_000.pt").exists()
