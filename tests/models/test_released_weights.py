"""Every released checkpoint family loads in the key layout it was saved with, and predicts as torchvision.

For each family: torchvision's own model at random weights and BatchNorm statistics (tests/oracle.py),
its state dict written in the released file's layout (old key names, no `_metadata`, as a 2020/2021
torch.save of the reference scripts' dict), loaded by this project's loader (models/weights.py) and by
torchvision's model, and both run on toy images: logits, masks, detections must be equal.

Layouts: classification V1 (Large, Small; 2020) and the segmentation files (LR-ASPP, DeepLabV3 with its
aux head; 2021) have today's names; the detectors (2021) name the FPN blocks and the RPN head conv
before they became Conv2dNormActivation; the quantized (QAT) file (2021) has no SE-gate observer.
torchvision released no FCN on MobileNetV3 (only FCN ResNet-50/101), so there is no FCN file to load.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torchvision
from torch.ao import quantization as tq
from torchvision.io import ImageReadMode, decode_image
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor
from torchvision.models.quantization import mobilenet_v3_large as tv_quantizable
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.v2 import functional as F

from models import build, load_weights, quantize
from tests.oracle import assert_close, randomize

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(folder, n: int, size: int | None) -> list[torch.Tensor]:
    """The first n toy JPEGs (sorted), float in [0, 1]; resized to size x size when given."""
    files = sorted(folder.rglob("*.jpg"))[:n]
    out = [decode_image(str(f), mode=ImageReadMode.RGB).float() / 255 for f in files]
    return [F.resize(x, [size, size], antialias=True) for x in out] if size else out


def _batch(images: list[torch.Tensor]) -> torch.Tensor:
    return F.normalize(torch.stack(images), MEAN, STD)


def _save_released(state: dict, path) -> None:
    """A plain dict: no `_metadata`, so every module's load hook sees version None (the oldest layout)."""
    torch.save(dict(state), path)


def _equal_outputs(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _equal_outputs(a[k], b[k], f"{what} {k}")
    else:
        assert torch.equal(a, b), f"{what}: not equal (max diff {(a - b).abs().max().item():.3g})"


# ---------------------------------------------------------------------------- classification V1


@pytest.mark.parametrize("name", ["mobilenet_v3_large", "mobilenet_v3_small"])
def test_classification_v1_file_gives_torchvision_logits(name, toy_data, tmp_path):
    x = _batch(_images(toy_data / "imagenet/val", 4, 96))
    ref = randomize(getattr(torchvision.models, name)(), 0, inputs=x).eval()
    _save_released(ref.state_dict(), tmp_path / "v1.pth")
    ours = load_weights(build(name), tmp_path / "v1.pth").eval()
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert_close(got, want, msg=name)
    _equal_outputs(got, want, name)
    assert (got.argmax(1) != got.argmax(1)[0]).any(), "logits without signal: every image the same class"


# ---------------------------------------------------------------------------- detection (2021 layout)

DET_SIZE = dict(min_size=160, max_size=320)  # the low-res builder's settings, at a smaller test size


def torchvision_detector(low_res: bool) -> FasterRCNN:
    """torchvision's fasterrcnn_mobilenet_v3_large(_320)_fpn as its builders make it for released weights
    (FrozenBatchNorm2d backbone, 3 trainable stages, 3 anchor levels), built from its public parts."""
    body = torchvision.models.mobilenet_v3_large(norm_layer=FrozenBatchNorm2d)
    backbone = _mobilenet_extractor(body, True, 3)
    sizes = ((32, 64, 128, 256, 512),) * 3
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 3)
    top_n = dict(rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150) if low_res else {}
    return FasterRCNN(backbone, 91, rpn_anchor_generator=anchors, rpn_score_thresh=0.05, **DET_SIZE, **top_n)


def released_detection_layout(state: dict) -> dict:
    """Today's keys -> the 2021 files' keys: FPN inner/layer blocks and the RPN head conv were plain
    convolutions then (`inner_blocks.0.weight`, `rpn.head.conv.weight`)."""
    def old(k: str) -> str:
        k = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", k)
        return re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", k)
    return {old(k): v for k, v in state.items()}


def legacy_detector_file(low_res: bool, images, path) -> FasterRCNN:
    """Write a 2021-layout detector file at random weights; returns torchvision's model loading it."""
    ref = randomize(torchvision_detector(low_res), 0, inputs=images).eval()
    legacy = released_detection_layout(ref.state_dict())
    assert "backbone.fpn.inner_blocks.0.weight" in legacy and "rpn.head.conv.weight" in legacy
    assert not any(".num_batches_tracked" in k for k in legacy)  # FrozenBatchNorm2d keeps none
    _save_released(legacy, path)
    fresh = torchvision_detector(low_res).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)  # torchvision: "All keys matched"
    return fresh


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn",
                                  "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_detector_2021_file_gives_torchvision_detections(name, toy_data, tmp_path):
    images = _images(toy_data / "coco/val2017", 3, None)
    low_res = "320" in name
    ref = legacy_detector_file(low_res, images, tmp_path / "det.pth")
    ours = load_weights(build(name, frozen_bn=True, **DET_SIZE), tmp_path / "det.pth").eval()
    with torch.no_grad():
        got, want = ours(images), ref(images)
    assert sum(len(d["boxes"]) for d in want) >= 20, "too few detections to compare"
    for i, (a, b) in enumerate(zip(got, want)):
        _equal_outputs(a, b, f"{name} image {i}")


def test_misfit_file_still_names_file_and_keys(tmp_path):
    """The strict report survives the hooks: a detector file with another class count, and a file
    missing a layer, are one ValueError naming the file and the keys (after the hooks' renaming)."""
    state = released_detection_layout(torchvision_detector(True).state_dict())
    _save_released({k: v for k, v in state.items() if not k.startswith("roi_heads.box_predictor.")
                    and k != "backbone.fpn.layer_blocks.1.bias"}, tmp_path / "cut.pth")
    model = build("fasterrcnn_mobilenet_v3_large_320_fpn", frozen_bn=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_weights(model, tmp_path / "cut.pth")
    text = str(err.value)
    assert "cut.pth: the weights do not fit FasterRCNN" in text and "missing from the file (5)" in text
    assert "backbone.fpn.layer_blocks.1.0.bias" in text and "roi_heads.box_predictor.cls_score.weight" in text
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "model half-loaded"
    voc = {**state, "roi_heads.box_predictor.cls_score.weight": torch.zeros(21, 1024)}
    _save_released(voc, tmp_path / "voc.pth")
    with pytest.raises(ValueError, match=r"voc.pth(.|\n)*roi_heads.box_predictor.cls_score.weight: "
                                         r"checkpoint \(21, 1024\) vs model \(91, 1024\)"):
        load_weights(model, tmp_path / "voc.pth")


# ---------------------------------------------------------------------------- segmentation (2021)


@pytest.mark.parametrize("name,kwargs", [("lraspp_mobilenet_v3_large", {}),
                                         ("deeplabv3_mobilenet_v3_large", {"aux_loss": True})])
def test_segmentation_file_gives_torchvision_masks(name, kwargs, toy_data, tmp_path):
    """LR-ASPP and DeepLabV3 (its released file carries the aux FCN head: aux_loss=True)."""
    x = _batch(_images(toy_data / "coco/val2017", 2, 128))
    ref = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=21,
                                                         **kwargs)
    ref = randomize(ref, 0, inputs=x).eval()
    _save_released(ref.state_dict(), tmp_path / "seg.pth")
    ours = load_weights(build(name, num_classes=21, **kwargs), tmp_path / "seg.pth").eval()
    with torch.no_grad():
        got, want = ours(x), ref(x)
    _equal_outputs(got, want, name)
    masks = want["out"].argmax(1)
    assert masks.unique().numel() >= 3, "masks without signal"


# ---------------------------------------------------------------------------- the quantized (QAT) file (2021)


def legacy_qat_file(x: torch.Tensor, path) -> None:
    """torchvision's quantizable MobileNetV3-Large, QAT-prepared (qnnpack) at random weights, observers
    run on images, written as the 2021 file: no SE-gate observer keys (`scale_activation.*`), no _metadata."""
    ref = randomize(tv_quantizable(quantize=False), 0, inputs=x)
    quantize.prepare_qat(ref, "qnnpack")
    with torch.no_grad():
        for i in range(3):
            ref(x.flip(-1) if i % 2 else x)
    _save_released({k: v for k, v in ref.state_dict().items() if ".scale_activation." not in k}, path)


def _fake_quant_outputs(model, x):
    model.eval().apply(tq.disable_observer)
    with torch.no_grad():
        return model(x)


def test_qat_2021_file_gives_torchvision_int8_logits(toy_data, tmp_path):
    """Loaded the way `run.eval_only=true model.weights=<file>` does (train_qat.load_qat_weights), with
    either SE gate: the int8 logits equal torchvision's int8 model from the same file. The fake-quant
    model with qat.se_gate=float equals torchvision's module with its gate kept out of QAT (the 2021
    functional hardsigmoid); with fake_quant, the gate observer keeps its fixed scale 1/256, where
    torchvision's version-2 shim loads 1.0 (its fake-quant model then gates with 0/1)."""
    import train_qat

    torch.backends.quantized.engine = "qnnpack"
    x = _batch(_images(toy_data / "imagenet/val", 4, 64))
    legacy_qat_file(x, tmp_path / "qat.pth")
    file = torch.load(tmp_path / "qat.pth", weights_only=True)
    ref = quantize.prepare_qat(tv_quantizable(quantize=False), "qnnpack")
    ref.load_state_dict(file, strict=True)  # torchvision's shim fills the gate observer keys
    assert ref.features[4].block[2].scale_activation.activation_post_process.scale.item() == 1.0
    with quantize.engine("qnnpack"), torch.no_grad():
        want = quantize.convert_int8(ref, "qnnpack")(x)
    float_gate_ref = tv_quantizable(quantize=False)
    float_gate_ref.train().fuse_model(is_qat=True)
    float_gate_ref.qconfig = tq.get_default_qat_qconfig("qnnpack")
    for m in float_gate_ref.modules():
        if hasattr(m, "scale_activation"):
            m.scale_activation.qconfig = None
    tq.prepare_qat(float_gate_ref, inplace=True)
    float_gate_ref.load_state_dict(file, strict=False)  # its shim adds gate keys this model has no place for
    for gate in ("float", "fake_quant"):
        ours = quantize.prepare_qat(build("quantizable_mobilenet_v3_large"), "qnnpack", gate)
        train_qat.load_qat_weights(ours, str(tmp_path / "qat.pth"), gate)
        with quantize.engine("qnnpack"), torch.no_grad():
            got = quantize.convert_int8(ours, "qnnpack")(x)
        assert (want.argmax(1) != want.argmax(1)[0]).any(), "int8 logits without signal"
        _equal_outputs(got, want, f"int8, se_gate={gate}")
        if gate == "float":
            _equal_outputs(_fake_quant_outputs(ours, x), _fake_quant_outputs(float_gate_ref, x), "fake-quant")
        else:
            gate_fq = ours.features[4].block[2].scale_activation.activation_post_process
            assert gate_fq.scale.item() == 1 / 256 and gate_fq.zero_point.item() == 0


def test_qat_file_with_the_other_gate_layout_is_a_clear_error(tmp_path):
    """A file saved with gate observers (today's torchvision, qat.se_gate=fake_quant) into the float-gate
    model: one UserError naming the file, the keys and the setting that loads it."""
    import train_qat
    from engine.errors import UserError

    ref = quantize.prepare_qat(tv_quantizable(quantize=False), "qnnpack")
    torch.save(ref.state_dict(), tmp_path / "today.pth")
    ours = quantize.prepare_qat(build("quantizable_mobilenet_v3_large"), "qnnpack", "float")
    with pytest.raises(UserError) as err:
        train_qat.load_qat_weights(ours, str(tmp_path / "today.pth"), "float")
    text = str(err.value)
    assert "today.pth" in text and "unexpected in the file" in text
    assert "features.4.block.2.scale_activation.activation_post_process.scale" in text
    assert "qat.se_gate=fake_quant" in text


def test_readme_eval_only_command_on_the_2021_low_res_detector_file(toy_data, tmp_path):
    """`python train_detection.py --recipe recipes/detection/fasterrcnn_mobilenet_v3_large_320_fpn.yaml
    data.root=... run.eval_only=true model.weights=<2021-layout file>`, run in process on the toy COCO:
    exit 0, and its detections file holds torchvision's detections of every val image."""
    import json

    from PIL import Image
    from torchvision.transforms.functional import to_tensor

    from tests.conftest import ROOT, run_in_process

    coco = toy_data / "coco"
    images = json.loads((coco / "annotations/instances_val2017.json").read_text())["images"]
    tensors = [to_tensor(Image.open(coco / "val2017" / im["file_name"]).convert("RGB")) for im in images]
    size = dict(min_size=320, max_size=640)  # the recipe's
    ref = randomize(torchvision_detector(True), 0, inputs=tensors[:2]).eval()
    for k, v in size.items():
        setattr(ref.transform, k, (v,) if k == "min_size" else v)
    _save_released(released_detection_layout(ref.state_dict()), tmp_path / "det_2021.pth")
    out = tmp_path / "eval"
    proc = run_in_process("train_detection.py", [
        "--recipe", ROOT / "recipes/detection/fasterrcnn_mobilenet_v3_large_320_fpn.yaml",
        f"data.root={coco}",
        "run.eval_only=true", f"model.weights={tmp_path / 'det_2021.pth'}", f"run.output_dir={out}",
        "data.workers=0", "run.device=cpu"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((out / "detections/eval.json").read_text())
    with torch.no_grad():
        want = [(im["id"], d) for im, x in zip(images, tensors) for d in [ref([x])[0]]]
    want_rows = [(i, b, s, lab) for i, d in want
                 for b, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist())]
    assert len(want_rows) >= 50 and len(got) == len(want_rows)
    for g, (i, b, s, lab) in zip(got, want_rows):
        assert (g["image_id"], g["category_id"]) == (i, lab)
        assert g["bbox"] == pytest.approx([b[0], b[1], b[2] - b[0], b[3] - b[1]], abs=1e-3)
        assert g["score"] == pytest.approx(s, abs=1e-5)


def test_float_gate_checkpoint_is_the_2021_layout_and_loads_in_torchvision(tmp_path):
    """A QAT state dict of ours with qat.se_gate=float says module version 1 for its SE blocks (no gate
    observer, as the 2021 file), so torchvision's quantizable model loads it strictly, and so do we."""
    ours = quantize.prepare_qat(build("quantizable_mobilenet_v3_large"), "qnnpack", "float")
    state = ours.state_dict()
    assert not any(".scale_activation." in k for k in state)
    assert state._metadata["features.4.block.2"]["version"] == 1
    quantize.prepare_qat(tv_quantizable(quantize=False), "qnnpack").load_state_dict(state, strict=True)
    torch.save(state, tmp_path / "ours.pth")
    load_weights(quantize.prepare_qat(build("quantizable_mobilenet_v3_large"), "qnnpack", "float"),
                 tmp_path / "ours.pth")
