"""Load torchvision-format state dicts and project checkpoints into a model, with clear errors.

Released torchvision files carry the key layout of the day they were saved: the Faster R-CNN
MobileNetV3 files (early 2021) name `backbone.fpn.inner_blocks.0.weight` and `rpn.head.conv.weight`,
which became `inner_blocks.0.0.weight` and `rpn.head.conv.0.0.weight` when those layers turned into
Conv2dNormActivation; the 2021 quantized MobileNetV3 file has no SE-gate observer. torchvision's
modules carry `_version` load hooks (FeaturePyramidNetwork, RPNHead, QuantizableSqueezeExcitation)
that rename or fill such keys when the file's `_metadata` says an older version, or has none. So
the file goes through `load_state_dict` as torchvision's builders do (its `_metadata` kept), and the
strict report of what is missing, unexpected or of another shape is made from what the hooks left.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from engine import checkpoint


def _report(source: str, target: str, n_own: int, n_file: int, missing: list[str], unexpected: list[str],
            shapes: list[str]) -> str | None:
    if not (missing or unexpected or shapes):
        return None

    def block(title: str, items: list[str]) -> str:
        more = f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {k}" for k in items[:10]) + more

    parts = [f"{source}: the weights do not fit {target} "
             f"({n_own} tensors in the model, {n_file} in the file)"]
    if missing:
        parts.append(block("missing from the file", missing))
    if unexpected:
        parts.append(block("unexpected in the file", unexpected))
    if shapes:
        parts.append(block("shape differences", shapes))
    parts.append("  (is this a checkpoint for another architecture, width, num_classes or variant?)")
    return "\n".join(parts)


def _shape_differences(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    return [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in own if k in state and state[k].shape != own[k].shape]


def mismatch_report(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str,
                    target: str) -> str | None:
    """None when `state` fits the model state `own` key for key, else a readable list of the differences
    (no load hooks involved: for files in today's layout; `fit` applies the hooks)."""
    return _report(source, target, len(own), len(state), [k for k in own if k not in state],
                   [k for k in state if k not in own], _shape_differences(own, state))


def fit(model: nn.Module, state: dict[str, torch.Tensor], source: str,
        target: str | None = None) -> nn.Module:
    """Load `state` strictly into `model` through the modules' own load hooks; on any misfit raise one
    ValueError naming `source` and the keys, leaving `model` untouched.

    The hooks see the file's `_metadata` (absent: version None, the oldest layout), exactly as in
    torchvision's `model.load_state_dict(weights.get_state_dict())`.
    """
    target = target or type(model).__name__
    own = model.state_dict()
    shapes = _shape_differences(own, state)  # under names that need no renaming
    if not shapes:
        probe = copy.deepcopy(model)  # misfits must not leave `model` half-loaded
        try:
            result = probe.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # a shape difference under a key a load hook renamed
            shapes = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line] or [str(exc)]
        else:
            problem = _report(source, target, len(own), len(state), list(result.missing_keys),
                              list(result.unexpected_keys), [])
            if problem:
                raise ValueError(problem)
            model.load_state_dict(state, strict=True)
            return model
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    raise ValueError(_report(source, target, len(own), len(state), missing, unexpected, shapes))


def read_state(path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The state dict `key` of a project checkpoint, or a plain state dict file, with its `_metadata`
    (the module versions the load hooks read) and without DistributedDataParallel's "module." prefix."""
    ckpt = checkpoint.load(path)
    if key not in ckpt:
        raise KeyError(f"{path}: has no {key!r} weights (it has: {', '.join(k for k in ckpt if k.startswith('model'))})")
    state = ckpt[key]
    out = OrderedDict((k.removeprefix("module."), v) for k, v in state.items())
    meta = getattr(state, "_metadata", None)
    if meta is not None:
        out._metadata = OrderedDict(("" if k == "module" else k.removeprefix("module."), v)
                                    for k, v in meta.items())
    return out


def load_weights(model: nn.Module, path: str | Path, key: str = "model") -> nn.Module:
    """Load `path` (torchvision state dict, in any layout torchvision's load hooks read, or project
    checkpoint) strictly into `model`.

    key: which weights of a project checkpoint to load ("model" or "model_ema").
    """
    return fit(model, read_state(path, key), str(path))


def load_backbone_weights(backbone: nn.Module, path: str | Path, key: str = "model") -> nn.Module:
    """Load ImageNet weights into a detection/segmentation backbone (a MobileNetV3).

    Takes torchvision's ImageNet state dict file or a classification checkpoint of this project (its
    `model`, or `model_ema` with key="model_ema"). The classifier head (`classifier.*`) is ignored on
    both sides: a backbone needs the features only, and a toy checkpoint's head has another class
    count. Every other key must fit exactly; anything else is an error that names the keys.
    """
    state = read_state(path, key)
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("classifier.")}
    # FrozenBatchNorm2d keeps no num_batches_tracked: ignore the file's where the backbone has none.
    state = {k: v for k, v in state.items()
             if not k.startswith("classifier.") and (k in own or not k.endswith("num_batches_tracked"))}
    problem = mismatch_report(own, state, str(path), f"the {type(backbone).__name__} backbone (classifier ignored)")
    if problem:
        raise ValueError(problem)
    backbone.load_state_dict(state, strict=False)
    return backbone
