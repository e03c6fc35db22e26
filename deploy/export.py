"""One export: build the model of a Source, write it in a format to a temporary name, check it in its
runtime on the val set, then rename it and its sidecar into place. A failed check removes the file.

    format       classification        qat / ptq (int8)                        detection    segmentation
    onnx         float, dynamo         eager int8 model, TorchScript exporter  TorchScript  float, dynamo
    executorch   float, XNNPACK        PT2E int8 (XNNPACKQuantizer), XNNPACK   refused      float, XNNPACK
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from deploy import check, sidecar
from deploy.source import Source, build_float, build_int8, build_qat_float
from engine.errors import UserError

FORMATS = {"onnx": ".onnx", "executorch": ".pte"}


class Unsupported(UserError):
    """The runtime cannot take this model (said in one line, exit 2)."""


def default_out(src: Source, fmt: str) -> Path:
    int8 = "_int8" if src.task in ("qat", "ptq") else ""
    name = f"{src.model_name}{int8}{FORMATS[fmt]}"
    if src.run_dir is not None:
        return src.run_dir / "export" / name
    return src.weights.with_name(f"{src.weights.stem}.{name}")


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def check_out(out: Path, fmt: str, default: bool) -> None:
    """Refuse, before any work, an output that exists or cannot be written."""
    if out.suffix != FORMATS[fmt]:
        raise UserError(f"--out {out}: a {fmt} export is a {FORMATS[fmt]} file")
    for p in (out, sidecar_path(out)):
        if p.exists() or p.is_symlink():
            raise UserError(f"{p}: exists; remove it or choose another --out (exports are never overwritten)")
    parent = out.parent
    if default and not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"{parent}: cannot create the export directory ({exc.strerror})") from None
    if not parent.is_dir():
        raise UserError(f"--out {out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the directory {parent} is not writable")


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def export(src: Source, fmt: str, out: Path, log=print) -> dict:
    """Export, check, and write `out` and its sidecar; returns the sidecar's content."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    tmp = _tmp(out)
    try:
        graph, result, extra = _export_and_check(src, fmt, tmp, log)
        info = sidecar.build(src, fmt, out, graph, result, extra)
        side_tmp = _tmp(sidecar_path(out))
        side_tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(out)
        side_tmp.replace(sidecar_path(out))
    except OSError as exc:  # a full disk, a read-only directory (root passes os.access)
        if exc.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT):
            raise
        out.unlink(missing_ok=True)
        raise UserError(f"{out}: cannot write the export ({exc.strerror or exc})") from None
    finally:
        for p in (tmp, _tmp(sidecar_path(out))):
            p.unlink(missing_ok=True)
    return info


def _export_float(model, kind: str, size: int, fmt: str, tmp: Path):
    """A float model to `tmp` (ONNX with a dynamic batch, exported at batch 2; ExecuTorch at batch 1) and a
    runner of the written file: (graph description, runner)."""
    from deploy import executorch as et
    from deploy import onnx

    if fmt == "onnx":
        graph = onnx.export(model, kind, torch.zeros(2, 3, size, size), str(tmp))
        return graph, onnx.runner(str(tmp), kind)
    buffer, graph = et.export_float(model, kind, torch.zeros(1, 3, size, size))
    _write(tmp, buffer)
    return graph, et.runner(str(tmp))


def _write(tmp: Path, buffer: bytes) -> None:
    with open(tmp, "wb") as fh:
        fh.write(buffer)
        fh.flush()
        os.fsync(fh.fileno())


def _export_and_check(src: Source, fmt: str, tmp: Path, log) -> tuple[dict, dict, dict]:
    from deploy import executorch as et
    from deploy import onnx

    task, cfg = src.task, src.cfg
    extra: dict = {}
    if task == "detection":
        model = build_float(src)
        images = list(check.detection_images(src))
        if fmt == "executorch":
            raise Unsupported(f"executorch: {src.model_name} does not export (torch.export: "
                              f"{et.detection_refusal(model, images[0])}); use --format onnx")
        log(f"exporting {src.model_name} ({src.weights}) to ONNX ...")
        graph = onnx.export(model, "detection", images[0], str(tmp))
        log(f"checking {tmp.name} in ONNX Runtime on {len(images)} val images ...")
        result = check.check_detection(lambda im: model([im])[0], onnx.runner(str(tmp), "detection"), images)
        return graph, result, extra

    if task == "segmentation":
        model = build_float(src)
        graph, exported = _export_float(model, "segmentation", cfg.data.eval_size, fmt, tmp)
        log(f"checking {tmp.name} on the val set ...")
        result = check.check_segmentation(lambda x: model(x)["out"], exported, check.segmentation_batches(src))
        return graph, result, extra

    crop = cfg.data.val_crop
    if task == "classification":
        model = build_float(src)
        graph, exported = _export_float(model, "classification", crop, fmt, tmp)
        log(f"checking {tmp.name} on the val set ...")
        result = check.check_classification(model, exported, check.classification_batches(src), int8=False)
        return graph, result, extra

    # int8: the eager model of the published QAT/PTQ row is the reference of the check
    from models import quantize

    backend = cfg.qat.backend
    eager = build_int8(src)

    def reference(x):
        with quantize.engine(backend):
            return eager(x)

    if fmt == "onnx":
        with quantize.engine(backend):
            graph = onnx.export(eager, "int8", torch.zeros(2, 3, crop, crop), str(tmp))
        exported = onnx.runner(str(tmp), "classification")
        extra["int8"] = {"from": f"the eager int8 model ({backend})", "reference": "eager int8 model"}
    else:
        float_model = build_qat_float(src)
        example = torch.zeros(2, 3, crop, crop)
        if task == "qat":  # the QAT weights with the roundings they were trained for: the eager model's qparams
            log(f"quantizing with PT2E (XNNPACKQuantizer), every scale and zero point carried from the eager int8 "
                f"model ({backend}) ...")
            converted, info = et.quantize_pt2e(float_model, example, eager=eager)
        else:
            log(f"quantizing with PT2E (XNNPACKQuantizer), calibrating on up to "
                f"{cfg.qat.calibration_batches * cfg.data.batch_size} training images ...")
            converted, info = et.quantize_pt2e(float_model, example, check.calibration_batches(src))
        buffer, graph = et.export_int8(converted, torch.zeros(1, 3, crop, crop), info.pop("quantizer"))
        _write(tmp, buffer)
        exported = et.runner(str(tmp))
        if task == "ptq":
            extra["int8"] = {"flow": "PT2E post-training quantization",
                             "weights": "the float weights PTQ started from (model.weights)",
                             "qparams": "calibrated (XNNPACK quantizer's observers)", **info}
        else:
            extra["int8"] = {"flow": "PT2E quantization of the QAT weights",
                             "weights": "the eager QAT checkpoint's trained float weights (fake quantization removed)",
                             "qparams": f"carried from the eager int8 model ({backend}): its weight scales and "
                                        "learned activation ranges", **info}
        extra["int8"]["reference"] = f"eager int8 model ({backend}) of the published {task.upper()} row"
    log(f"checking {tmp.name} on the val set against the eager int8 model ...")
    result = check.check_classification(reference, exported, check.classification_batches(src), int8=True)
    return graph, result, extra


def source_for(path, recipe=None, data_root=None) -> Source:
    from deploy.source import resolve

    return resolve(path, recipe, data_root)
