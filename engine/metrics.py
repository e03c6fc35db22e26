"""Classification metrics as counts, so they reduce exactly across ranks."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a float64 tensor)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]).to(torch.float64)
