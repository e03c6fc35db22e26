"""ExecuTorch (.pte, XNNPACK backend) exports, their int8 through torchao's PT2E flow, and the runner in
ExecuTorch's Python runtime.

float: torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte.
int8:  torch.export -> torchao prepare_pt2e(XNNPACKQuantizer) -> quantization parameters -> convert_pt2e ->
       torch.export -> XNNPACK lowering -> .pte. XNNPACKQuantizer ships with ExecuTorch (torchao 0.18 has
       none of its own); the prepare/convert functions are torchao's (`torchao.quantization.pt2e`).
       The quantization parameters: PTQ calibrates (symmetric per-channel weights, histogram activation
       ranges); QAT carries over the eager int8 model's own (`carry_qparams`): the weights were trained for
       those roundings, and PT2E's recalibrated ranges lost 40 points of the toy QAT model (docs/export.md).
Detection is refused: torch.export stops at the data-dependent output size of torchvision's NMS (see
`detection_refusal`), so there is no graph to lower RoIAlign/NMS from.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings

import torch
from torch import nn

from deploy.onnx import SegmentationOut

# torchao's import registers an Enum with torch's pytree, which logs a deprecation warning on every run
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


@contextlib.contextmanager
def _quiet():
    """torch.export logs the whole graph when it fails, and the lowering prints progress: keep the CLI's
    output to its own lines."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _lower(program: torch.export.ExportedProgram) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _shapes(kind: str, size: int):
    """Batch 1 (what a device runs). Segmentation keeps height and width dynamic, from half to twice the
    eval size (the short side is the eval size; XNNPACK plans its memory for the upper bound)."""
    if kind == "segmentation":
        return ({2: torch.export.Dim("height", min=size // 2, max=2 * size),
                 3: torch.export.Dim("width", min=size // 2, max=2 * size)},)
    return None


def export_float(model: nn.Module, kind: str, example: torch.Tensor) -> tuple[bytes, dict]:
    """kind: classification | segmentation; example: a batch-1 input."""
    if kind == "segmentation":
        model = SegmentationOut(model).eval()
    with _quiet(), torch.no_grad():
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=_shapes(kind, example.shape[-1]))
        buffer = _lower(program)
    size = example.shape[-1]
    dynamic = f"height and width in [{size // 2}, {2 * size}]" if kind == "segmentation" else "none"
    return buffer, {"backend": "XNNPACK", "batch": 1, "dynamic": dynamic}


def quantize_pt2e(model: nn.Module, example: torch.Tensor, calibration=None,
                  eager: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """PT2E quantization with the XNNPACK quantizer; returns (converted module, what the sidecar records).

    eager None: post-training quantization, symmetric per-channel weights, activation ranges calibrated on
    `calibration` (batches of images). eager (a converted eager int8 model of the same network): every
    quantization parameter is carried over from it (`carry_qparams`), nothing is calibrated."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    per_channel = True if eager is None else _eager_weights_per_channel(eager)
    # eager int8 weights span -128..127 (qint8); XNNPACK's default symmetric range is -127..127
    config = get_symmetric_quantization_config(is_per_channel=per_channel,
                                               **({} if eager is None else {"weight_qmin": -128}))
    quantizer = XNNPACKQuantizer().set_global(config)
    batch = torch.export.Dim("batch", min=1, max=1024)
    with _quiet(), torch.no_grad():
        graph = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(graph, quantizer)
        if eager is None:
            seen = 0
            for images in calibration:
                prepared(images)
                seen += images.shape[0]
            info = {"calibration_images": seen,
                    "quantizer": "XNNPACKQuantizer, symmetric, per-channel weights (torchao PT2E)"}
        else:
            carried = carry_qparams(prepared, eager)
            info = {"calibration_images": 0, "qparams_carried": carried,
                    "quantizer": f"XNNPACKQuantizer, symmetric, per-{'channel' if per_channel else 'tensor'} "
                                 "weights (torchao PT2E), every scale and zero point carried from the eager "
                                 "int8 model"}
        return convert_pt2e(prepared), info


# ---------------------------------------------------------------- the eager int8 model's qparams in PT2E
#
# A QAT model's weights were trained for the roundings of its own fake quantization: per-tensor int8
# weights (qnnpack) and the activation ranges its observers learned. PT2E's own calibration chooses other
# ranges (histogram-optimal, per-channel weights), which the toy QAT model did not survive (46 of 100 val
# images right against the eager int8 model's 83). So for a QAT source every PT2E observer is replaced by
# the scale and zero point that the eager int8 model (the published row's, models.quantize.convert_int8)
# uses for the same tensor:
#   - eager activations are quint8 (0..255, zero point z); PT2E's are int8 (-128..127): the same grid with
#     zero point z - 128, so every value rounds to the same level;
#   - weights: the eager quantized conv/linear weight's scale (per-tensor for qnnpack, per-channel for x86
#     and fbgemm), symmetric, -128..127.
# The tensor an observer sees is found from the graph: the producing op's module path (torch.export's
# nn_module_stack) names the eager module that quantizes the same tensor.

# ops whose output keeps its input's quantization in eager int8 (quantized pooling, flatten, dropout)
_SAME_QPARAMS = ("adaptive_avg_pool2d", "flatten", "dropout", "dropout_", "view", "reshape", "clone")
# after fusion, a ReLU's output is its convolution's (ConvReLU2d / LinearReLU in eager int8)
_FUSED_INTO_PRODUCER = ("relu", "relu_")


@functools.cache
def _carried_qparams_class():
    """torchao's ObserverBase subclass (convert_pt2e converts only observers it recognizes), built on first
    use so that importing this module does not import torchao."""
    from torchao.quantization.pt2e import ObserverBase

    class CarriedQParams(ObserverBase):
        """A PT2E observer holding given quantization parameters (torchao's FixedQParamsObserver is
        per-tensor only); convert_pt2e reads dtype, qscheme, quant_min/max, ch_axis and calculate_qparams()."""

        def __init__(self, like, scale: torch.Tensor, zero_point: torch.Tensor, qscheme, ch_axis: int = 0):
            super().__init__(dtype=like.dtype)
            self.quant_min, self.quant_max = -128, 127
            self.qscheme, self.ch_axis = qscheme, ch_axis
            self.register_buffer("scale", scale.detach().to(torch.float32).reshape(-1).clone())
            self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(-1).clone())

        def forward(self, x):
            return x

        def calculate_qparams(self):
            return self.scale, self.zero_point

    return CarriedQParams


def _carried(like, scale, zero_point, qscheme, ch_axis: int = 0) -> nn.Module:
    return _carried_qparams_class()(like, scale, zero_point, qscheme, ch_axis)


def _eager_weights_per_channel(eager: nn.Module) -> bool:
    for m in eager.modules():
        w = getattr(m, "weight", None)
        if callable(w) and hasattr(m, "_packed_params"):
            return w().qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    raise ValueError("the eager int8 model has no quantized convolution or linear layer")


def _op(node) -> str:
    return getattr(node.target, "_opname", "") if node.op == "call_function" else node.op


def _is_observer(node) -> bool:
    return node.op == "call_module" and node.target.startswith("activation_post_process_")


def _module_path(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        raise ValueError(f"PT2E node {node.name}: no module path to find its eager int8 counterpart")
    return list(stack.values())[-1][0]


def _activation_qparams(node, eager: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager int8 model's (scale, quint8 zero point) of the tensor `node` computes."""
    while _op(node) in _SAME_QPARAMS or _is_observer(node):
        node = node.args[0]
    if node.op == "placeholder":
        module = eager.quant  # QuantStub -> Quantize: the input's qparams
    else:
        op = _op(node)
        if op in ("hardsigmoid", "hardsigmoid_"):
            # SE gate: the quantized hardsigmoid kernel's fixed output qparams (quint8, 1/256, 0)
            return torch.tensor(1.0 / 256.0), torch.tensor(0)
        while _op(node) in _FUSED_INTO_PRODUCER:
            node = node.args[0]
        path = _module_path(node)
        path += {"add": ".skip_add", "add_": ".skip_add", "mul": ".skip_mul", "mul_": ".skip_mul"}.get(_op(node), "")
        module = eager.get_submodule(path)
    return torch.as_tensor(module.scale), torch.as_tensor(module.zero_point)


def carry_qparams(prepared, eager: nn.Module) -> int:
    """Replace every observer of a prepare_pt2e'd MobileNetV3 by the eager int8 model's scale and zero point
    of the same tensor; returns how many. An observer without a counterpart is an error (a network the
    mapping does not know), never a silent recalibration."""
    count = 0
    for node in list(prepared.graph.nodes):
        if not _is_observer(node):
            continue
        observer = getattr(prepared, node.target)
        src = node.args[0]
        try:
            if src.op == "get_attr" and src.target.endswith(".weight"):
                w = eager.get_submodule(src.target.rsplit(".", 1)[0]).weight()
                if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                    new = _carried(observer, w.q_per_channel_scales(), w.q_per_channel_zero_points(),
                                   torch.per_channel_symmetric, w.q_per_channel_axis())
                else:
                    new = _carried(observer, torch.tensor(w.q_scale()), torch.tensor(w.q_zero_point()),
                                   torch.per_tensor_symmetric)
            else:
                scale, zero_point = _activation_qparams(src, eager)
                new = _carried(observer, scale, zero_point - 128, torch.per_tensor_affine)
        except (AttributeError, ValueError) as exc:
            raise ValueError(f"PT2E observer {node.target} on {src.name}: no eager int8 counterpart ({exc})") from None
        setattr(prepared, node.target, new)
        count += 1
    return count


def export_int8(converted: nn.Module, example: torch.Tensor, quantizer: str) -> tuple[bytes, dict]:
    with _quiet(), torch.no_grad():
        buffer = _lower(torch.export.export(converted, (example,)))
    return buffer, {"backend": "XNNPACK", "batch": 1, "dynamic": "none", "quantizer": quantizer}


def detection_refusal(model: nn.Module, example: torch.Tensor) -> str:
    """Why the detector does not export to ExecuTorch: torch.export's own first error line."""
    from deploy.onnx import SingleImageDetector

    try:
        with _quiet(), torch.no_grad():
            torch.export.export(SingleImageDetector(model), (example,))
    except Exception as exc:  # noqa: BLE001 (any failure of torch.export is the answer)
        lines = [ln.strip() for ln in str(exc).splitlines() if "data-dependent" in ln or "Guard" in ln]
        return (lines[0] if lines else str(exc).strip().splitlines()[0])[:200]
    return "torch.export traced it, but lowering torchvision's RoIAlign/NMS to XNNPACK is not implemented here"


def runner(path: str):
    """A callable on the .pte in ExecuTorch's Python runtime: a batch of N images runs as N calls."""
    from executorch.runtime import Runtime

    from deploy.check import CheckFailed

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def one(x: torch.Tensor) -> torch.Tensor:
        try:
            return method.execute([x.contiguous()])[0]
        except RuntimeError as exc:
            raise CheckFailed(f"ExecuTorch refused an input of shape {tuple(x.shape)}: {exc}") from None

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([one(x[i:i + 1]) for i in range(x.shape[0])])

    return run
