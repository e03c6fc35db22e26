"""Mult-add counts with torch's own FlopCounterMode (convolutions, matmuls; one mult-add = 2 FLOPs).

torchvision's published "GFLOPS" are multiply-accumulates of convs and linears, which is exactly
what FlopCounterMode counts divided by two; elementwise ops (activations, SE gating, additions,
pooling, interpolation) are not counted, by either.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def count_mult_adds(model: nn.Module, inputs) -> int:
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(inputs)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_detector_mult_adds(model: nn.Module, image: torch.Tensor) -> tuple[int, int]:
    """(mult-adds, proposals per image) for one image: the box head's cost scales with the proposals
    the RPN keeps, so the count is only meaningful next to that number."""
    kept: list[int] = []
    hook = model.rpn.register_forward_hook(lambda m, i, out: kept.append(len(out[0][0])))
    try:
        macs = count_mult_adds(model, [image])
    finally:
        hook.remove()
    return macs, kept[0]
