"""Every key of every script's Config has an effect a user can observe (tests/deadkeys.py): each
script's main() runs in-process once per key on a few toy images, one or two short epochs, and the run
directory and log must differ from the unchanged run's. The optimizer, schedule and run sections and
the shared training switches take their alternatives from tests.deadkeys.shared_alternatives, so the
same change is tried in every script."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine import checkpoint
from engine.config import load_config
from models import build
from tests.conftest import ROOT
from tests.deadkeys import SHARED_EXEMPT, dead_keys, leaf_keys, shared_alternatives
from tests.oracle import randomize

import train_classification as tc
import train_detection as td
import train_qat as tq
import train_segmentation as ts


def walk(module, recipe: Path, base: list[str], tmp_path: Path, alternatives: dict, exempt: dict):
    dead, checked = dead_keys(module.__name__, recipe, base, tmp_path / "arms", alternatives, exempt)
    assert not dead, f"recipe keys of {module.__name__} whose change had no observable effect: {dead}"
    assert sorted(checked + list(exempt)) == sorted(k for k, _ in leaf_keys(module.Config))
    assert len(exempt) <= 13


def _tiny_imagefolder(src: Path, dst: Path, train: int, val: int) -> Path:
    for split, n in (("train", train), ("val", val)):
        for cls in sorted((src / split).iterdir()):
            (dst / split / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, dst / split / cls.name / f.name)
    return dst


def _tiny_coco(src: Path, dst: Path, train: int, val: int, voc: bool = False) -> Path:
    """The toy COCO cut to the first `train`/`val` images that have annotations (of a VOC category: voc)."""
    from data.segmentation import CAT_LIST

    shutil.copytree(src, dst)
    for split, n in (("train", train), ("val", val)):
        path = dst / f"annotations/instances_{split}2017.json"
        doc = json.loads(path.read_text())
        ids = sorted({a["image_id"] for a in doc["annotations"] if not voc or a["category_id"] in CAT_LIST[1:]})
        keep = set(ids[:n])
        doc["images"] = [im for im in doc["images"] if im["id"] in keep]
        doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
        path.write_text(json.dumps(doc))
        for f in (dst / f"{split}2017").iterdir():
            if f.name not in {im["file_name"] for im in doc["images"]}:
                f.unlink()
    return dst


def _classifier_checkpoint(path: Path, seed: int, randomized: bool = True, **kw) -> Path:
    """A MobileNetV3-Large checkpoint of this project's format: at random, non-degenerate weights (at
    torchvision's initialisation the logits are ~0, so an evaluation-only key would change nothing), or
    at torchvision's seeded initialisation (randomized=False)."""
    torch.manual_seed(seed)
    model = build("mobilenet_v3_large", **kw)
    if randomized:
        randomize(model, seed, inputs=torch.randn(2, 3, 64, 64))
    checkpoint.save(checkpoint.new(model.state_dict(), epoch=1), path)
    return path


# ----------------------------------------------------------------------------- classification

C_RECIPE = ROOT / "recipes/toy/classification.yaml"
C_BASE = ["model.name=mobilenet_v3_small", "model.width_mult=0.5", "data.crop_size=32", "data.val_resize=36",
          "data.val_crop=32", "data.workers=0", "data.batch_size=8", "schedule.epochs=2", "run.print_freq=100",
          "schedule.step_size=1", "run.divergence_factor=null"]
C_EXEMPT = {**SHARED_EXEMPT,
            "train.compile": "speed only; compiling costs about a minute on 2 CPU cores"}


def _classification_alternatives(weights: Path, fewer: Path) -> dict:
    return {
        **shared_alternatives(batch_size=8, per_iteration=False),
        "data.root": ([], str(fewer)),
        "model.weights": ([], str(weights)),
        "model.num_classes": ([], 12),
        "train.ema_every": (["train.ema_decay=0.5"], 2),
        "train.ema_decay": ([], 0.5),
        "optimizer.name": ([], "rmsprop_tf"),
        "data.hflip": ([], 1.0),
        "data.random_erasing": ([], 1.0),
        "data.erasing_scale": (["data.random_erasing=1.0"], [0.3, 0.6]),
        "data.erasing_ratio": (["data.random_erasing=1.0"], [1.0, 2.0]),
        "data.auto_augment": ([], None),
        "data.val_resize": ([], 64),
        "data.mean": ([], [0.4, 0.456, 0.406]),
        "data.std": ([], [0.3, 0.224, 0.225]),
        "expected.acc1": ([], 50.0),
        "expected.acc5": ([], 90.0),
    }


@pytest.mark.slow
def test_every_classification_key_has_an_observable_effect(toy_data, tmp_path):
    root = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=2, val=1)
    fewer = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "fewer", train=1, val=1)
    weights = tmp_path / "weights.pth"
    torch.manual_seed(1)
    torch.save(tc.build_model(load_config(tc.Config, C_RECIPE, C_BASE)).state_dict(), weights)
    walk(tc, C_RECIPE, [*C_BASE, f"data.root={root}"], tmp_path, _classification_alternatives(weights, fewer),
         C_EXEMPT)


def test_output_dir_is_where_the_run_goes(toy_data, tmp_path):
    root = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=1, val=1)
    out = tmp_path / "somewhere" / "else"
    tc.main(load_config(tc.Config, C_RECIPE, [*C_BASE, "schedule.epochs=1", f"data.root={root}",
                                               f"run.output_dir={out}"]))
    assert (out / "metrics.jsonl").exists() and (out / "checkpoints/epoch_000.pt").exists()


# ----------------------------------------------------------------------------- detection

D_RECIPE = ROOT / "recipes/toy/detection.yaml"
# 4 training images (2 optimizer steps of 2), 2 val images, 64-80 px, few proposals and RoIs, every
# detection kept and drawn, so that an untrained model's low scores still reach the results and images.
D_BASE = ["model.min_size=64", "model.max_size=80", "model.box_batch_size_per_image=16",
          "model.rpn_pre_nms_top_n_train=50", "model.rpn_post_nms_top_n_train=50", "model.rpn_pre_nms_top_n_test=20",
          "model.rpn_post_nms_top_n_test=20", "model.box_score_thresh=0.0", "data.workers=0", "schedule.epochs=1",
          "run.print_freq=100", "train.draw_images=1", "train.draw_score_thresh=0.0", "run.divergence_factor=null"]
D_EXEMPT = {**SHARED_EXEMPT,
            "model.name": "a label (torchvision's builder name): the two builders differ only in min_size, "
                          "max_size and the test-time RPN top-n, which recipes state as keys of their own"}


@pytest.mark.slow
def test_every_detection_key_has_an_observable_effect(toy_data, tmp_path):
    root = _tiny_coco(toy_data / "coco", tmp_path / "coco", train=4, val=2)
    fewer = _tiny_coco(toy_data / "coco", tmp_path / "fewer", train=2, val=2)
    outside = _tiny_coco(toy_data / "coco", tmp_path / "outside", train=4, val=2)
    ann = outside / "annotations/instances_train2017.json"  # one box 3 px beyond its image's right edge
    doc = json.loads(ann.read_text())
    width = {im["id"]: im["width"] for im in doc["images"]}[doc["annotations"][0]["image_id"]]
    x, y, w, h = doc["annotations"][0]["bbox"]
    doc["annotations"][0]["bbox"] = [width - w + 3, y, w, h]
    ann.write_text(json.dumps(doc))
    # torchvision-initialised backbones: the detector diverges from a randomised one at the toy LR, and its
    # heads' outputs are not ~0 anyway (the evaluation keys below all act on them)
    backbone = _classifier_checkpoint(tmp_path / "backbone.pt", 0, randomized=False, num_classes=10)
    other_backbone = _classifier_checkpoint(tmp_path / "backbone1.pt", 1, randomized=False, num_classes=10)
    base = [*D_BASE, f"data.root={root}", f"model.backbone_weights={backbone}"]
    detector = tmp_path / "detector.pth"
    torch.manual_seed(2)
    torch.save(td.build_model(load_config(td.Config, D_RECIPE, base)).state_dict(), detector)
    alternatives = {
        **shared_alternatives(batch_size=2, per_iteration=False),
        "model.backbone_weights": ([], str(other_backbone)),
        "model.weights": ([], str(detector)),
        "model.trainable_layers": ([], 6),
        "model.backbone_bn_eps": ([], 0.1),
        "model.min_size": ([], 72),
        "model.max_size": (["model.min_size=80"], 90),
        "model.rpn_pre_nms_top_n_train": ([], 10),
        "model.rpn_post_nms_top_n_train": ([], 5),
        "model.rpn_pre_nms_top_n_test": ([], 10),
        "model.rpn_post_nms_top_n_test": ([], 5),
        "model.rpn_score_thresh": ([], 0.6),
        "model.box_batch_size_per_image": ([], 4),
        "model.box_score_thresh": ([], 0.011),
        "model.box_detections_per_img": ([], 3),
        "data.root": ([], str(fewer)),
        "data.hflip": ([], 1.0),
        "data.aspect_ratio_group_factor": ([], -1),
        "data.box_margin": ([f"data.root={outside}", "data.box_margin=5"], 1.0),
        "train.draw_images": ([], 2),
        "train.draw_score_thresh": ([], 0.5),
        "schedule.warmup_iters": (["schedule.warmup_iters=1000"], 0),
        "expected.bbox_map": ([], 32.8),
    }
    walk(td, D_RECIPE, base, tmp_path, alternatives, D_EXEMPT)


# ----------------------------------------------------------------------------- segmentation

S_RECIPE = ROOT / "recipes/toy/segmentation.yaml"
S_BASE = ["data.crop_size=48", "data.short_side=[40,80]", "data.eval_size=48", "data.batch_size=2",
          "data.eval_batch_size=1", "data.workers=0", "schedule.epochs=1", "run.print_freq=100",
          "train.draw_images=1", "run.divergence_factor=null"]
S_EXEMPT = {**SHARED_EXEMPT,
            "data.mask_cache": "where the rasterised masks are cached, outside the run; the masks are the same "
                               "(tests/data/test_segmentation.py: test_mask_cache_*)",
            "train.sync_bn": "acts only in a distributed CUDA run (SyncBatchNorm needs NCCL)",
            "model.num_classes": "one valid value: the COCO->VOC data has 21 classes (another is a config error)",
            "data.eval_batch_size": "speed only: equal-size images are batched, giving batch 1's numbers (test_train_"
                                    "segmentation.py: test_two_processes_and_eval_batches_give_the_one_process_...)"}


@pytest.mark.slow
def test_every_segmentation_key_has_an_observable_effect(toy_data, tmp_path):
    root = _tiny_coco(toy_data / "coco", tmp_path / "coco", train=4, val=2, voc=True)
    fewer = _tiny_coco(toy_data / "coco", tmp_path / "fewer", train=2, val=2, voc=True)
    backbone = _classifier_checkpoint(tmp_path / "backbone.pt", 0, num_classes=10)
    other_backbone = _classifier_checkpoint(tmp_path / "backbone1.pt", 1, num_classes=10)
    base = [*S_BASE, f"data.root={root}", f"model.backbone_weights={backbone}",
            f"data.mask_cache={tmp_path / 'masks'}"]
    weights = tmp_path / "lraspp.pth"
    torch.manual_seed(2)
    torch.save(ts.build_model(load_config(ts.Config, S_RECIPE, base).model).state_dict(), weights)
    alternatives = {
        **shared_alternatives(batch_size=2, per_iteration=True),
        "model.backbone_weights": ([], str(other_backbone)),
        "model.weights": ([], str(weights)),
        "model.aux_loss": (["model.name=fcn_mobilenet_v3_large"], True),
        "model.bn_momentum": ([], 0.5),
        "data.root": ([], str(fewer)),
        "data.crop_size": ([], 40),
        "data.short_side": ([], [48, 96]),
        "data.hflip": ([], 1.0),
        "data.eval_size": ([], 56),
        "data.mean": ([], [0.4, 0.456, 0.406]),
        "data.std": ([], [0.3, 0.224, 0.225]),
        "train.aux_weight": (["model.name=fcn_mobilenet_v3_large", "model.aux_loss=true"], 1.0),
        "train.aux_lr_mult": (["model.name=fcn_mobilenet_v3_large", "model.aux_loss=true"], 1.0),
        "train.draw_images": ([], 2),
        "expected.miou": ([], 57.9),
        "expected.pixel_acc": ([], 91.2),
    }
    walk(ts, S_RECIPE, base, tmp_path, alternatives, S_EXEMPT)


# ----------------------------------------------------------------------------- QAT and PTQ

Q_RECIPE = ROOT / "recipes/toy/qat.yaml"
Q_BASE = ["data.crop_size=32", "data.val_resize=36", "data.val_crop=32", "data.batch_size=8", "data.workers=0",
          "schedule.epochs=1", "schedule.step_size=1", "run.print_freq=100", "qat.num_observer_update_epochs=1",
          "qat.num_batch_norm_update_epochs=1", "qat.calibration_batches=1", "qat.export=false",
          "run.divergence_factor=null"]  # the TorchScript export (qat.export, checked on its own) takes 3 s a run
Q_EXEMPT = {**SHARED_EXEMPT,
            "model.name": "one valid value: MobileNetV3-Large is the only quantizable model published",
            "train.amp": "one valid value (none): fake quantization and its observers run in fp32"}


@pytest.mark.slow
def test_every_qat_key_has_an_observable_effect(toy_data, tmp_path):
    root = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=2, val=1)
    fewer = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "fewer", train=1, val=1)
    weights = _classifier_checkpoint(tmp_path / "float.pt", 0, num_classes=10)
    other = _classifier_checkpoint(tmp_path / "float1.pt", 1, num_classes=10)
    base = [*Q_BASE, f"data.root={root}", f"model.weights={weights}"]
    alternatives = {
        **shared_alternatives(batch_size=8, per_iteration=False),
        "model.weights": ([], str(other)),
        "model.num_classes": ([], 12),  # a 10-class checkpoint in a 12-class model: refused, naming the keys
        "model.dropout": ([], 0.9),
        "model.bn_momentum": ([], 0.9),
        "data.root": ([], str(fewer)),
        "data.hflip": ([], 1.0),
        "data.random_erasing": ([], 1.0),
        "data.erasing_scale": (["data.random_erasing=1.0"], [0.3, 0.6]),
        "data.erasing_ratio": (["data.random_erasing=1.0"], [1.0, 2.0]),
        "data.auto_augment_interpolation": (["data.auto_augment=imagenet"], "nearest"),
        "data.val_resize": ([], 64),
        "data.mean": ([], [0.4, 0.456, 0.406]),
        "data.std": ([], [0.3, 0.224, 0.225]),
        "train.label_smoothing": ([], 0.5),
        "qat.num_observer_update_epochs": (["schedule.epochs=2"], 0),
        "qat.num_batch_norm_update_epochs": (["schedule.epochs=2"], 0),
        "qat.calibration_batches": (["qat.mode=ptq"], 2),
        "expected.acc1": ([], 73.0),
        "expected.acc5": ([], 90.0),
    }
    walk(tq, Q_RECIPE, base, tmp_path, alternatives, Q_EXEMPT)
