"""Quantization mechanics of train_qat.py: qconfigs per backend, QAT/PTQ preparation, the per-epoch
observer/BN phase, int8 conversion, and an int8 export that reloads in a fresh process.

Eager mode (`torch.ao.quantization`) is deprecated in favour of torchao, but it is what torchvision's
published quantized MobileNetV3 was made with, and it still ships with the pinned torch: the recipe
reproduces it with that API.

Export: torchvision#5890 is the trap: in 2021 the serialized int8 MobileNetV3 reloaded at random
accuracy (one cause: quantized Hardswish kept its output scale/zero-point out of the state dict,
pytorch#91877, fixed since), so torchvision ships the QAT state dict and converts after loading. We
export the converted model as TorchScript (traced: every module attribute becomes part of the saved
module, and packed weights are unpacked on save and re-packed on load for the active engine), plus a
JSON sidecar naming the backend and the preprocessing; it reloads without this repository's model code
or a rebuild recipe, and tests load it in a fresh process. `load_int8` is its reader.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic import qat as nniqat

from engine.checkpoint import atomic_write_text
from models.quantizable import float_se_gates

# torch.ao.quantization warns on every prepare/convert that it is deprecated; the reason we use it
# anyway is above, so the warning is silenced here (and only for that message).
warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")

BACKENDS = ("qnnpack", "x86", "fbgemm")
SE_GATES = ("float", "fake_quant")
EXPORT_FILE = "model_int8.pt"
EXPORT_META = "model_int8.json"
EXPORT_FORMAT = "mbv3-recipes-int8-torchscript"


# ============================================================================ backends


def check_backend(backend: str) -> None:
    """A clear error when this PyTorch build has no kernels for `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    available = torch.backends.quantized.supported_engines
    if backend not in available:
        raise ValueError(f"quantization backend {backend!r} is not available in this PyTorch build on this "
                         f"machine (it has: {', '.join(e for e in available if e != 'none')})")


@contextlib.contextmanager
def engine(backend: str) -> Iterator[None]:
    """Run with `backend` as the quantized engine (weight packing and int8 kernels), then restore."""
    check_backend(backend)
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


# ============================================================================ eager-mode QAT and PTQ


def _set_qconfig(model: nn.Module, qconfig, se_gate: str) -> None:
    if se_gate not in SE_GATES:
        raise ValueError(f"unknown se_gate {se_gate!r}: expected one of {', '.join(SE_GATES)}")
    model.qconfig = qconfig
    if se_gate == "float":
        float_se_gates(model)


def prepare_qat(model: nn.Module, backend: str, se_gate: str = "fake_quant") -> nn.Module:
    """torchvision's QAT preparation: train mode, fuse Conv+BN(+ReLU) and SE fc1+ReLU for QAT,
    the backend's default QAT qconfig, prepare_qat (in place). The model's state dict then has
    exactly the keys of torchvision's quantizable mobilenet_v3_large prepared the same way
    (se_gate="fake_quant", today's module), or of its 2021 file (se_gate="float": the SE gate is not
    fake-quantized in training, as the 2021 module's functional hardsigmoid, and has no observer)."""
    check_backend(backend)
    model.train()
    model.fuse_model(is_qat=True)
    _set_qconfig(model, tq.get_default_qat_qconfig(backend), se_gate)
    tq.prepare_qat(model, inplace=True)
    return model


def prepare_ptq(model: nn.Module, backend: str, se_gate: str = "fake_quant") -> nn.Module:
    """torchvision's post-training quantization preparation: eval mode, fuse (not QAT), the
    backend's default qconfig (histogram observer for activations), prepare (in place). se_gate as in
    prepare_qat; the int8 model is the same either way (the gate's observer has fixed qparams)."""
    check_backend(backend)
    model.eval()
    model.fuse_model(is_qat=False)
    _set_qconfig(model, tq.get_default_qconfig(backend), se_gate)
    tq.prepare(model, inplace=True)
    return model


@dataclasses.dataclass(frozen=True)
class Phase:
    """What a QAT epoch updates besides the weights."""

    observers: bool   # observers (activation and weight ranges) follow the data
    bn_stats: bool    # BatchNorm running statistics follow the data (else frozen, BN folded with them)


def phase(epoch: int, num_observer_update_epochs: int, num_batch_norm_update_epochs: int) -> Phase:
    """The phase in which `epoch` trains, as a function of the epoch alone.

    torchvision's reference trains epoch e, then `if e >= num_observer_update_epochs:
    disable_observer` and `if e >= num_batch_norm_update_epochs: freeze_bn_stats`. So epoch e trains
    with observers on iff e <= num_observer_update_epochs (epochs 0-4 for the recipe's 4) and with BN
    statistics updating iff e <= num_batch_norm_update_epochs (epochs 0-3 for 3). Its resume
    re-enables both for one extra epoch (a fresh model has observers on and BN unfrozen, and the
    checks run only after training); deriving the phase from the epoch restores it exactly instead.
    """
    return Phase(observers=epoch <= num_observer_update_epochs, bn_stats=epoch <= num_batch_norm_update_epochs)


def set_phase(model: nn.Module, p: Phase) -> None:
    """Apply a phase to a QAT-prepared model (fake quantization always on)."""
    model.apply(tq.enable_fake_quant)
    model.apply(tq.enable_observer if p.observers else tq.disable_observer)
    model.apply(nniqat.update_bn_stats if p.bn_stats else nniqat.freeze_bn_stats)


@contextlib.contextmanager
def observers_frozen(model: nn.Module) -> Iterator[None]:
    """Evaluate without touching the observers, then restore their flags.

    A FakeQuantize observes whenever its observer is enabled, in eval mode too, so torchvision's
    reference lets the validation images of epochs 0..3 update the activation ranges. Those updates
    decay away within the next training epoch (moving average, constant 0.01, thousands of steps),
    so the published weights do not depend on them; only the logged accuracies of those epochs do.
    We keep evaluation free of side effects."""
    flags = [(m, m.observer_enabled.clone()) for m in model.modules() if isinstance(m, tq.FakeQuantizeBase)]
    model.apply(tq.disable_observer)
    try:
        yield
    finally:
        for m, f in flags:
            m.observer_enabled.copy_(f)


def observer_flags(model: nn.Module) -> set[int]:
    """The distinct observer_enabled values of a prepared model ({1}, {0}, or both if mixed)."""
    return {int(m.observer_enabled[0]) for m in model.modules() if isinstance(m, tq.FakeQuantizeBase)}


def bn_frozen_flags(model: nn.Module) -> set[bool]:
    """The distinct freeze_bn values of the fused Conv+BN QAT modules."""
    return {bool(m.freeze_bn) for m in model.modules() if isinstance(m, nniqat.ConvBn2d)}


def convert_int8(model: nn.Module, backend: str) -> nn.Module:
    """A converted int8 CPU copy of a prepared (QAT or calibrated PTQ) model; `model` is untouched."""
    with engine(backend), warnings.catch_warnings():
        # The FloatFunctional of the 5 blocks without a residual is never called, so its observer has
        # no range ("must run observer before calling calculate_qparams"): unused, as in torchvision.
        warnings.filterwarnings("ignore", message="must run observer before calling calculate_qparams")
        warnings.filterwarnings("ignore", message="torch.quantize_per_tensor, torch.quantize_per_channel")
        q = copy.deepcopy(model).cpu().eval()
        tq.convert(q, inplace=True)
    return q


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Run PTQ observers over an iterable of float image batches; returns the number of images."""
    model.eval()
    n = 0
    for images in batches:
        model(images)
        n += images.shape[0]
    return n


def is_qat_state_dict(state: dict) -> bool:
    """Whether a state dict is a QAT/prepared (fake-quant) one rather than float weights."""
    return any(".activation_post_process." in k or k.startswith("quant.") for k in state)


# ============================================================================ int8 export


def export_int8(int8_model: nn.Module, out_dir: str | Path, backend: str, image_size: int,
                info: dict | None = None) -> Path:
    """Trace a converted int8 model and save it (TorchScript) with a JSON sidecar; returns the file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EXPORT_FILE
    with engine(backend), torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated, but it is the one format that holds an eager-mode int8 model whole:
        # torch.export cannot trace its packed-weight objects (Conv2dPackedParamsBase has no __obj_flatten__).
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        traced = torch.jit.trace(int8_model.eval(), torch.zeros(1, 3, image_size, image_size))
        tmp = path.with_name(f".{path.name}.tmp")
        torch.jit.save(traced, str(tmp))
        tmp.replace(path)
    meta = {"format": EXPORT_FORMAT, "backend": backend, "image_size": image_size, **(info or {})}
    atomic_write_text(out_dir / EXPORT_META, json.dumps(meta, indent=2) + "\n")
    return path


def is_int8_export(path: str | Path) -> bool:
    """A TorchScript archive written by export_int8 (or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / EXPORT_FILE
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/code/__torch__.py") or "/code/__torch__/" in n for n in z.namelist())


def export_file(path: str | Path) -> Path | None:
    """The int8 export that `path` names (the file, or the export directory holding it), or None when
    `path` is something else (a QAT checkpoint). An export file that is there but not a whole TorchScript
    archive (a copy or a disk that ran out) is one error naming the file, not "checkpoint not found"."""
    path = Path(path)
    file = path / EXPORT_FILE if path.is_dir() else path
    if is_int8_export(file):
        return file
    if not (path.is_dir() or file.name == EXPORT_FILE or file.with_name(EXPORT_META).is_file()):
        return None
    if not file.is_file():
        raise ValueError(f"{path}: a directory without {EXPORT_FILE}: not an int8 export (RUN/export) "
                         "and not a checkpoint file")
    raise ValueError(f"{file}: the int8 export is truncated or unreadable ({file.stat().st_size} bytes, "
                     "not a complete TorchScript archive); copy it again, or evaluate the run's QAT "
                     "checkpoint (model.weights=RUN/checkpoints/last.pt)")


def load_int8(path: str | Path, backend: str | None = None) -> tuple[torch.jit.ScriptModule, dict]:
    """Load an int8 export (file or its directory) for CPU inference; returns (model, sidecar info).

    The engine is set to the export's backend before loading, because loading re-packs the weights
    for the engine active at that moment; pass `backend` to run it on another one."""
    path = Path(path)
    if path.is_dir():
        path = path / EXPORT_FILE
    meta_path = path.with_name(EXPORT_META)
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except ValueError as exc:
        raise ValueError(f"{meta_path}: unreadable export sidecar ({exc})") from None
    backend = backend or meta.get("backend")
    if backend is None:
        raise ValueError(f"{path}: no {EXPORT_META} beside it naming the backend; pass the backend explicitly")
    check_backend(backend)
    torch.backends.quantized.engine = backend
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:  # a damaged archive: zip members missing or corrupt
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{path}: the int8 export is truncated or unreadable ({reason})") from None
    model.eval()
    return model, {**meta, "backend": backend}
