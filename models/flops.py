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


@torch.no_grad()
def detector_mult_adds_breakdown(model: nn.Module, size: int, proposals: tuple[int, int] = (100, 150)
                                 ) -> tuple[int, float]:
    """(fixed mult-adds of backbone + FPN + RPN, mult-adds per proposal of the box head) at size x size.

    Measured at two proposal counts and solved for the line. torchvision's published detector figures
    (4.494 at 800 px, 0.719 at 320 px) are the fixed part alone: the count with no proposal reaching
    the box head.
    """
    rpn = model.rpn
    saved = dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n)
    points = []
    try:
        for n in proposals:
            rpn._pre_nms_top_n["testing"] = max(n, saved[0]["testing"])
            rpn._post_nms_top_n["testing"] = n
            points.append(count_detector_mult_adds(model, torch.rand(3, size, size, generator=torch.Generator()
                                                                     .manual_seed(0)))[::-1])
    finally:
        rpn._pre_nms_top_n, rpn._post_nms_top_n = saved
    (p1, m1), (p2, m2) = points
    per = (m2 - m1) / (p2 - p1)
    return round(m1 - per * p1), per
