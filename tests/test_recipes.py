"""Every recipe loads strictly with its script's Config, carries the published numbers of its row, and
states a global batch its own world size and per-process batch make."""

import importlib
from pathlib import Path

import pytest

import train_classification as tc
from engine.config import load_config
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
SCRIPT = {"detection": "train_detection", "segmentation": "train_segmentation", "qat": "train_qat"}


def script_for(path: Path):
    """recipes/<task>/x.yaml and recipes/toy/<task>.yaml belong to train_<task>.py; the rest to classification."""
    key = path.stem if path.parent.name == "toy" else path.parent.name
    return importlib.import_module(SCRIPT.get(key, "train_classification"))
PUBLISHED = {  # published-results.md
    "large.yaml": (74.042, 91.340), "small.yaml": (67.668, 87.402), "large_improved.yaml": (75.536, 92.368),
    "1_baseline_mobilenetv2_style.yaml": (71.542, 90.068), "2_rmsprop_default_eps.yaml": (70.684, 89.38),
    "3_rmsprop_adjusted_eps_lr.yaml": (71.764, 90.178), "4_augmentation_tuned.yaml": (73.86, 91.292),
    "5_checkpoint_averaging.yaml": (74.028, 91.382), "6_label_smoothing_sd_lr_noise.yaml": (75.536, 92.368),
}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_loads_and_states_its_row(path: Path):
    cfg = load_config(script_for(path).Config, path)
    trains = getattr(getattr(cfg, "qat", None), "mode", "qat") != "ptq"  # PTQ: one process, nothing trained
    if path.parent.name != "toy" and trains:  # the published runs: 8 processes; the global batch is theirs
        assert cfg.run.world_size == 8
        assert cfg.run.global_batch == cfg.run.world_size * cfg.data.batch_size
    header = path.read_text().splitlines()[0]
    assert header.startswith("# ")
    assert "Run:" in path.read_text()
    if path.name in PUBLISHED:
        assert (cfg.expected.acc1, cfg.expected.acc5) == PUBLISHED[path.name]


def test_published_recipe_values():
    cfg = load_config(tc.Config, ROOT / "recipes/large.yaml")
    assert cfg.data.batch_size == 128 and cfg.schedule.epochs == 600
    assert cfg.optimizer.name == "rmsprop" and cfg.optimizer.lr == 0.064 and cfg.optimizer.alpha == 0.9
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 1e-5
    assert round(cfg.optimizer.torch_eps(), 4) == 0.0316
    assert (cfg.schedule.name, cfg.schedule.step_size, cfg.schedule.gamma) == ("step", 2, 0.973)
    assert cfg.data.auto_augment == "imagenet" and cfg.data.auto_augment_interpolation == "nearest"
    assert cfg.data.random_erasing == 0.2 and cfg.train.label_smoothing == 0.0 and cfg.train.amp == "none"
    assert (cfg.data.val_resize, cfg.data.val_crop) == (256, 224)
    improved = load_config(tc.Config, ROOT / "recipes/large_improved.yaml")
    assert improved.train.label_smoothing > 0 and improved.model.stochastic_depth > 0
    assert improved.schedule.lr_noise is not None
