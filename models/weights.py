"""Load torchvision-format state dicts and project checkpoints into a model, with clear errors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from engine import checkpoint


def mismatch_report(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> str | None:
    """None when `state` fits `model` strictly, else a readable list of the differences."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if not (missing or unexpected or shapes):
        return None

    def block(title: str, items: list[str]) -> str:
        more = f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""
        return f"  {title} ({len(items)}):\n" + "\n".join(f"    {k}" for k in items[:10]) + more

    parts = [f"{source}: the weights do not fit {type(model).__name__} "
             f"({len(own)} tensors in the model, {len(state)} in the file)"]
    if missing:
        parts.append(block("missing from the file", missing))
    if unexpected:
        parts.append(block("unexpected in the file", unexpected))
    if shapes:
        parts.append(block("shape differences", shapes))
    parts.append("  (is this a checkpoint for another architecture, width, num_classes or variant?)")
    return "\n".join(parts)


def load_weights(model: nn.Module, path: str | Path, key: str = "model") -> nn.Module:
    """Load `path` (torchvision state dict or project checkpoint) strictly into `model`.

    key: which weights of a project checkpoint to load ("model" or "model_ema").
    """
    ckpt = checkpoint.load(path)
    if key not in ckpt:
        raise KeyError(f"{path}: has no {key!r} weights (it has: {', '.join(k for k in ckpt if k.startswith('model'))})")
    state = {k.removeprefix("module."): v for k, v in ckpt[key].items()}
    problem = mismatch_report(model, state, str(path))
    if problem:
        raise ValueError(problem)
    model.load_state_dict(state, strict=True)
    return model
