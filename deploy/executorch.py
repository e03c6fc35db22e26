"""ExecuTorch (.pte, XNNPACK backend) exports, their int8 through torchao's PT2E flow, and the runner in
ExecuTorch's Python runtime.

float: torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> .pte.
int8:  torch.export -> torchao prepare_pt2e(XNNPACKQuantizer, symmetric per-channel) -> calibration ->
       convert_pt2e -> torch.export -> XNNPACK lowering -> .pte. XNNPACKQuantizer ships with ExecuTorch
       (torchao 0.18 has none of its own); the prepare/convert functions are torchao's
       (`torchao.quantization.pt2e`).
Detection is refused: torch.export stops at the data-dependent output size of torchvision's NMS (see
`detection_refusal`), so there is no graph to lower RoIAlign/NMS from.
"""

from __future__ import annotations

import contextlib
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


def quantize_pt2e(model: nn.Module, example: torch.Tensor, calibration) -> tuple[nn.Module, int]:
    """PT2E post-training quantization with the XNNPACK quantizer; returns (converted module, images seen)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    batch = torch.export.Dim("batch", min=1, max=1024)
    with _quiet(), torch.no_grad():
        graph = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(graph, quantizer)
        seen = 0
        for images in calibration:
            prepared(images)
            seen += images.shape[0]
        return convert_pt2e(prepared), seen


def export_int8(converted: nn.Module, example: torch.Tensor) -> tuple[bytes, dict]:
    with _quiet(), torch.no_grad():
        buffer = _lower(torch.export.export(converted, (example,)))
    return buffer, {"backend": "XNNPACK", "batch": 1, "dynamic": "none",
                    "quantizer": "XNNPACKQuantizer, symmetric, per-channel weights (torchao PT2E)"}


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
