"""Oracles with signal: random, non-degenerate weights and a comparison relative to the reference.

Comparing our model with torchvision's at torchvision's initialisation proves little: in eval mode,
with BatchNorm statistics at mean 0 / var 1 and classifier weights ~N(0, 0.01), MobileNetV3's
logits are about 1e-9, and `assert_close(..., atol=1e-5)` passes with a wrong activation in a
whole block. So every comparison against torchvision goes:

    ref = randomize(torchvision_model, seed, inputs=x)     # the reference, randomized
    ours.load_state_dict(ref.state_dict(), strict=True)    # the SAME state in our model
    assert_close(ours(x), ref(x))                          # asserts signal, then relative error

Both models then run the same operations on the same numbers, so the outputs agree to float
rounding (today bit for bit); a wrong activation, gate, kernel, stride, tap or eps moves them by
more than 10% of their scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

NORMS = (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d)
PRE_NORM_SCALE = 0.3  # convolutions feeding a norm layer, when calibrating (see `randomize`)


@torch.no_grad()
def randomize(model: nn.Module, seed: int, inputs=None) -> nn.Module:
    """Give every parameter and every BatchNorm running_mean/running_var of `model` a random value.

    Weights of convolutions and linears ~ N(0, 2 / fan_in) (He: a layer and its half-linear
    activation keep the second moment), biases ~ U(-0.1, 0.1); norm layers: weight ~ U(0.5, 1.5),
    bias ~ U(-0.25, 0.25), running_mean ~ U(-0.25, 0.25), running_var ~ U(0.5, 2); any other
    parameter ~ U(-0.5, 0.5). Integer buffers (num_batches_tracked) and quantization observers are
    left alone.

    inputs: with an example input (a tensor, or a list for detection models), the statistics are
    then calibrated in one eval-mode forward pass: each norm layer, as it is reached, gets
    running_mean = batch mean + U(-0.5, 0.5) x batch std and running_var = batch var x U(0.5, 2),
    so every normalized activation is ~ weight x N(0, 1) + bias: O(1) at any depth, inside the
    non-linear range of hardswish/hardsigmoid (random statistics alone let a deep residual net's
    activations grow to ~30, where hardswish is just relu). Convolutions that feed a norm layer are
    first scaled by PRE_NORM_SCALE, so the norm's input variance is ~0.01-0.5: near enough to eps
    that it changes the output by percents (eps 1e-3 vs 1e-5 is caught).
    Deterministic in `seed`, the module order and `inputs`; returns the model.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(shape, lo=0.0, hi=1.0) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * math.sqrt(2.0 / w[0].numel()))
            done.add(id(w))
            if module.bias is not None:
                module.bias.copy_(rand(module.bias.shape, -0.1, 0.1))
                done.add(id(module.bias))
        elif isinstance(module, NORMS):
            if getattr(module, "weight", None) is not None:  # parameters, or FrozenBatchNorm2d's buffers
                module.weight.copy_(rand(module.weight.shape, 0.5, 1.5))
                module.bias.copy_(rand(module.bias.shape, -0.25, 0.25))
                done.update((id(module.weight), id(module.bias)))
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(rand(module.running_mean.shape, -0.25, 0.25))
                module.running_var.copy_(rand(module.running_var.shape, 0.5, 2.0))
    for p in model.parameters():
        if id(p) not in done:
            p.copy_(rand(p.shape, -0.5, 0.5))
    if inputs is not None:
        _calibrate(model, inputs, g)
    return model


def _pre_norm_convs(model: nn.Module) -> list[nn.Module]:
    """Convolutions whose output goes straight into a norm layer (next sibling, or a fused `.bn`)."""
    found = []
    for module in model.modules():
        children = list(module.children())
        found += [c for c, nxt in zip(children, children[1:])
                  if isinstance(c, nn.Conv2d) and isinstance(nxt, NORMS)]
        if isinstance(module, nn.Conv2d) and isinstance(getattr(module, "bn", None), NORMS):
            found.append(module)
    return found


def _calibrate(model: nn.Module, inputs, g: torch.Generator) -> None:
    for conv in _pre_norm_convs(model):
        conv.weight.mul_(PRE_NORM_SCALE)
    seen: set[int] = set()

    def hook(norm, args):
        if id(norm) in seen or getattr(norm, "running_mean", None) is None:
            return
        seen.add(id(norm))
        x = args[0].detach().double()
        dims = [0] + list(range(2, x.ndim))
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        shift = torch.rand(mean.shape, generator=g, dtype=torch.float64) - 0.5
        factor = 0.5 + 1.5 * torch.rand(var.shape, generator=g, dtype=torch.float64)
        norm.running_mean.copy_(mean + shift * var.sqrt())
        norm.running_var.copy_(var.clamp_min(1e-6) * factor)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, NORMS)]
    was_training = model.training
    try:
        model.eval()
        model(inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def assert_close(ours, ref, rtol: float = 1e-4, min_scale: float = 1e-2, msg: str = "") -> None:
    """max |ours - ref| <= rtol x max |ref|, after asserting that `ref` carries signal.

    rtol 1e-4: float32 rounding through these nets, measured against float64 or channels_last, is
    <= 3e-5 of the scale (randomized MobileNetV3s and segmentation heads); every mutation tried (a
    wrong activation, gate, kernel, stride, tap, eps, momentum) moves the output by >= 1e-1.

    Signal: the reference's largest magnitude is above `min_scale` and it is not constant (std
    above 1% of that magnitude), so the comparison cannot pass by both sides being ~0 or flat.
    """
    ours, ref = torch.as_tensor(ours).detach().double(), torch.as_tensor(ref).detach().double()
    assert ours.shape == ref.shape, f"{msg}: shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{msg}: the reference has non-finite values"
    scale = ref.abs().max().item()
    assert scale > min_scale, f"{msg}: degenerate reference, max |ref| = {scale:.3g} <= {min_scale}"
    if ref.numel() > 1:
        spread = ref.std().item()
        assert spread > 0.01 * scale, f"{msg}: degenerate reference, std {spread:.3g}, max |ref| {scale:.3g}"
    err = (ours - ref).abs().max().item()
    assert err <= rtol * scale, f"{msg}: max |ours - ref| = {err:.3g} > {rtol} x reference scale {scale:.3g}"
