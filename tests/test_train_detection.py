"""train_detection.py end to end on (a trimmed copy of) the toy COCO, on CPU.

Oracles: torchvision's own Faster R-CNN builder runs the checkpoint and pycocotools' COCOeval scores it
(the logged mAP and the detections file must agree with both); the warm-up LR is a formula written here
and torch's LinearLR + MultiStepLR (the reference's schedulers); resume is compared bit for bit with an
uninterrupted run.
"""

import contextlib
import io
import json
import os
import re
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
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.functional import to_tensor

import train_detection as td
from engine import checkpoint
from engine.config import load_config
from engine.loop import launch
from engine.optim import EpochSchedule, build_optimizer, param_groups
from models import build
from tests.conftest import ROOT

TOY = ROOT / "recipes/toy/detection.yaml"
PUBLISHED = {"fasterrcnn_mobilenet_v3_large_fpn.yaml": (32.8, 800, 1333, 1000),
             "fasterrcnn_mobilenet_v3_large_320_fpn.yaml": (22.8, 320, 640, 150),
             "fasterrcnn_mobilenet_v3_large_320_fpn_no_rpn_tuning.yaml": (23.0, 320, 640, 1000)}
N_TRAIN = 8  # training images of the trimmed toy set: 4 optimizer steps per epoch, a 3-step warm-up
# The toy recipe made smaller still (128-160 px, 32 RoIs per image, 50 test proposals), every detection kept
# (box_score_thresh 0) and drawn (draw_score_thresh 0) so that an early model's low scores are not all cut.
MODEL = ["model.min_size=128", "model.max_size=160", "model.box_batch_size_per_image=32",
         "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=50", "model.box_score_thresh=0.0"]


def fast(data, out, backbone, *extra):
    return ["--recipe", str(TOY), f"data.root={data}", f"run.output_dir={out}",
            f"model.backbone_weights={backbone}", *MODEL, "data.workers=0", "schedule.epochs=2",
            "run.print_freq=1", "train.draw_score_thresh=0.0", *extra]


def run_script(args, cwd, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "train_detection.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, check=False)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def small(toy_data, tmp_path_factory):
    """The toy COCO with its training set cut to N_TRAIN usable images (plus an empty one), and a
    classification checkpoint of this project's format (10-class head) as the backbone weights."""
    import shutil

    root = tmp_path_factory.mktemp("det") / "coco"
    shutil.copytree(toy_data / "coco", root)
    path = root / "annotations/instances_train2017.json"
    doc = json.loads(path.read_text())
    with_boxes = sorted({a["image_id"] for a in doc["annotations"]})
    empty = sorted({im["id"] for im in doc["images"]} - set(with_boxes))
    keep = set(with_boxes[:N_TRAIN] + empty[:1])
    doc["images"] = [im for im in doc["images"] if im["id"] in keep]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in keep]
    path.write_text(json.dumps(doc))
    backbone = root.parent / "toy_classifier.pt"
    torch.manual_seed(0)
    state = build("mobilenet_v3_large", num_classes=10).state_dict()
    checkpoint.save(checkpoint.new(state, epoch=1), backbone)
    return root, backbone


@pytest.fixture(scope="module", autouse=True)
def fresh_thread_count():
    """In-process runs here are compared bit for bit with subprocess runs, so they use a fresh process's
    thread count: an earlier test may have changed ours (bench/data_throughput.py sets 1), and the thread
    count changes the float summation order of CPU convolutions."""
    fresh = int(subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                               capture_output=True, text=True, check=True).stdout)
    threads = torch.get_num_threads()
    torch.set_num_threads(fresh)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(small, tmp_path_factory):
    """One uninterrupted 2-epoch run, in process, recording the LR of every optimizer step."""
    data, backbone = small
    out = tmp_path_factory.mktemp("ref") / "run"
    lrs = []
    step = torch.optim.SGD.step

    def recording_step(self, *a, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(torch.optim.SGD, "step", recording_step)
        td.main(load_config(td.Config, TOY, fast(data, out, backbone)[2:]))
    return out, lrs, stdout.getvalue()


# ----------------------------------------------------------------------------- recipes and the command line


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_recipes_state_every_published_value(name):
    path = ROOT / "recipes/detection" / name
    text = path.read_text()
    assert text.startswith("# ") and "Run:" in text and "train_detection.py" in text
    cfg = load_config(td.Config, path)
    published, min_size, max_size, top_n = PUBLISHED[name]
    m, d, o, s = cfg.model, cfg.data, cfg.optimizer, cfg.schedule
    assert cfg.expected.bbox_map == published and cfg.expected.source
    assert (d.batch_size, cfg.run.world_size, cfg.run.global_batch) == (2, 8, 16)
    assert (o.name, o.lr, o.momentum, o.weight_decay, o.norm_weight_decay) == ("sgd", 0.02, 0.9, 1e-4, None)
    assert (s.name, s.epochs, s.milestones, s.gamma) == ("multistep", 26, [16, 22], 0.1)
    assert (s.warmup_iters, s.warmup_factor, s.warmup_epochs, s.per_iteration) == (1000, 0.001, 0, False)
    assert (d.aspect_ratio_group_factor, d.hflip) == (3, 0.5)
    assert (m.num_classes, m.trainable_layers, m.frozen_bn, m.rpn_score_thresh) == (91, 3, True, 0.05)
    assert m.backbone_bn_eps == 1e-5  # torchvision's FrozenBatchNorm2d default, as the weights were trained
    assert (m.min_size, m.max_size, m.rpn_pre_nms_top_n_test, m.rpn_post_nms_top_n_test) == \
        (min_size, max_size, top_n, top_n)
    assert (m.rpn_pre_nms_top_n_train, m.rpn_post_nms_top_n_train) == (2000, 2000)
    assert m.box_batch_size_per_image == 512
    assert (m.box_score_thresh, m.box_detections_per_img, cfg.train.amp) == (0.05, 100, "none")


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn",
                                  "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_recipe_builds_torchvisions_published_detector(name):
    """The recipe's model has the settings torchvision's builder gives the published weights."""
    cfg = load_config(td.Config, ROOT / "recipes/detection" / f"{name}.yaml", ["model.backbone_weights=null"])
    ours = td.build_model(cfg)
    ref = getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, num_classes=91)
    for attr in ("_pre_nms_top_n", "_post_nms_top_n", "score_thresh", "nms_thresh", "min_size"):
        assert getattr(ours.rpn, attr) == getattr(ref.rpn, attr), attr
    rh, th = ours.roi_heads, ref.roi_heads
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img, rh.fg_bg_sampler.batch_size_per_image) == \
        (th.score_thresh, th.nms_thresh, th.detections_per_img, th.fg_bg_sampler.batch_size_per_image)
    assert (ours.transform.min_size, ours.transform.max_size) == \
        (ref.transform.min_size, ref.transform.max_size)
    assert list(ours.state_dict()) == [k for k in ref.state_dict() if not k.endswith("num_batches_tracked")]
    norms = [mod for mod in ours.backbone.body.modules() if isinstance(mod, FrozenBatchNorm2d)]
    ref_norms = [mod for mod in ref.backbone.body.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(norms) == len(ref_norms) > 40 and {n.eps for n in norms} == {n.eps for n in ref_norms} == {1e-5}


def test_config_errors_exit_2_and_print_config_counts_steps(small, capsys):
    data, _ = small
    with pytest.raises(SystemExit) as exc:
        launch(td.Config, td.main, td.derived,
               argv=["--recipe", str(TOY), "model.min_sise=96", "data.hflip=2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "model.min_sise: unknown key (did you mean 'model.min_size'?)" in err
    assert "data.hflip: expected a probability in [0, 1], got 2.0" in err
    with pytest.raises(SystemExit) as exc:
        launch(td.Config, td.main, td.derived,
               argv=["--recipe", str(TOY), f"data.root={data}", "--print-config"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert f"train_images: {N_TRAIN}" in out and f"optimizer_steps_per_epoch: {N_TRAIN // 2}" in out
    assert f"warmup_steps: {N_TRAIN // 2 - 1}" in out
    cfg = load_config(td.Config, ROOT / "recipes/detection/fasterrcnn_mobilenet_v3_large_fpn.yaml")
    one = td.derived(cfg, world_size=1, n_train=117_266)  # one process accumulates 8 micro-batches of 2
    assert (one["accumulate"], one["global_batch"], one["lr"]) == (8, 16, 0.02)
    assert one["optimizer_steps_per_epoch"] == -(-(117_266 // 2) // 8) and one["warmup_steps"] == 1000
    assert td.derived(cfg, world_size=8, n_train=117_266)["optimizer_steps_per_epoch"] == 117_266 // 16


def test_backbone_weights_torchvision_file_or_project_checkpoint(tmp_path):
    tv = torchvision.models.mobilenet_v3_large()
    with torch.no_grad():
        for p in tv.parameters():
            p.normal_()
    files = {"torchvision": tmp_path / "mobilenet_v3_large.pth", "project": tmp_path / "toy_classifier.pt"}
    torch.save(tv.state_dict(), files["torchvision"])  # torchvision's ImageNet file: a plain state dict
    head = {k: torch.zeros(10, *v.shape[1:]) if k.startswith("classifier.3.") else v  # a 10-class head
            for k, v in tv.state_dict().items()}
    checkpoint.save(checkpoint.new(head, epoch=19, optimizer={}), files["project"])  # as train_classification
    for kind, path in files.items():
        body = td.build_model(load_config(td.Config, TOY, [f"model.backbone_weights={path}"])).backbone.body
        ref = tv.features.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in body.state_dict().items()), kind  # classifier ignored
    small_net = tmp_path / "small.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), small_net)
    with pytest.raises(ValueError, match=r"small.pth: the weights do not fit the MobileNetV3 backbone "
                                         r"\(classifier ignored\).*\n  missing from the file \(\d+\):\n"
                                         r"    features\.1\.block"):
        td.build_model(load_config(td.Config, TOY, [f"model.backbone_weights={small_net}"]))


# ----------------------------------------------------------------------------- the warm-up


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_warmup_and_milestones_per_optimizer_step_match_the_reference_schedulers(name):
    """Each published recipe's LR at every optimizer step of epochs 0-1 and at each epoch, against the
    formula and against the reference's own schedulers (LinearLR stepped per iteration in epoch 0,
    MultiStepLR per epoch)."""
    cfg = load_config(td.Config, ROOT / "recipes/detection" / name)
    steps = 117_266 // 16
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg.optimizer, param_groups(model, 1e-4, None))
    sched = EpochSchedule(cfg.schedule, opt)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.02)
    multistep = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[16, 22], gamma=0.1)
    warm = torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=0.001, total_iters=min(1000, steps - 1))
    for epoch in range(26):
        for step in range(steps if epoch < 2 else 1):  # the Loop: set before step 0, then after each step
            lr = sched.set(opt, epoch, step, steps)
            formula = 0.02 * 0.1 ** sum(epoch >= m for m in (16, 22))
            if epoch == 0:
                formula *= 0.001 + 0.999 * min(step, 1000) / 1000
            assert lr == pytest.approx(formula, rel=1e-12, abs=1e-15), (epoch, step)
            assert lr == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9), (epoch, step)
            ref_opt.step()  # no gradients: changes nothing, keeps the schedulers' order check quiet
            if epoch == 0:
                warm.step()
        multistep.step()
        if epoch == 0:  # the reference's warm-up scheduler lives in epoch 0 only
            ref_opt.param_groups[0]["lr"] = 0.02


def test_warmup_in_a_run_is_the_formula_at_every_optimizer_step(reference):
    _, lrs, log = reference
    steps, total = N_TRAIN // 2, N_TRAIN // 2 - 1  # warm-up over min(1000, steps - 1)
    lr = load_config(td.Config, TOY).optimizer.lr
    expected = [lr * (0.001 + 0.999 * min(s, total) / total) for s in range(steps)] + [lr] * steps
    assert lrs == pytest.approx(expected, rel=1e-12)
    printed = [float(x) for x in re.findall(r"^epoch 0 \d+/\d+ .* lr (\S+)", log, re.MULTILINE)]
    assert printed == pytest.approx(expected[:steps], rel=1e-3)


# ----------------------------------------------------------------------------- a toy run and its oracles


def test_run_directory_contract(reference, small):
    out, _, log = reference
    expected = load_config(td.Config, TOY, fast(small[0], out, small[1])[2:])
    assert load_config(td.Config, out / "config.yaml") == expected  # the resolved config loads back
    log_rows = rows(out)
    assert [r["epoch"] for r in log_rows] == [0, 1]
    for r in log_rows:
        assert {"bbox_map", "bbox_stats", "val_images", "train_loss", "lr", "loss_classifier", "loss_box_reg",
                "loss_objectness", "loss_rpn_box_reg"} <= set(r)
        assert len(r["bbox_stats"]) == 12 and r["bbox_map"] == 100 * r["bbox_stats"][0]
        assert r["val_images"] == 8
        # the toy val set has no large object: COCOeval's -1 ("no data") is written as null, never as a number
        assert r["bbox_stats"][5] is None and r["bbox_stats"][11] is None and r["bbox_APl"] is None
        assert all(v is None or 0 <= v <= 1 for v in r["bbox_stats"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_000.pt", "epoch_001.pt",
                                                                       "last.pt"]
    assert sorted(p.name for p in (out / "detections").iterdir()) == ["epoch_000.json", "epoch_001.json"]
    assert (out / "report.md").exists() and "box mAP" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"train_loss", "bbox_map", "lr"} <= set(scalars.Tags()["scalars"])
    images = scalars  # one event stream: scalars and the drawn predictions (RunLog)
    tags = images.Tags()["images"]
    assert len(tags) == 4 and [e.step for e in images.Images(tags[0])] == [0, 1]
    first = np.array(Image.open(io.BytesIO(images.Images(tags[0])[0].encoded_image_string)))
    name = f"{int(tags[0].split('/')[1]):012d}.jpg"
    val_image = np.array(Image.open(small[0] / "val2017" / name).convert("RGB"))
    assert first.shape == val_image.shape and (first != val_image).any()  # boxes drawn on the val image


def _torchvision_detections(data: Path, state: dict) -> list[dict]:
    """The checkpoint in torchvision's own builder, on every val image read with PIL."""
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=128, max_size=160,
        rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=50, box_score_thresh=0.0)
    model.load_state_dict(state)  # strict
    for module in model.backbone.body.modules():  # the toy recipe's model.backbone_bn_eps
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eps = 0.001
    model.eval()
    coco = json.loads((data / "annotations/instances_val2017.json").read_text())
    results = []
    for im in sorted(coco["images"], key=lambda im: im["id"]):
        with torch.no_grad():
            (out,) = model([to_tensor(Image.open(data / "val2017" / im["file_name"]).convert("RGB"))])
        for box, score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            results.append({"image_id": im["id"], "category_id": label, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    return results


def assert_same_stats(pycocotools_stats: list[float], logged: list, atol: float) -> None:
    """pycocotools' twelve stats against a logged bbox_stats: -1 ("no data") is logged as null."""
    assert [v is None for v in logged] == [v == -1 for v in pycocotools_stats]
    np.testing.assert_allclose([v for v in pycocotools_stats if v != -1],
                               [v for v in logged if v is not None], rtol=0, atol=atol)


def _pycocotools(ann_file: Path, results: list[dict]) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats.tolist()


def test_checkpoint_in_torchvision_scored_by_pycocotools_gives_the_logged_map(reference, small):
    out, _, _ = reference
    data, _ = small
    logged = rows(out)[-1]
    ann_file = data / "annotations/instances_val2017.json"
    ours = json.loads((out / "detections/epoch_001.json").read_text())
    # faster-coco-eval (logged) and pycocotools agree on the script's own detections file
    assert_same_stats(_pycocotools(ann_file, json.loads(json.dumps(ours))), logged["bbox_stats"], atol=1e-12)
    tv = _torchvision_detections(data, torch.load(out / "checkpoints/last.pt", weights_only=True)["model"])
    assert len(tv) == len(ours) == 8 * 100
    for a, b in zip(tv, ours):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)
        assert a["score"] == pytest.approx(b["score"], rel=1e-5, abs=0)
    # not degenerate: many distinct scores, labels and boxes were compared (an early model's mAP itself may be 0;
    # tests/data/test_detection.py compares the two evaluators where the stats are far from 0 and 1)
    assert len({round(d["score"], 9) for d in tv}) > 100 and len({d["category_id"] for d in tv}) > 3
    assert np.ptp(np.array([d["bbox"] for d in tv]), axis=0).min() > 10
    stats = _pycocotools(ann_file, tv)
    assert_same_stats(stats, logged["bbox_stats"], atol=1e-6)
    assert 100 * stats[0] == pytest.approx(logged["bbox_map"], abs=1e-4)


# ----------------------------------------------------------------------------- resume


def _wait_for(predicate, proc, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_preempted_mid_warmup_then_killed_resumes_bit_identical(reference, small, tmp_path):
    """SIGTERM in epoch 0 (mid warm-up): a mid-epoch checkpoint, exit 143. The same command resumes the
    warm-up and the grouped sampler at the next step; SIGKILL after epoch 0; the same command again.
    The result equals the uninterrupted run bit for bit: weights, optimizer state, metrics, detections."""
    ref_out, _, _ = reference
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train_detection.py"), *fast(small[0], out, small[1])]
    log = tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT)
        _wait_for(lambda: re.search(r"^epoch 0 2/4 ", log.read_text(), re.MULTILINE), proc,
                  "step 2 of epoch 0")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    assert re.search(r"stopped by SIGTERM at epoch 0, optimizer step [23]/4", log.read_text())
    mid = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert mid["position"]["epoch"] == 0 and mid["position"]["micro"] in (2, 3)

    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: (out / "checkpoints/epoch_000.pt").exists(), proc, "epoch 0's checkpoint")
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert not (out / "checkpoints/epoch_001.pt").exists(), "the run finished before it could be killed"

    resumed = run_script(args[2:], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = (torch.load(p / "checkpoints/last.pt", weights_only=True) for p in (ref_out, out))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [r["bbox_stats"] for r in rows(out)] == [r["bbox_stats"] for r in rows(ref_out)]
    assert [r["train_loss"] for r in rows(out)] == [r["train_loss"] for r in rows(ref_out)]
    detections = [(p / "detections/epoch_001.json").read_text() for p in (ref_out, out)]
    assert detections[0] == detections[1]


@pytest.mark.slow
def test_two_processes_evaluate_each_image_once_and_gather_to_rank_0(reference, small, tmp_path):
    ref_out, _, _ = reference
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_port=29631", str(ROOT / "train_detection.py"),
                           *fast(small[0], out, small[1], "run.eval_only=true",
                                 f"model.weights={ref_out / 'checkpoints/last.pt'}",
                                 "expected.bbox_map=32.8")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    logged = rows(ref_out)[-1]
    assert ev["val_images"] == 8 and "(published 32.8)" in proc.stdout
    assert [v is None for v in ev["bbox_stats"]] == [v is None for v in logged["bbox_stats"]]
    np.testing.assert_allclose([v for v in ev["bbox_stats"] if v is not None],
                               [v for v in logged["bbox_stats"] if v is not None], rtol=0, atol=1e-6)
    ours = json.loads((out / "detections/eval.json").read_text())
    ref = json.loads((ref_out / "detections/epoch_001.json").read_text())
    assert [(d["image_id"], d["category_id"]) for d in ours] == \
        [(d["image_id"], d["category_id"]) for d in ref]
    assert not (out / "checkpoints").exists() and (out / "report.md").exists()


# ----------------------------------------------------------------------------- bad input


def _damage(small, tmp_path, what):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(small[0], root)
    ann = root / "annotations/instances_val2017.json"
    doc = json.loads(ann.read_text())
    victim = root / "val2017" / doc["images"][1]["file_name"]
    if what == "missing_annotations":
        ann.unlink()
        return root, f"{ann}: annotation file not found"
    if what == "missing_folder":
        shutil.rmtree(root / "train2017")
        return root, f"{root / 'train2017'}: image folder not found (expected data.root/train2017/"
    if what == "missing_image":
        victim.unlink()
        return root, f"{ann}: lists 1 image that {root / 'val2017'} does not have, e.g. {victim}"
    if what == "corrupt_image":
        victim.write_bytes(victim.read_bytes()[:300])
        return root, f"{victim}: unreadable or truncated"
    if what == "box_outside":
        doc["annotations"][0]["bbox"] = [500.0, 10.0, 20.0, 20.0]
        ann.write_text(json.dumps(doc))
        return root, (f"{ann}: 1 bad annotation:\n  annotation {doc['annotations'][0]['id']}: "
                      "bbox [x, y, w, h] = [500.0, 10.0, 20.0, 20.0] lies outside its image")
    if what == "no_val_annotations":  # COCOeval's mAP would be its "no data" sentinel, -1 (logged -100.0)
        ann.write_text(json.dumps({**doc, "annotations": []}))
        return root, (f"{ann}: the validation set has no annotations (no box that is not iscrowd), so its "
                      "box mAP is undefined")
    if what == "train_size_mismatch":  # --check-data compares every decoded size with the annotation file's
        train_ann = root / "annotations/instances_train2017.json"
        image = json.loads(train_ann.read_text())["images"][2]
        path = root / "train2017" / image["file_name"]
        Image.new("RGB", (image["width"], image["height"] + 2)).save(path)
        return root, (f"--check-data: 1 of 16 images cannot be used:\n  {path}: the image is "
                      f"{image['width']} x {image['height'] + 2} px (width x height) but {train_ann} says "
                      f"{image['width']} x "
                      f"{image['height']}")
    if what == "not_coco":
        ann.write_text(json.dumps({"annotations": []}))
        return root, f"{ann}: not a COCO instances file (no 'images', 'categories' list; expected a JSON"
    if what == "no_damage":
        return root, None
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing_annotations", "missing_folder", "missing_image", "corrupt_image",
                                  "box_outside", "not_coco", "no_val_annotations", "train_size_mismatch"])
def test_bad_input_is_one_message_naming_the_file_and_nothing_is_written(small, tmp_path, capsys, what):
    root, message = _damage(small, tmp_path, what)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        launch(td.Config, td.main, td.derived, argv=fast(root, out, "null", "--check-data"))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["run.lock"])  # the lock only


def test_val_images_are_checked_before_training(small, tmp_path, capsys):
    """Without --check-data: a val image whose real size is not the annotation file's stops the run at
    start (its header is read), not after a training epoch that is then lost."""
    root, _ = _damage(small, tmp_path, "no_damage")
    ann = root / "annotations/instances_val2017.json"
    image = json.loads(ann.read_text())["images"][3]
    victim = root / "val2017" / image["file_name"]
    Image.new("RGB", (image["width"] + 5, image["height"])).save(victim)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        launch(td.Config, td.main, td.derived, argv=fast(root, out, "null"))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert err.endswith(f"error: the validation set: 1 of 8 images cannot be used:\n  {victim}: the image "
                        f"is {image['width'] + 5} x {image['height']} px (width x height) but {ann} says "
                        f"{image['width']} x {image['height']}: its boxes and masks would not fit the "
                        "image\n"), err
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["run.lock"])  # the lock only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_amp_channels_last_smoke(small, tmp_path):
    proc = run_script(fast(small[0], tmp_path / "cuda", small[1], "schedule.epochs=1", "run.device=cuda",
                           "train.amp=fp16", "train.channels_last=true"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(tmp_path / "cuda")[0]["val_images"] == 8
