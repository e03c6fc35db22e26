"""MobileNetV3-Large and -Small as data: one table of named rows per variant.

The module tree and state-dict keys are torchvision's (`features.N.block.M...`, `classifier.N...`),
so every published torchvision checkpoint loads strictly. The building blocks are torchvision's own
(Conv2dNormActivation, SqueezeExcitation, StochasticDepth); what is ours is the table, the stage
names used for feature taps, and stochastic depth (torchvision's MobileNetV3 has none).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

Act = Literal["relu", "hswish"]
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "hswish": nn.Hardswish}


@dataclasses.dataclass(frozen=True)
class Block:
    """One inverted-residual row of Tables 1-2 of the MobileNetV3 paper (channels at width 1.0).

    tail: one of the last three blocks, which `reduced_tail` narrows and `dilated` dilates.
    """

    kernel: int
    expanded: int
    out: int
    se: bool
    act: Act
    stride: int
    tail: bool = False


LARGE = (
    Block(kernel=3, expanded=16, out=16, se=False, act="relu", stride=1),     # block1
    Block(kernel=3, expanded=64, out=24, se=False, act="relu", stride=2),     # block2   OS 4
    Block(kernel=3, expanded=72, out=24, se=False, act="relu", stride=1),
    Block(kernel=5, expanded=72, out=40, se=True, act="relu", stride=2),      # block4   OS 8
    Block(kernel=5, expanded=120, out=40, se=True, act="relu", stride=1),
    Block(kernel=5, expanded=120, out=40, se=True, act="relu", stride=1),
    Block(kernel=3, expanded=240, out=80, se=False, act="hswish", stride=2),  # block7   OS 16
    Block(kernel=3, expanded=200, out=80, se=False, act="hswish", stride=1),
    Block(kernel=3, expanded=184, out=80, se=False, act="hswish", stride=1),
    Block(kernel=3, expanded=184, out=80, se=False, act="hswish", stride=1),
    Block(kernel=3, expanded=480, out=112, se=True, act="hswish", stride=1),
    Block(kernel=3, expanded=672, out=112, se=True, act="hswish", stride=1),
    Block(kernel=5, expanded=672, out=160, se=True, act="hswish", stride=2, tail=True),  # block13 OS 32
    Block(kernel=5, expanded=960, out=160, se=True, act="hswish", stride=1, tail=True),
    Block(kernel=5, expanded=960, out=160, se=True, act="hswish", stride=1, tail=True),
)
SMALL = (
    Block(kernel=3, expanded=16, out=16, se=True, act="relu", stride=2),      # block1   OS 4
    Block(kernel=3, expanded=72, out=24, se=False, act="relu", stride=2),     # block2   OS 8
    Block(kernel=3, expanded=88, out=24, se=False, act="relu", stride=1),
    Block(kernel=5, expanded=96, out=40, se=True, act="hswish", stride=2),    # block4   OS 16
    Block(kernel=5, expanded=240, out=40, se=True, act="hswish", stride=1),
    Block(kernel=5, expanded=240, out=40, se=True, act="hswish", stride=1),
    Block(kernel=5, expanded=120, out=48, se=True, act="hswish", stride=1),
    Block(kernel=5, expanded=144, out=48, se=True, act="hswish", stride=1),
    Block(kernel=5, expanded=288, out=96, se=True, act="hswish", stride=2, tail=True),  # block9 OS 32
    Block(kernel=5, expanded=576, out=96, se=True, act="hswish", stride=1, tail=True),
    Block(kernel=5, expanded=576, out=96, se=True, act="hswish", stride=1, tail=True),
)
STEM_CHANNELS = 16
LAST_CHANNELS = {"large": 1280, "small": 1024}  # width of the classifier's hidden Linear
TABLES = {"large": LARGE, "small": SMALL}


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor`, never more than 10% down (TF-slim's rule, as torchvision)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


@dataclasses.dataclass(frozen=True)
class ResolvedBlock:
    """A table row with width, tail reduction and dilation applied."""

    inp: int
    kernel: int
    expanded: int
    out: int
    se: bool
    act: Act
    stride: int
    dilation: int


def resolve(table: tuple[Block, ...], width_mult: float = 1.0, reduced_tail: bool = False,
            dilated: bool = False) -> list[ResolvedBlock]:
    """Apply width_mult (multiples of 8), reduced_tail and dilation to a table.

    reduced_tail halves every channel count produced inside the tail: each tail block's output,
    and the expansion of tail blocks fed by a tail block (the first tail block expands its
    full-width input, so its expansion stays), exactly as torchvision's config does.
    """
    rows, inp, prev_tail = [], make_divisible(STEM_CHANNELS * width_mult), False
    for b in table:
        div = 2 if (reduced_tail and b.tail) else 1
        exp_div = div if prev_tail else 1
        out = make_divisible(b.out // div * width_mult)
        rows.append(ResolvedBlock(inp=inp, kernel=b.kernel, expanded=make_divisible(b.expanded // exp_div * width_mult),
                                  out=out, se=b.se, act=b.act, stride=b.stride,
                                  dilation=2 if (dilated and b.tail) else 1))
        inp, prev_tail = out, b.tail
    return rows


class InvertedResidual(nn.Module):
    """Expand (skipped when expanded == input) -> depthwise -> act -> SE -> project (always)."""

    def __init__(self, cnf: ResolvedBlock, norm_layer: Callable[..., nn.Module],
                 se_layer: Callable[..., nn.Module] = partial(SqueezeExcitation, scale_activation=nn.Hardsigmoid),
                 drop_prob: float = 0.0):
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.inp == cnf.out
        act = ACTIVATIONS[cnf.act]
        layers: list[nn.Module] = []
        if cnf.expanded != cnf.inp:
            layers.append(Conv2dNormActivation(cnf.inp, cnf.expanded, kernel_size=1, norm_layer=norm_layer,
                                               activation_layer=act))
        layers.append(Conv2dNormActivation(
            cnf.expanded, cnf.expanded, kernel_size=cnf.kernel, stride=1 if cnf.dilation > 1 else cnf.stride,
            dilation=cnf.dilation, groups=cnf.expanded, norm_layer=norm_layer, activation_layer=act))
        if cnf.se:
            layers.append(se_layer(cnf.expanded, make_divisible(cnf.expanded // 4)))
        layers.append(Conv2dNormActivation(cnf.expanded, cnf.out, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out
        # Only residual branches can be dropped; the module has no state, so keys stay torchvision's.
        self.stochastic_depth = StochasticDepth(drop_prob, "row") if (drop_prob > 0 and self.use_res_connect) else None

    def forward(self, x: Tensor) -> Tensor:
        result = self.block(x)
        if self.use_res_connect:
            if self.stochastic_depth is not None:
                result = self.stochastic_depth(result)
            result += x
        return result


class MobileNetV3(nn.Module):
    def __init__(self, variant: Literal["large", "small"], num_classes: int = 1000, width_mult: float = 1.0,
                 reduced_tail: bool = False, dilated: bool = False, dropout: float = 0.2,
                 stochastic_depth: float = 0.0, norm_layer: Callable[..., nn.Module] | None = None,
                 block: type[InvertedResidual] = InvertedResidual, **block_kwargs):
        super().__init__()
        if variant not in TABLES:
            raise ValueError(f"unknown MobileNetV3 variant {variant!r}: expected one of {sorted(TABLES)}")
        if not 0.0 <= stochastic_depth < 1.0:
            raise ValueError(f"stochastic_depth must be in [0, 1), got {stochastic_depth}")
        norm_layer = norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        rows = resolve(TABLES[variant], width_mult, reduced_tail, dilated)
        self.blocks = rows
        n = len(rows)
        layers: list[nn.Module] = [Conv2dNormActivation(3, rows[0].inp, kernel_size=3, stride=2,
                                                        norm_layer=norm_layer, activation_layer=nn.Hardswish)]
        # Drop probability grows linearly with depth and reaches `stochastic_depth` at the last block.
        layers += [block(cnf, norm_layer, drop_prob=stochastic_depth * (i + 1) / n, **block_kwargs)
                   for i, cnf in enumerate(rows)]
        last_in = rows[-1].out
        last_out = 6 * last_in  # the last conv expands x6, for every width
        layers.append(Conv2dNormActivation(last_in, last_out, kernel_size=1, norm_layer=norm_layer,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        hidden = make_divisible(LAST_CHANNELS[variant] // (2 if reduced_tail else 1) * width_mult)
        self.classifier = nn.Sequential(
            nn.Linear(last_out, hidden), nn.Hardswish(inplace=True), nn.Dropout(p=dropout, inplace=True),
            nn.Linear(hidden, num_classes))
        # Stage starts (the stem, every block that reduces resolution, the last conv), by name.
        self.stage_names = ["stem"] + [f"block{i + 1}" for i, r in enumerate(rows) if r.stride > 1] + ["last_conv"]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def layer_index(self, name: str) -> int:
        """`features` index of a named layer: "stem", "block1".."blockN", "last_conv"."""
        names = ["stem"] + [f"block{i + 1}" for i in range(len(self.blocks))] + ["last_conv"]
        if name not in names:
            raise KeyError(f"no layer named {name!r} in this MobileNetV3: expected one of {', '.join(names)}")
        return names.index(name)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v3_large(**kwargs) -> MobileNetV3:
    return MobileNetV3("large", **kwargs)


def mobilenet_v3_small(**kwargs) -> MobileNetV3:
    return MobileNetV3("small", **kwargs)
