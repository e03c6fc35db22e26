"""Load torchvision-format state dicts and project checkpoints into a model, with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine import checkpoint


def mismatch_report(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str,
                    target: str) -> str | None:
    """None when `state` fits the model state `own` strictly, else a readable list of the differences."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return None

    def block(title: str, items: list[str]) -> str:
        more = f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {k}" for k in items[:10]) + more

    parts = [f"{source}: the weights do not fit {target} "
             f"({len(own)} tensors in the model, {len(state)} in the file)"]
    if missing:
        parts.append(block("missing from the file", missing))
    if unexpected:
        parts.append(block("unexpected in the file", unexpected))
    if shapes:
        parts.append(block("shape differences", shapes))
    parts.append("  (is this a checkpoint for another architecture, width, num_classes or variant?)")
    return "\n".join(parts)


def _read(path: str | Path, key: str) -> dict[str, torch.Tensor]:
    ckpt = checkpoint.load(path)
    if key not in ckpt:
        raise KeyError(f"{path}: has no {key!r} weights (it has: {', '.join(k for k in ckpt if k.startswith('model'))})")
    return {k.removeprefix("module."): v for k, v in ckpt[key].items()}


def load_weights(model: nn.Module, path: str | Path, key: str = "model") -> nn.Module:
    """Load `path` (torchvision state dict or project checkpoint) strictly into `model`.

    key: which weights of a project checkpoint to load ("model" or "model_ema").
    """
    state = _read(path, key)
    problem = mismatch_report(model.state_dict(), state, str(path), type(model).__name__)
    if problem:
        raise ValueError(problem)
    model.load_state_dict(state, strict=True)
    return model



def load_backbone_weights(backbone: nn.Module, path: str | Path, key: str = "model") -> nn.Module:
    """Load ImageNet weights into a detection/segmentation backbone (a MobileNetV3).

    Takes torchvision's ImageNet state dict file or a classification checkpoint of this project (its
    `model`, or `model_ema` with key="model_ema"). The classifier head (`classifier.*`) is ignored on
    both sides: a backbone needs the features only, and a toy checkpoint's head has another class
    count. Every other key must fit exactly; anything else is an error that names the keys.
    """
    state = _read(path, key)
    own = {k: v for k, v in backbone.state_dict().items() if not k.startswith("classifier.")}
    # FrozenBatchNorm2d keeps no num_batches_tracked: ignore the file's where the backbone has none.
    state = {k: v for k, v in state.items()
             if not k.startswith("classifier.") and (k in own or not k.endswith("num_batches_tracked"))}
    problem = mismatch_report(own, state, str(path), f"the {type(backbone).__name__} backbone (classifier ignored)")
    if problem:
        raise ValueError(problem)
    backbone.load_state_dict(state, strict=False)
    return backbone
