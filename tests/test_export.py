"""tools/export.py: ONNX and ExecuTorch exports of toy runs, checked again here in their runtimes.

The oracles: torchvision's own MobileNetV3 (classification logits), the eager int8 model of the published
QAT path (models.quantize, as train_qat.py converts it), the PyTorch detector and segmenter of the run's
recipe, and a fresh process that reloads every exported file. Exports are made once per module (they are
slow) and shared between the tests.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import numpy as np
import torch
from torch import nn

from tests.conftest import ROOT, run_in_process

EXPORT = "tools/export.py"


def export(tmp: Path, *args) -> tuple[int, str, str]:
    proc = run_in_process(EXPORT, [str(a) for a in args], tmp)
    return proc.returncode, proc.stdout, proc.stderr


def sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def val_batch(toy_data: Path, n: int = 32, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """n toy val images as train_classification.py evaluates them (resize 73, crop 64, normalized)."""
    from torchvision.io import decode_image
    from torchvision.transforms import v2 as T

    root = toy_data / "imagenet" / split
    classes = sorted(p.name for p in root.iterdir())
    files = sorted((p, i) for i, c in enumerate(classes) for p in (root / c).iterdir())[:: max(1, 100 // n)][:n]
    tf = T.Compose([T.Resize(73, antialias=True), T.CenterCrop(64), T.ToDtype(torch.float32, scale=True),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return torch.stack([tf(decode_image(str(p))) for p, _ in files]), torch.tensor([i for _, i in files])


def write_run(run_dir: Path, config, state: dict) -> Path:
    """A run directory as the scripts write one: config.yaml and checkpoints/last.pt with the config."""
    from engine import checkpoint
    from engine.config import save_config, to_dict

    (run_dir / "checkpoints").mkdir(parents=True)
    save_config(config, run_dir / "config.yaml")
    checkpoint.save(checkpoint.new(state, epoch=0, config=to_dict(config)), run_dir / "checkpoints" / "last.pt")
    return run_dir


# ============================================================================ runs and exports (module scope)


@pytest.fixture(scope="module")
def cls_onnx(toy_backbone, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "model.onnx"
    code, stdout, stderr = export(out.parent, toy_backbone.parents[1], "--format", "onnx", "--out", out)
    assert code == 0, stderr
    assert "checked on 100 val images" in stdout
    return out


@pytest.fixture(scope="module")
def small_pte(toy_data, tmp_path_factory) -> tuple[Path, dict]:
    """A MobileNetV3-Small classification run (torchvision's initialization: lowering the smaller network to
    XNNPACK takes half the time of the Large one) exported to ExecuTorch; returns (file, state dict)."""
    import train_classification
    from engine.config import load_config

    cfg = load_config(train_classification.Config, ROOT / "recipes/toy/classification.yaml",
                      [f"data.root={toy_data / 'imagenet'}", "model.name=mobilenet_v3_small"])
    torch.manual_seed(0)
    state = train_classification.build_model(cfg).state_dict()
    run = write_run(tmp_path_factory.mktemp("small"), cfg, state)
    code, stdout, stderr = export(run, run, "--format", "executorch")
    assert code == 0, stderr
    assert "checked on 100 val images" in stdout
    return run / "export" / "mobilenet_v3_small.pte", state


@pytest.fixture(scope="module")
def confident(toy_data) -> nn.Module:
    """A float MobileNetV3-Large at torchvision's initialization with the BatchNorm statistics of the 100 toy
    training images (features that differ from image to image), its classifier fitted on the toy val images'
    features as the fake-quantized backbone computes them, until every prediction leads by a margin (>= 2
    logits). int8 rounding flips near-tied predictions, so a test of "within 1 point" on 100 images needs
    confident ones: this tests the export's fidelity, not the model. (The 2-epoch toy backbone's features
    hardly differ between images: even fitted on the val set it stayed near chance, and the test passed or
    failed with the toy data's pixels.)"""
    from models import build, quantize

    torch.manual_seed(0)
    model = build("quantizable_mobilenet_v3_large", num_classes=10, dropout=0.2,
                  norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=None))  # cumulative statistics
    x, _ = val_batch(toy_data, 100, "train")
    v, y = val_batch(toy_data, 100)
    model.train()
    with torch.no_grad():
        for i in range(0, 100, 25):
            model(x[i:i + 25])
    model.eval()
    probe = quantize.prepare_qat(copy.deepcopy(model), "qnnpack", "float").eval()
    with torch.no_grad():  # the features as the int8 model computes them: fitted on those, it stays confident
        probe(x[:50]), probe(x[50:])
        probe.apply(torch.ao.quantization.disable_observer)
        features = probe.avgpool(probe.features(probe.quant(v))).flatten(1)
    opt = torch.optim.Adam(model.classifier.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model.classifier(features), y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        top2 = model.classifier(features).topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 2, "the fitted classifier is not confident enough for the test"
    return model


@pytest.fixture(scope="module")
def qat_run(confident, toy_backbone, toy_data, tmp_path_factory) -> Path:
    """A QAT run directory built directly from `confident`: prepared for QAT (qnnpack, float SE gate as the
    recipe), its observers run in eval mode over the 100 training images."""
    import train_qat
    from engine.config import load_config
    from models import quantize

    cfg = load_config(train_qat.Config, ROOT / "recipes/toy/qat.yaml",
                      [f"data.root={toy_data / 'imagenet'}", f"model.weights={toy_backbone}"])
    model = quantize.prepare_qat(copy.deepcopy(confident), "qnnpack", "float")
    model.eval()  # observers record in eval mode too; BatchNorm keeps the statistics the classifier was fitted on
    x, _ = val_batch(toy_data, 100, "train")
    with torch.no_grad():
        model(x[:50]), model(x[50:])
    return write_run(tmp_path_factory.mktemp("qat"), cfg, model.state_dict())


@pytest.fixture(scope="module")
def ptq_run(confident, toy_data, tmp_path_factory) -> Path:
    """A real PTQ run (`train_qat.py qat.mode=ptq`) of `confident`'s float weights: eager qnnpack PTQ
    calibrated on 4 x 32 training images, its int8 TorchScript export in RUN/export/model_int8.pt."""
    tmp = tmp_path_factory.mktemp("ptq")
    torch.save(confident.state_dict(), tmp / "float.pth")
    proc = subprocess.run([sys.executable, "train_qat.py", "--recipe", "recipes/toy/qat.yaml", "qat.mode=ptq",
                           f"model.weights={tmp / 'float.pth'}", f"data.root={toy_data / 'imagenet'}",
                           f"run.output_dir={tmp / 'run'}", "data.workers=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp / "run" / "export" / "model_int8.pt").exists()
    return tmp / "run"


@pytest.fixture(scope="module")
def qat_onnx(qat_run) -> Path:
    out = qat_run / "int8.onnx"
    code, _, stderr = export(qat_run, qat_run, "--format", "onnx", "--out", out)
    assert code == 0, stderr
    return out


def make_detector(recipe: str, overrides: list[str], run_dir: Path):
    """A Faster R-CNN run directory (the recipe, the toy backbone) whose box head scores only class 1, near
    the threshold, so that images give 0, 1 or more detections: the other classes' logits are -30 and the
    background's 0, and class 1's bias puts box_score_thresh between two of the images' 3 best proposals
    each, the first such place (from the top) where the 8 images give 0, 1 and more detections. (Between
    the images' best proposals only, no place gave all three on an AVX2-only CPU at 320 px.) Returns (run dir, the
    PyTorch model, the images, their detection counts)."""
    import train_detection
    from engine.config import load_config

    cfg = load_config(train_detection.Config, ROOT / recipe, overrides)
    torch.manual_seed(0)
    model = train_detection.build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    sizes = [(160, 200), (163, 184), (240, 320), (320, 240), (200, 200), (180, 260), (256, 170), (300, 300)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    head = model.roi_heads.box_predictor.cls_score
    thresh = model.roi_heads.score_thresh
    logits = []
    hook = head.register_forward_hook(lambda module, args, out: logits.extend(out[:, 1].topk(3).values.tolist()))
    with torch.no_grad():
        head.weight.mul_(20.0)
        head.weight[0] = 0.0
        head.weight[2:] = 0.0
        head.bias.fill_(-30.0)
        head.bias[:2] = 0.0
        for im in images:
            model([im])
        hook.remove()
        best = sorted(set(logits), reverse=True)  # each image's 3 best class-1 logits (background's is 0)
        for hi, lo in zip(best, best[1:]):
            head.bias[1] = math.log(thresh / (1 - thresh)) - (hi + lo) / 2
            counts = [len(model([im])[0]["boxes"]) for im in images]
            if 0 in counts and 1 in counts and max(counts) >= 2:
                break
    run = write_run(run_dir, cfg, model.state_dict())
    return run, model, images, counts


@pytest.fixture(scope="module")
def detector(toy_backbone, toy_data, tmp_path_factory):
    """The toy recipe (the 800-1333 px recipe at toy sizes, min_size 160): make_detector."""
    return make_detector("recipes/toy/detection.yaml", [f"data.root={toy_data / 'coco'}",
                                                        f"model.backbone_weights={toy_backbone}"],
                         tmp_path_factory.mktemp("det"))


@pytest.fixture(scope="module")
def det_onnx(detector) -> Path:
    run = detector[0]
    code, stdout, stderr = export(run, run, "--format", "onnx")
    assert code == 0, stderr
    return run / "export" / "fasterrcnn_mobilenet_v3_large_fpn.onnx"


@pytest.fixture(scope="module")
def seg_run(toy_backbone, toy_data, tmp_path_factory):
    import train_segmentation
    from engine.config import load_config

    cfg = load_config(train_segmentation.Config, ROOT / "recipes/toy/segmentation.yaml",
                      [f"data.root={toy_data / 'coco'}", f"data.mask_cache={toy_data / 'voc_mask_cache'}",
                       f"model.backbone_weights={toy_backbone}"])
    torch.manual_seed(0)
    model = train_segmentation.build_model(cfg.model).eval()
    return write_run(tmp_path_factory.mktemp("seg"), cfg, model.state_dict()), model


# ============================================================================ classification


def test_classification_onnx_matches_torchvision_and_records_its_source(cls_onnx, toy_backbone, toy_data):
    import onnxruntime as ort
    import torchvision

    from models.weights import read_state

    oracle = torchvision.models.mobilenet_v3_large(num_classes=10).eval()
    oracle.load_state_dict(read_state(toy_backbone))
    x, labels = val_batch(toy_data)
    with torch.no_grad():
        ref = oracle(x)
    sess = ort.InferenceSession(str(cls_onnx), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])  # a batch of 32: the batch axis is dynamic
    assert (out - ref).abs().max() <= 1e-3
    assert torch.equal(out.argmax(1), ref.argmax(1))
    info = sidecar(cls_onnx)
    assert info["source"]["sha256"] == sha256(toy_backbone)
    assert info["preprocessing"]["resize"]["short_side"] == 73 and info["preprocessing"]["center_crop"] == 64
    assert info["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert info["classes"] == sorted(p.name for p in (toy_data / "imagenet" / "val").iterdir())
    assert info["check"]["max_abs_diff"] <= info["check"]["tolerance"]["logits"] == 1e-3
    assert info["check"]["acc1_export"] == info["check"]["acc1_pytorch"]
    assert info["graph"]["exporter"] == "dynamo"


def test_classification_pte_matches_torchvision_in_executorch(small_pte, toy_data):
    import torchvision
    from executorch.runtime import Runtime

    pte, state = small_pte
    oracle = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    oracle.load_state_dict(state)
    x, _ = val_batch(toy_data, 8)
    with torch.no_grad():
        ref = oracle(x)
    method = Runtime.get().load_program(str(pte)).load_method("forward")
    out = torch.cat([method.execute([x[i:i + 1]])[0] for i in range(len(x))])  # batch 1, as a device runs it
    assert out.shape == ref.shape and (out - ref).abs().max() <= 1e-3
    info = sidecar(pte)
    assert (info["runtime"], info["precision"], info["graph"]["backend"]) == ("executorch", "float32", "XNNPACK")
    assert info["model"] == "mobilenet_v3_small" and info["preprocessing"]["center_crop"] == 64
    assert info["check"]["max_abs_diff"] <= info["check"]["tolerance"]["logits"] == 1e-3
    assert info["check"]["acc1_export"] == info["check"]["acc1_pytorch"]


# ============================================================================ int8


def eager_int8(qat_run: Path) -> nn.Module:
    """The published QAT path's int8 model (train_qat.py: prepare_qat, load, convert), qnnpack."""
    from models import build, quantize
    from models.weights import load_weights

    model = build("quantizable_mobilenet_v3_large", num_classes=10, dropout=0.2,
                  norm_layer=partial(nn.BatchNorm2d, eps=0.001))
    quantize.prepare_qat(model, "qnnpack", "float")
    load_weights(model, qat_run / "checkpoints" / "last.pt")
    return quantize.convert_int8(model, "qnnpack")


def acc1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    from engine.metrics import topk_correct

    return 100.0 * topk_correct(logits, labels, (1,)).item() / len(labels)


@pytest.fixture(scope="module")
def qat_eager(qat_run, toy_data) -> tuple[torch.Tensor, torch.Tensor, nn.Module, torch.Tensor]:
    """(the 100 toy val images, their labels, the eager int8 model, its logits on them)."""
    from models import quantize

    x, labels = val_batch(toy_data, 100)
    model = eager_int8(qat_run)
    with quantize.engine("qnnpack"), torch.no_grad():
        return x, labels, model, model(x)


def test_qat_int8_onnx_passes_the_int8_rule_against_the_eager_int8_model(qat_onnx, qat_eager, cls_onnx):
    """The export's int8 rule (docs/export.md): Acc@1 within 1 point, or a difference the flipped images
    explain (paired McNemar p >= 0.05). Measured on an AVX2-only EPYC: 82 vs 84, 2 points apart, which the
    earlier strict 1-point assertion refused though the export's own check passed it."""
    import onnx
    import onnxruntime as ort

    x, labels, _, ref = qat_eager
    sess = ort.InferenceSession(str(qat_onnx), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    got, want, p = int8_rule(out, ref, labels)
    assert abs(got - want) <= 1.0 or p >= 0.05, (got, want, p)
    ops = {n.op_type for n in onnx.load(str(qat_onnx)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ: ONNX Runtime fuses these into int8 kernels
    assert qat_onnx.stat().st_size < 0.4 * cls_onnx.stat().st_size  # int8 weights, not float ones
    info = sidecar(qat_onnx)
    assert info["precision"] == "int8" and info["check"]["tolerance"] == {"acc1_points": 1.0, "mcnemar_p": 0.05}


def test_a_failed_check_writes_nothing(qat_run, monkeypatch):
    from deploy import check

    monkeypatch.setitem(check.TOLERANCE, "int8", {"acc1_points": -1.0, "mcnemar_p": 2.0})  # no export can pass
    out = qat_run / "failing.onnx"
    code, _, stderr = export(qat_run, qat_run, "--format", "onnx", "--out", out)
    assert code == 1 and "check failed, nothing written" in stderr
    assert not [p.name for p in qat_run.iterdir() if "failing" in p.name]


def test_pt2e_int8_of_the_qat_weights_follows_the_eager_int8_model(qat_run, qat_onnx, qat_eager):
    """What `--format executorch` quantizes on a QAT run (deploy/export.py): the QAT checkpoint's float weights
    through PT2E, every scale and zero point carried from the eager int8 model. The quantized graph (before
    its XNNPACK lowering, which the float .pte test and the CLI's own check exercise) must follow the eager
    int8 model at least as closely as ONNX Runtime's int8 kernels on the same eager model do. PT2E's own
    calibration, the previous behaviour, agreed with it on 44 of 100 top-1, logits up to 106 apart."""
    import onnxruntime as ort

    from deploy.executorch import quantize_pt2e
    from deploy.source import build_qat_float, resolve

    x, labels, eager, ref = qat_eager
    converted, info = quantize_pt2e(build_qat_float(resolve(qat_run)), x[:2], eager=eager)
    with torch.no_grad():
        out = converted(x)
    onnx = torch.from_numpy(ort.InferenceSession(str(qat_onnx), providers=["CPUExecutionProvider"])
                            .run(None, {"images": x.numpy()})[0])
    agree = {k: (v.argmax(1) == ref.argmax(1)).double().mean().item() for k, v in (("pt2e", out), ("onnx", onnx))}
    assert agree["pt2e"] >= agree["onnx"] - 0.05, agree  # measured: PT2E 0.79, ONNX 0.80 (the .pte: 0.85)
    mean = {k: (v - ref).abs().mean().item() for k, v in (("pt2e", out), ("onnx", onnx))}
    worst = {k: (v - ref).abs().max().item() for k, v in (("pt2e", out), ("onnx", onnx))}
    # Over all 1000 logits PT2E is as close as ONNX Runtime (measured on an AVX2-only EPYC: mean 2.43 vs 2.51,
    # 99th percentile 13.4 both). The single worst logit is one rounding's luck (16 vs 25 where this test
    # was written, 28 vs 26 on the AVX2 one): it only has to stay far from the 106 of PT2E's own calibration.
    assert mean["pt2e"] <= 1.1 * mean["onnx"], mean
    assert worst["pt2e"] <= 2 * worst["onnx"], worst
    assert info["calibration_images"] == 0 and "per-tensor weights" in info["quantizer"]  # qnnpack's


def int8_rule(logits: torch.Tensor, eager: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """(export's Acc@1, the eager model's, the exact McNemar p of their discordant images: b images only
    the export gets right, c only the eager model), computed here from the binomial distribution."""
    right_out = logits.topk(1, dim=1).indices[:, 0] == labels
    right_ref = eager.topk(1, dim=1).indices[:, 0] == labels
    b, c = int((right_out & ~right_ref).sum()), int((right_ref & ~right_out).sum())
    return acc1(logits, labels), acc1(eager, labels), sign_test(b, c)


def sign_test(b: int, c: int) -> float:
    return min(1.0, 2 * sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c))


def check_passed_the_int8_rule(info: dict) -> None:
    """The sidecar's own check (the export's val pipeline, which decodes and resizes unlike val_batch: int8
    top-1 flips differ between the two): 1 point, or the sign test of its discordant counts."""
    c = info["check"]
    assert c["mcnemar_p"] == pytest.approx(sign_test(c["only_export_right"], c["only_pytorch_right"]))
    assert abs(c["acc1_export"] - c["acc1_pytorch"]) <= 1.0 or c["mcnemar_p"] >= 0.05, c
    assert c["acc1_export"] - c["acc1_pytorch"] == c["only_export_right"] - c["only_pytorch_right"], c  # of 100


def run_pte(path: Path, x: torch.Tensor) -> torch.Tensor:
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    return torch.cat([method.execute([x[i:i + 1]])[0] for i in range(len(x))])  # batch 1, as a device runs it


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def test_executorch_int8_pt2e_from_the_qat_weights(qat_run, qat_eager, qat_onnx):
    """The QAT .pte (PT2E with the eager model's qparams, lowered to XNNPACK) run in ExecuTorch's runtime
    follows the eager int8 model as closely as ONNX Runtime running the eager model itself (on val_batch's
    inputs), and the export's own check passed the int8 rule (measured there: Acc@1 81 against 83, which
    only the paired test lets through)."""
    out = qat_run / "int8.pte"
    code, stdout, stderr = export(qat_run, qat_run, "--format", "executorch", "--out", out)
    assert code == 0, stderr
    x, labels, _, ref = qat_eager
    logits, onnx = run_pte(out, x), run_onnx(qat_onnx, x)
    agree = {k: (v.argmax(1) == ref.argmax(1)).double().mean().item() for k, v in (("pte", logits), ("onnx", onnx))}
    assert agree["pte"] >= agree["onnx"] - 0.05, agree
    got, eager, p = int8_rule(logits, ref, labels)
    assert abs(got - eager) <= 1.0 or p >= 0.05, (got, eager, p)
    info = sidecar(out)
    assert info["int8"]["calibration_images"] == 0 and "carried from the eager int8 model" in info["int8"]["qparams"]
    check_passed_the_int8_rule(info)


def test_ptq_int8_onnx_and_pte_follow_the_eager_ptq_model(ptq_run, toy_data):
    """A real PTQ run's int8 TorchScript export (the published PTQ row's model, qnnpack) is the reference:
    its ONNX (the same int8 model in QDQ form) and its .pte (PT2E calibrated afresh on the same training
    images, XNNPACK) both pass the export's check and, run here in their runtimes, the rule too."""
    from models import quantize

    x, labels = val_batch(toy_data, 100)
    eager, _ = quantize.load_int8(ptq_run / "export" / "model_int8.pt")
    with quantize.engine("qnnpack"), torch.no_grad():
        ref = eager(x)
    for fmt, run in (("onnx", run_onnx), ("executorch", run_pte)):
        code, stdout, stderr = export(ptq_run, ptq_run, "--format", fmt)
        assert code == 0, stderr
        path = ptq_run / "export" / f"mobilenet_v3_large_int8.{'onnx' if fmt == 'onnx' else 'pte'}"
        logits = run(path, x)
        # The rule on the images whose top-1 is decided in both runtimes: this PTQ model's int8 logits step by
        # about 2 (up to 284), so 15 of the eager model's 100 predictions and 27 of ONNX's are exact top-2
        # ties, decided by class index, not by the model (measured on an AVX2-only EPYC, where over all 100
        # the ties alone made 33 vs 47; on the 66 untied images 45 vs 53, p = 0.27).
        top2, out2 = ref.topk(2, dim=1).values, logits.topk(2, dim=1).values
        decided = (top2[:, 0] > top2[:, 1]) & (out2[:, 0] > out2[:, 1])
        assert decided.sum() >= 50, (fmt, int(decided.sum()))
        got, want, p = int8_rule(logits[decided], ref[decided], labels[decided])
        assert abs(got - want) <= 1.0 or p >= 0.05, (fmt, got, want, p)
        agree = (logits.argmax(1) == ref.argmax(1)).double().mean().item()
        assert agree >= 0.3, (fmt, agree)  # measured 0.46 (ONNX), 0.41 (.pte); 10 classes
        info = sidecar(path)
        assert info["task"] == "ptq" and info["precision"] == "int8" and info["check"]["images"] == 100
        check_passed_the_int8_rule(info)
    assert "calibrated" in sidecar(ptq_run / "export" / "mobilenet_v3_large_int8.pte")["int8"]["qparams"]


# ============================================================================ detection


def test_detection_onnx_matches_pytorch_with_0_1_and_many_detections(det_onnx, detector):
    from deploy.check import match_detections

    _, model, images, counts = detector
    assert 0 in counts and 1 in counts and max(counts) >= 2, counts  # the construction gives all three
    import onnxruntime as ort

    sess = ort.InferenceSession(str(det_onnx), providers=["CPUExecutionProvider"])
    for im, n in zip(images, counts):  # several sizes through one graph (dynamic height, width, detections)
        with torch.no_grad():
            ref = model([im])[0]
        boxes, labels, scores = (torch.from_numpy(a) for a in sess.run(None, {"image": im.numpy()}))
        got = match_detections(ref, {"boxes": boxes, "labels": labels, "scores": scores}, f"{tuple(im.shape)}")
        assert got["detections"] == n
    info = sidecar(det_onnx)
    assert info["score_threshold"] == 0.05 and info["check"]["images"] == 8
    assert info["graph"]["exporter"] == "torchscript"
    assert set(info["category_ids"]) and all(int(k) > 0 for k in info["category_ids"])


def test_the_320_640_detector_onnx_matches_pytorch_at_its_own_resolution(toy_backbone, toy_data, tmp_path):
    """The low-res recipe as published (min_size 320, max_size 640, RPN test top-n 150, RPN score threshold
    0.05): the toy images are resized up to 320 px inside the graph; 0, 1 and several detections."""
    from deploy.check import match_detections

    run, model, images, counts = make_detector(
        "recipes/detection/fasterrcnn_mobilenet_v3_large_320_fpn.yaml",
        [f"data.root={toy_data / 'coco'}", f"model.backbone_weights={toy_backbone}", "model.backbone_bn_eps=0.001"],
        tmp_path / "run")
    assert (model.transform.min_size, model.transform.max_size) == ((320,), 640)
    assert model.rpn._pre_nms_top_n["testing"] == 150 and model.rpn.score_thresh == 0.05
    assert 0 in counts and 1 in counts and max(counts) >= 2, counts
    code, stdout, stderr = export(run, run, "--format", "onnx")
    assert code == 0, stderr
    path = run / "export" / "fasterrcnn_mobilenet_v3_large_320_fpn.onnx"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for im, n in zip(images, counts):
        with torch.no_grad():
            ref = model([im])[0]
        boxes, labels, scores = (torch.from_numpy(a) for a in sess.run(None, {"image": im.numpy()}))
        assert match_detections(ref, {"boxes": boxes, "labels": labels, "scores": scores}, "")["detections"] == n
    info = sidecar(path)
    assert info["model"] == "fasterrcnn_mobilenet_v3_large_320_fpn"
    assert info["preprocessing"]["in_graph"]["resize"] == {"min_size": 320, "max_size": 640}


def test_the_onnx_resize_sizes_images_as_eager_pytorch_does():
    """exact_resize in ONNX Runtime gives torchvision's eager output size for sides where a float32 scale
    rounds down (183 px at min_size 160 -> 160 in float64, 159 in float32) and for ordinary ones."""
    import onnxruntime as ort
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    from deploy.onnx import exact_resize

    transform = GeneralizedRCNNTransform(160, 256, [0.0] * 3, [1.0] * 3)

    class Size(torch.nn.Module):
        def forward(self, image):
            return torch._shape_as_tensor(exact_resize(transform, image)[0])

    path = io.BytesIO()
    torch.onnx.export(Size(), (torch.zeros(3, 285, 183),), path, dynamo=False, opset_version=17,
                      input_names=["image"], dynamic_axes={"image": {1: "h", 2: "w"}})
    sess = ort.InferenceSession(path.getvalue(), providers=["CPUExecutionProvider"])
    sizes = [(285, 183), (183, 285), (163, 184), (160, 200), (1000, 330), (97, 131), (600, 601)]
    assert any(math.floor(float(np.float32(160) / np.float32(min(s))) * min(s)) < 160 for s in sizes)  # float32 fails
    for h, w in sizes:
        eager = transform.resize(torch.zeros(3, h, w), None)[0].shape
        assert tuple(sess.run(None, {"image": np.zeros((3, h, w), np.float32)})[0]) == tuple(eager), (h, w)


def test_detection_to_executorch_is_refused_in_one_line(detector):
    run = detector[0]
    code, _, stderr = export(run, run, "--format", "executorch")
    assert code == 2
    assert stderr.count("\n") == 1 and "does not export" in stderr and "use --format onnx" in stderr
    assert not (run / "export" / "fasterrcnn_mobilenet_v3_large_fpn.pte").exists()


# ============================================================================ segmentation


@pytest.fixture(scope="module")
def seg_onnx(seg_run) -> Path:
    run = seg_run[0]
    out = run / "lraspp.onnx"
    code, stdout, stderr = export(run, run, "--format", "onnx", "--out", out)
    assert code == 0, stderr
    assert "mIoU" in stdout
    return out


def test_segmentation_onnx_matches_pytorch_at_any_size(seg_run, seg_onnx):
    import onnxruntime as ort

    run, model = seg_run
    out = seg_onnx
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 3, 208, 277), (2, 3, 240, 208)]:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = model(x)["out"]
        got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-3
    assert sidecar(out)["classes"][0] == "background" and len(sidecar(out)["classes"]) == 21


def _torchvision_segmenter(name: str):
    """torchvision's LR-ASPP or DeepLabV3 MobileNetV3-Large, or an FCN assembled from torchvision's parts
    (its dilated MobileNetV3 backbone and FCNHead: torchvision has no MobileNetV3 FCN builder)."""
    import torchvision
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    if name == "lraspp_mobilenet_v3_large":
        return torchvision.models.segmentation.lraspp_mobilenet_v3_large(num_classes=21, weights_backbone=None)
    deeplab = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(num_classes=21, aux_loss=True,
                                                                          weights_backbone=None)
    if name == "deeplabv3_mobilenet_v3_large":
        return deeplab
    return FCN(deeplab.backbone, FCNHead(960, 21), FCNHead(40, 21))


@pytest.mark.parametrize("name", ["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large",
                                  "fcn_mobilenet_v3_large"])
def test_segmenters_onnx_and_pte_match_torchvision_without_their_aux_head(name, toy_backbone, toy_data, tmp_path):
    """Each segmenter (DeepLabV3 and FCN with their FCN aux head, which the exports leave out; DeepLabV3's
    ASPP upsamples its pooled branch to the input's size, a dynamic shape) exported to ONNX and to
    ExecuTorch; small: the val set checked at short side 64 (data.eval_size), the files run here on
    non-square inputs against torchvision's model holding the same weights: ONNX on a batch of 2 at
    64 x 90, the .pte at batch 1 on 64 x 90 and 96 x 64 (within its half-to-twice size range)."""
    import onnx

    import train_segmentation
    from engine.config import load_config

    aux = name != "lraspp_mobilenet_v3_large"
    cfg = load_config(train_segmentation.Config, ROOT / "recipes/toy/segmentation.yaml",
                      [f"data.root={toy_data / 'coco'}", f"data.mask_cache={toy_data / 'voc_mask_cache'}",
                       f"model.backbone_weights={toy_backbone}", f"model.name={name}",
                       f"model.aux_loss={str(aux).lower()}", "data.eval_size=64"])
    torch.manual_seed(0)
    model = train_segmentation.build_model(cfg.model).eval()
    assert (getattr(model, "aux_classifier", None) is not None) == aux
    run = write_run(tmp_path / "run", cfg, model.state_dict())
    oracle = _torchvision_segmenter(name).eval()
    oracle.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    inputs = {"onnx": [torch.randn(2, 3, 64, 90, generator=g)],
              "executorch": [torch.randn(1, 3, 64, 90, generator=g), torch.randn(1, 3, 96, 64, generator=g)]}
    for fmt, run_file in (("onnx", run_onnx), ("executorch", run_pte)):
        code, stdout, stderr = export(run, run, "--format", fmt)
        assert code == 0, stderr
        out = run / "export" / f"{name}.{'onnx' if fmt == 'onnx' else 'pte'}"
        for x in inputs[fmt]:
            with torch.no_grad():
                ref = oracle(x)["out"]
            got = run_file(out, x)
            # the heads at their initial weights give small logits (std 0.04): compared relative to their spread
            assert got.shape == ref.shape == (x.shape[0], 21, *x.shape[2:]) and ref.std() > 0.01
            assert (got - ref).abs().max() <= 1e-3 * ref.std(), (fmt, x.shape)  # measured ONNX 1e-8 to 2e-8
        info = sidecar(out)
        assert info["model"] == name and info["runtime"] == fmt
        assert info["check"]["miou_export"] == info["check"]["miou_pytorch"]
        assert info["preprocessing"]["resize"]["short_side"] == 64
    assert [o.name for o in onnx.load(str(run / "export" / f"{name}.onnx")).graph.output] == ["out"]  # no aux head


# ============================================================================ a fresh process


RELOAD = """
import sys, torch, onnxruntime as ort
from executorch.runtime import Runtime
inputs = torch.load(sys.argv[1])
outs = {}
for path, x in inputs.items():
    if path.endswith(".onnx"):
        s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        outs[path] = [torch.from_numpy(a) for a in s.run(None, {s.get_inputs()[0].name: x.numpy()})]
    else:
        outs[path] = list(Runtime.get().load_program(path).load_method("forward").execute([x]))
torch.save(outs, sys.argv[2])
"""


def test_every_file_reloads_in_a_fresh_process_with_the_same_outputs(cls_onnx, small_pte, qat_onnx, qat_run, ptq_run,
                                                                     det_onnx, detector, seg_onnx, toy_data, tmp_path):
    import onnxruntime as ort

    x, _ = val_batch(toy_data, 1)
    one = detector[3].index(1)  # an image with one detection
    inputs = {str(cls_onnx): x, str(small_pte[0]): x, str(qat_onnx): x, str(det_onnx): detector[2][one],
              str(seg_onnx): torch.randn(1, 3, 208, 240, generator=torch.Generator().manual_seed(0))}
    ptq = ptq_run / "export" / "mobilenet_v3_large_int8"
    for written in (qat_run / "int8.pte", ptq.with_suffix(".onnx"), ptq.with_suffix(".pte")):
        if written.exists():  # written by the int8 tests above (the PTQ run's .onnx and .pte)
            inputs[str(written)] = x
    torch.save(inputs, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = torch.load(tmp_path / "y.pt")
    for f, inp in inputs.items():
        if f.endswith(".onnx"):
            s = ort.InferenceSession(f, providers=["CPUExecutionProvider"])
            here = [torch.from_numpy(a) for a in s.run(None, {s.get_inputs()[0].name: inp.numpy()})]
        else:
            from executorch.runtime import Runtime

            here = list(Runtime.get().load_program(f).load_method("forward").execute([inp]))
        assert len(fresh[f]) == len(here) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fresh[f], here)), f
    assert len(fresh[str(det_onnx)][0]) == 1


# ============================================================================ bad input


def test_bad_input_is_one_message_exit_2_and_no_file(toy_backbone, qat_run, seg_run, tmp_path):
    cls_run = toy_backbone.parents[1]
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((cls_run / "config.yaml").read_text())
    existing = tmp_path / "exists.onnx"
    existing.write_text("x")
    cases = [
        ([empty, "--format", "onnx"], "a run directory without weights"),
        ([toy_backbone, "--recipe", seg_run[0] / "config.yaml", "--format", "onnx", "--out", tmp_path / "a.onnx"],
         "a checkpoint of another recipe"),
        ([qat_run / "checkpoints" / "last.pt", "--recipe", ROOT / "recipes/toy/classification.yaml", "--format",
          "onnx", "--out", tmp_path / "b.onnx"], "a checkpoint of another recipe"),
        ([cls_run, "--format", "tflite"], "unknown format"),
        ([cls_run, "--format", "onnx", "--out", existing], "exists"),
        ([cls_run, "--format", "onnx", "--out", tmp_path / "no" / "such" / "dir.onnx"], "does not exist"),
        ([toy_backbone, "--format", "onnx"], "needs --recipe"),
    ]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for args, message in cases:
        code, stdout, stderr = export(tmp_path, *args)
        assert code == 2, (args, stderr)
        assert message in stderr and "Traceback" not in stderr, stderr
        assert stderr.startswith("tools/export.py: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert existing.read_text() == "x"
