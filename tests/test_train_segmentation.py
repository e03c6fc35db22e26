"""train_segmentation.py end to end on the toy COCO, on CPU.

The oracle for the logged metrics is built here from the annotation file alone: pycocotools' COCO API
rasterises each annotation, the published rule (VOC ids, overlap -> 255) is written out below, PIL
resizes the label map, torchvision's own LR-ASPP builder runs the checkpoint, and numpy counts.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as F2

import train_segmentation as ts
from engine.config import load_config
from engine.loop import launch
from tests.conftest import ROOT

TOY = ROOT / "recipes/toy/segmentation.yaml"
PUBLISHED = {"lraspp_mobilenet_v3_large.yaml": (57.9, 91.2, 55.8, 90.3),
             "deeplabv3_mobilenet_v3_large.yaml": (60.3, 91.2, 56.5, 90.3),
             "fcn_mobilenet_v3_large.yaml": (57.8, 90.9, 54.8, 90.1)}  # published-results.md
VOC_IDS = [5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]  # recipe-facts.md, VOC order


def fast(data, out, *extra):
    """The toy recipe made smaller still: 64 px crops, 2 epochs, random-init backbone, a few seconds."""
    return ["--recipe", str(TOY), f"data.root={data / 'coco'}", f"run.output_dir={out}",
            f"data.mask_cache={out.parent / 'mask_cache'}", "model.backbone_weights=null", "data.crop_size=64",
            "data.short_side=[48,128]", "data.eval_size=72", "data.workers=0", "schedule.epochs=2",
            "run.print_freq=100", *extra]


# One thread per run: on a CPU shared with other jobs, two spinning threads per process make a toy run
# several times slower (measured: 2.9 s of user time at 1 thread, 9.5 s at 2 under load).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_script(args, cwd, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train_segmentation.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, env=ENV)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the oracle


def oracle_scores(coco_root: Path, state_dict: dict, eval_size: int) -> tuple[float, float, int]:
    """(mIoU, pixel accuracy, images) of an LR-ASPP state dict on the toy val set, computed without
    data/segmentation.py or engine/confusion.py."""
    from pycocotools.coco import COCO

    coco = COCO(str(coco_root / "annotations/instances_val2017.json"))
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(num_classes=21, weights=None,
                                                                      weights_backbone=None)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    mat = np.zeros((21, 21), dtype=np.int64)
    ids = sorted(coco.getImgIds())
    for img_id in ids:
        info = coco.loadImgs(img_id)[0]
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None)) if a["category_id"] in VOC_IDS]
        gt = np.zeros((info["height"], info["width"]), dtype=np.uint8)
        if anns:
            masks = np.stack([coco.annToMask(a) for a in anns]).astype(np.int64)
            classes = np.array([VOC_IDS.index(a["category_id"]) + 1 for a in anns])
            gt = (masks * classes[:, None, None]).max(0).astype(np.uint8)
            gt[masks.sum(0) > 1] = 255
        gt = np.array(F1.resize(Image.fromarray(gt), eval_size, interpolation=InterpolationMode.NEAREST))
        image = torchvision.io.decode_image(str(coco_root / "val2017" / info["file_name"]))
        image = F2.resize(image, eval_size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        with torch.no_grad():
            pred = model(((image.float() / 255 - mean) / std)[None])["out"].argmax(1)[0].numpy()
        keep = gt != 255
        np.add.at(mat, (gt[keep].astype(np.int64), pred[keep]), 1)
    inter = np.diag(mat).astype(float)
    union = mat.sum(0) + mat.sum(1) - inter
    present = union > 0
    return 100 * float(np.mean(inter[present] / union[present])), 100 * inter.sum() / mat.sum(), len(ids)


# ----------------------------------------------------------------------------- recipes and the command line


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_recipes(name):
    path = ROOT / "recipes/segmentation" / name
    cfg = load_config(ts.Config, path)
    text = path.read_text()
    assert text.startswith("# ") and "Run:" in text
    miou, acc, low_miou, low_acc = PUBLISHED[name]
    assert (cfg.expected.miou, cfg.expected.pixel_acc) == (miou, acc)
    assert "data.eval_size=320" in text and f"expected.miou={low_miou} expected.pixel_acc={low_acc}" in text
    assert (cfg.data.batch_size, cfg.run.world_size, cfg.run.global_batch) == (4, 8, 32)
    o, s = cfg.optimizer, cfg.schedule
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.norm_weight_decay) == ("sgd", 0.01, 0.9, 1e-6, None)
    assert (s.name, s.epochs, s.power, s.per_iteration, s.warmup_epochs) == ("poly", 30, 0.9, True, 0)
    d = cfg.data
    assert (d.crop_size, d.short_side, d.hflip, d.eval_size) == (480, (260, 1040), 0.5, 520)
    assert cfg.train.sync_bn and cfg.train.amp == "none" and cfg.model.bn_momentum is None
    assert cfg.model.aux_loss == (name != "lraspp_mobilenet_v3_large.yaml")
    assert (cfg.train.aux_weight, cfg.train.aux_lr_mult) == (0.5, 10.0)


def test_toy_recipe_loads_and_config_errors_exit_2(capsys):
    cfg = load_config(ts.Config, TOY)
    assert cfg.model.backbone_weights == "runs/toy/classification/checkpoints/last.pt"
    with pytest.raises(SystemExit) as exc:
        launch(ts.Config, ts.main, ts.derived, argv=["--recipe", str(TOY), "data.eval_sise=320",
                                                     "model.aux_loss=true"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "data.eval_sise: unknown key (did you mean 'data.eval_size'?)" in err
    assert "model.aux_loss: LR-ASPP has no auxiliary head" in err


def test_print_config_derived_values(capsys):
    recipe = ROOT / "recipes/segmentation/deeplabv3_mobilenet_v3_large.yaml"
    with pytest.raises(SystemExit) as exc:
        launch(ts.Config, ts.main, ts.derived, argv=["--recipe", str(recipe), "--print-config"])
    assert exc.value.code == 0
    cfg = load_config(ts.Config, recipe)
    one = ts.derived(cfg, world_size=1, n_train=92_518)  # one process: 8 micro-batches of 4 per step
    assert (one["accumulate"], one["global_batch"], one["lr"], one["aux_lr"]) == (8, 32, 0.01, 0.1)
    assert one["optimizer_steps_per_epoch"] == math.ceil((92_518 // 4) / 8)
    assert ts.derived(cfg, world_size=8, n_train=92_518)["optimizer_steps_per_epoch"] == 92_518 // 8 // 4


# ----------------------------------------------------------------------------- training runs


def test_toy_run_matches_an_independent_oracle(toy_data, toy_backbone, tmp_path):
    """Run directory contract; the checkpoint loads into torchvision's LR-ASPP; its mIoU and pixel
    accuracy, recomputed from the annotation file by the oracle, are the logged ones; eval-only of
    the checkpoint as a torchvision state dict at the low-res size equals the oracle there too."""
    out = tmp_path / "run"
    proc = run_script(fast(toy_data, out, f"model.backbone_weights={toy_backbone}", "data.crop_size=96",
                           "data.eval_size=104"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_config(ts.Config, out / "config.yaml").model.backbone_weights == str(toy_backbone)
    log = rows(out)
    assert [r["epoch"] for r in log] == [0, 1]
    assert {"miou", "pixel_acc", "iou", "val_loss", "train_loss", "lr", "images_per_s", "val_images"} <= set(log[-1])
    assert len(log[-1]["iou"]) == 21
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_000.pt", "epoch_001.pt", "last.pt"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Tags()["images"]) >= 1 and len(events.Images(events.Tags()["images"][0])) == 2  # per epoch
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)["model"]
    miou, acc, n = oracle_scores(toy_data / "coco", state, 104)
    assert log[-1]["val_images"] == n
    assert 0 < acc < 100 and sum(v is not None and v > 0 for v in log[-1]["iou"]) >= 2  # not degenerate
    assert log[-1]["pixel_acc"] == pytest.approx(acc, abs=0.02)  # 0.02 points: a few tied argmax pixels
    assert log[-1]["miou"] == pytest.approx(miou, abs=0.05)

    weights = tmp_path / "lraspp_toy.pth"  # a plain state dict, as torchvision publishes them
    torch.save(state, weights)
    low = tmp_path / "low"
    proc = run_script(fast(toy_data, low, "run.eval_only=true", f"model.weights={weights}", "data.eval_size=64",
                           "expected.miou=55.8", "expected.pixel_acc=90.3"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((low / "eval.json").read_text())
    assert "(published 55.8)" in proc.stdout and ev["eval_size"] == 64 and ev["val_images"] == n
    miou, acc, _ = oracle_scores(toy_data / "coco", state, 64)
    assert ev["pixel_acc"] == pytest.approx(acc, abs=0.02) and ev["miou"] == pytest.approx(miou, abs=0.05)
    assert (low / "report.md").exists() and not (low / "checkpoints").exists()


def test_poly_lr_per_iteration_aux_group_and_torchvision_checkpoint(toy_data, tmp_path, monkeypatch, one_thread):
    """In process: DeepLabV3 with its aux head; every optimizer step's LR is recorded and compared with
    base * (1 - it / (iters_per_epoch * epochs)) ** 0.9, the aux group at 10x."""
    seen = []
    step = torch.optim.SGD.step

    def recording_step(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    out = tmp_path / "dl"
    cfg = load_config(ts.Config, TOY, fast(toy_data, out, "model.name=deeplabv3_mobilenet_v3_large",
                                           "model.aux_loss=true", "data.eval_size=48", "schedule.epochs=3",
                                           "optimizer.lr=0.01")[2:])
    ts.main(cfg)
    facts = json.loads((out / "env.json").read_text())["derived"]
    iters = facts["train_images"] // 4  # batch 4, the last short batch dropped
    assert facts["optimizer_steps_per_epoch"] == iters > 1
    expected = [0.01 * (1 - it / (iters * 3)) ** 0.9 for it in range(iters * 3)]
    assert len(seen) == len(expected)
    for (*main, aux), lr in zip(seen, expected):
        assert all(m == pytest.approx(lr, rel=1e-12) for m in main) and aux == pytest.approx(10 * lr, rel=1e-12)
    row = rows(out)[-1]
    assert {"loss_out", "loss_aux"} <= set(row) and row["lr"] == pytest.approx(expected[2 * iters])
    ref = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(num_classes=21, weights=None,
                                                                       weights_backbone=None, aux_loss=True)
    ref.load_state_dict(torch.load(out / "checkpoints/last.pt", weights_only=True)["model"], strict=True)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_sigkill_then_resume_is_bit_identical(toy_data, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    extra = ("schedule.epochs=3", "data.workers=1", "model.name=fcn_mobilenet_v3_large", "model.aux_loss=true",
             "data.eval_size=48")  # FCN's heads have dropout: the global RNG must resume too
    assert run_script(fast(toy_data, ref_out, *extra), tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_segmentation.py"), *fast(toy_data, out, *extra)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    first = out / "checkpoints" / "epoch_000.pt"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = int(torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"])
    assert done < 2, "the run finished before it could be killed"
    resumed = run_script(fast(toy_data, out, *extra), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints/last.pt'} (epoch {done} done)" in resumed.stdout
    a, b = _weights(ref_out / "checkpoints/last.pt"), _weights(out / "checkpoints/last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in rows(out)] == [0, 1, 2]
    assert [r["miou"] for r in rows(out)] == [r["miou"] for r in rows(ref_out)]


# ----------------------------------------------------------------------------- bad input


def _damaged_copy(toy_data, tmp_path, damage):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(toy_data / "coco", root / "coco")
    ann = root / "coco/annotations/instances_train2017.json"
    doc = json.loads(ann.read_text())
    kept = sorted({a["image_id"] for a in doc["annotations"]})
    name = next(im["file_name"] for im in doc["images"] if im["id"] == kept[0])
    victim = root / "coco/train2017" / name
    if damage == "missing_annotations":
        ann.unlink()
        return root, f"{ann}: annotation file not found"
    if damage == "no_voc_category":
        for a in doc["annotations"]:
            a["category_id"] = 13  # stop sign: not a VOC category
        ann.write_text(json.dumps(doc))
        return root, f"{ann}: no annotation of a VOC category"
    if damage == "no_height":  # was "error: segmentation"-like: a bare KeyError naming no file
        image = doc["images"][0]
        del image["height"]
        ann.write_text(json.dumps(doc))
        return root, (f"{ann}: 1 problem with its images or annotations:\n  image {image['id']} "
                      f"({image['file_name']}) has no 'height'")
    if damage == "polygon_two_points":
        a = next(a for a in doc["annotations"] if a["category_id"] in VOC_IDS and not a["iscrowd"])
        a["segmentation"] = [a["segmentation"][0][:4]]
        ann.write_text(json.dumps(doc))
        return root, (f"{ann}: 1 problem with its images or annotations:\n  annotation {a['id']} (image "
                      f"{a['image_id']}): polygon 0 has 4 coordinates; expected x, y pairs of at least 3 "
                      "points")
    if damage == "size_mismatch":
        w, h = Image.open(victim).size
        Image.open(victim).resize((w + 4, h)).save(victim)
        return root, f"{victim}: the image is {w + 4} x {h} px (width x height) but {ann} says {w} x {h}"
    victim.write_bytes(victim.read_bytes()[:500])  # undecodable
    return root, f"{victim}: unreadable or truncated JPEG image"


@pytest.mark.parametrize("damage", ["missing_annotations", "no_voc_category", "size_mismatch", "undecodable",
                                    "no_height", "polygon_two_points"])
def test_bad_input_is_one_message_naming_the_file(toy_data, tmp_path, capsys, damage, one_thread):
    root, message = _damaged_copy(toy_data, tmp_path, damage)
    with pytest.raises(SystemExit) as exc:
        launch(ts.Config, ts.main, ts.derived, argv=fast(root, tmp_path / "run", "schedule.epochs=1",
                                                         "run.check_data=true"))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and message in err, err
    assert "Traceback" not in err


def test_bad_val_image_and_untrainable_batch_of_one_are_refused_before_training(toy_data, tmp_path, capsys,
                                                                                one_thread):
    """Without --check-data: a truncated val image is found at start (header and end read), not after a
    training epoch; DeepLabV3 with batches of 1 image (its ASPP pooling branch has BatchNorm over a 1 x 1
    map) is refused before the first step."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(toy_data / "coco", root / "coco")
    victim = sorted((root / "coco/val2017").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[:700])
    for extra, message in (
            ([], f"error: the validation set: 1 of 8 images cannot be used:\n  {victim}: unreadable or "
                 "truncated JPEG image (Image is incomplete or truncated)\n"),
            (["model.name=deeplabv3_mobilenet_v3_large", "data.batch_size=1", "run.global_batch=null"],
             "error: data.batch_size 1: every training batch holds 1 image per process, and the model cannot "
             "train on one image (its BatchNorm needs more than one value per channel: Expected more than 1 "
             "value per channel when training, got input size torch.Size([1, 256, 1, 1])); choose "
             "data.batch_size 2 or more (the published runs use 4 per process)\n")):
        if extra:
            shutil.copy(toy_data / "coco/val2017" / victim.name, victim)
        out = tmp_path / f"run{len(extra)}"
        with pytest.raises(SystemExit) as exc:
            launch(ts.Config, ts.main, ts.derived, argv=fast(root, out, "schedule.epochs=1", *extra))
        err = capsys.readouterr().err
        assert exc.value.code == 1 and err.endswith(message), err
        assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_two_processes_and_eval_batches_give_the_one_process_batch_1_numbers(toy_data, tmp_path):
    """The confusion matrix is reduced across ranks with each val image counted once, and size-grouped
    evaluation batches score as batch 1: eval-only of the same (randomized, torchvision) weights."""
    from tests.oracle import randomize

    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(num_classes=21, weights=None,
                                                                      weights_backbone=None)
    randomize(model, 0, inputs=torch.randn(1, 3, 72, 96))
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)

    def args(out, batch):
        return fast(toy_data, out, "run.eval_only=true", f"model.weights={weights}", f"data.eval_batch_size={batch}")

    one = run_script(args(tmp_path / "one", 1), tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29637",
                          str(ROOT / "train_segmentation.py"), *args(tmp_path / "two", 4)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    n = len(json.loads((toy_data / "coco/annotations/instances_val2017.json").read_text())["images"])
    assert a["val_images"] == b["val_images"] == n
    assert sum(v is not None for v in a["iou"]) > 2 and 0 < a["pixel_acc"] < 100
    assert (a["miou"], a["pixel_acc"], a["iou"]) == (b["miou"], b["pixel_acc"], b["iou"])


def test_benchmark_runs_and_reports_ratios(toy_data, capsys, one_thread):
    """bench/segmentation.py at tiny sizes (its figures are read from `make bench`, never asserted here)."""
    from bench import segmentation as bench

    res = bench.main(["--data", str(toy_data), "--crop", "48", "--eval-size", "56", "--low-size", "40", "--batch", "2",
                      "--images", "2", "--reps", "1", "--speedup-models", "lraspp_mobilenet_v3_large"])
    assert res["train_ratio"] > 0 and res["eval_ratio"] > 0 and "published 65.26%" in capsys.readouterr().out
