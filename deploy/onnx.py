"""ONNX export of every model, and its runner in ONNX Runtime.

Which exporter (torch.onnx.export(dynamo=...)), and why:
- float classification and segmentation: dynamo=True (torch.export + onnxscript, opset 18), the exporter
  PyTorch maintains; MobileNetV3's hardsigmoid/hardswish become ONNX HardSigmoid/HardSwish (opset >= 14).
  Batch (and for segmentation height and width) are dynamic.
- Faster R-CNN: dynamo=False (the TorchScript-based exporter, opset 17), the path torchvision tests its
  detectors with. torch.export (so dynamo=True) stops at a data-dependent guard in torchvision's batched
  NMS ("Could not guard on data-dependent expression Eq(4*u1, 0)"). Height and width are dynamic axes, and
  so is the number of detections (0, 1 or many: tested).
- int8 (the eager QAT/PTQ models): dynamo=False: torch.export cannot trace eager int8 modules (their
  packed-weight objects), while the TorchScript-based exporter writes them in ONNX's QDQ form (int8 weights,
  QuantizeLinear/DequantizeLinear around Conv, Gemm, HardSwish, Add, Mul), which ONNX Runtime fuses into
  int8 kernels. A PTQ run's TorchScript export (export/model_int8.pt) goes through the same exporter.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

OPSET_DYNAMO = 18
OPSET_TORCHSCRIPT = 17


class SegmentationOut(nn.Module):
    """A segmentation model's "out" logits alone (the aux head is a training loss)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def exact_resize(transform: nn.Module, image: torch.Tensor, target=None):
    """GeneralizedRCNNTransform.resize (eval) with PyTorch's eager rounding, for the ONNX graph.

    Eager PyTorch resizes to floor(side * scale) computed in Python floats (float64). Traced for ONNX,
    torchvision computes the scale in float32 and lets ONNX Runtime's Resize derive the size from it, which
    rounds differently for some sizes: a 163 x 184 image becomes 159 px high instead of 160 at min_size 160,
    and its detections move by 0.3 px and their scores by 0.01 (seen on the toy val set). Here the graph
    computes the output size as eager PyTorch does (float64) and resizes to it."""
    shape = torch._shape_as_tensor(image)[-2:].to(torch.float64)
    # one-element tensors, neither Python floats (the tracer turns `float / tensor` into a float32 Reciprocal
    # and Mul) nor 0-d tensors (the exporter treats those as scalars and casts the division to float32: a
    # 183 px side scaled to 160 became 159, and every box moved by 0.6%)
    lo = torch.full((1,), float(transform.min_size[-1]), dtype=torch.float64)
    hi = torch.full((1,), float(transform.max_size), dtype=torch.float64)
    scale = torch.minimum(lo / shape.amin(0, keepdim=True), hi / shape.amax(0, keepdim=True))
    size = torch.floor(shape * scale).to(torch.int64)
    image = F.interpolate(image[None], size=(size[0], size[1]), mode="bilinear", align_corners=False)[0]
    return image, target


class SingleImageDetector(nn.Module):
    """A torchvision detector on one float image (3, H, W) in [0, 1] -> (boxes, labels, scores); for the
    ONNX graph, a copy with `exact_resize`."""

    def __init__(self, model: nn.Module, onnx_resize: bool = False):
        super().__init__()
        if onnx_resize:
            model = copy.deepcopy(model)
            model.transform.resize = partial(exact_resize, model.transform)  # an instance attribute: forward
        self.model = model                                                    # calls self.resize

    def forward(self, image: torch.Tensor):
        out = self.model([image])[0]
        return out["boxes"], out["labels"], out["scores"]


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warn about deprecations; keep the CLI's output to its own lines."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export(model: nn.Module, kind: str, example: torch.Tensor, path: str) -> dict:
    """Write `model` (eval mode) to `path`; kind: classification | segmentation | detection | int8.
    Returns what the sidecar records about the graph (exporter, opset, inputs, outputs)."""
    with _quiet(), torch.no_grad():
        if kind == "detection":
            torch.onnx.export(SingleImageDetector(model, onnx_resize=True).eval(), (example,), path, dynamo=False,
                              opset_version=OPSET_TORCHSCRIPT, input_names=["image"],
                              output_names=["boxes", "labels", "scores"],
                              dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                            "labels": {0: "detections"}, "scores": {0: "detections"}})
            return {"exporter": "torchscript", "opset": OPSET_TORCHSCRIPT, "inputs": {"image": "float32 (3, H, W) in [0, 1]"},
                    "outputs": {"boxes": "float32 (N, 4) xyxy, input pixels", "labels": "int64 (N,)",
                                "scores": "float32 (N,)"}}
        if kind == "int8":
            torch.onnx.export(model, (example,), path, dynamo=False, opset_version=OPSET_TORCHSCRIPT,
                              input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
            return {"exporter": "torchscript", "opset": OPSET_TORCHSCRIPT,
                    "inputs": {"images": "float32 (N, 3, H, W), normalized"}, "outputs": {"logits": "float32 (N, C)"}}
        batch = torch.export.Dim("batch", min=1, max=1024)
        if kind == "segmentation":
            model = SegmentationOut(model).eval()
            shapes = ({0: batch, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},)
            outputs = {"out": "float32 (N, classes, H, W) logits"}
        else:
            shapes = ({0: batch},)
            outputs = {"logits": "float32 (N, C)"}
        program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET_DYNAMO,
                                    input_names=["images"], output_names=list(outputs), dynamic_shapes=shapes,
                                    verbose=False)
        program.save(path)
    return {"exporter": "dynamo", "opset": OPSET_DYNAMO, "inputs": {"images": "float32 (N, 3, H, W), normalized"},
            "outputs": outputs}


def session(path: str, threads: int | None = None, spin: bool = True):
    """spin=False: ONNX Runtime's threads sleep between runs instead of spinning (a benchmark that times
    PyTorch in between needs the cores back)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


def runner(path: str, kind: str, threads: int | None = None, spin: bool = True):
    """A callable with PyTorch's calling convention for the check: tensors in, tensors out."""
    from deploy.check import CheckFailed

    sess = session(path, threads, spin)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor):
        try:
            outs = sess.run(None, {name: x.numpy()})
        except Exception as exc:  # noqa: BLE001 (onnxruntime raises its own types)
            raise CheckFailed(f"ONNX Runtime refused an input of shape {tuple(x.shape)}: "
                              f"{str(exc).strip().splitlines()[0][:300]}") from None
        if kind == "detection":
            return {"boxes": torch.from_numpy(outs[0]), "labels": torch.from_numpy(outs[1]),
                    "scores": torch.from_numpy(outs[2])}
        return torch.from_numpy(outs[0])

    return run
