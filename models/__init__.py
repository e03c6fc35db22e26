"""Model registry: `build(name, **kwargs)`; names are torchvision's builder names."""

from __future__ import annotations

from typing import Callable

from torch import nn

from models.detection import fasterrcnn_mobilenet_v3_large_320_fpn, fasterrcnn_mobilenet_v3_large_fpn
from models.flops import count_detector_mult_adds, count_mult_adds
from models.mobilenetv3 import MobileNetV3, mobilenet_v3_large, mobilenet_v3_small
from models.quantizable import quantizable_mobilenet_v3_large
from models.segmentation import deeplabv3_mobilenet_v3_large, fcn_mobilenet_v3_large, lraspp_mobilenet_v3_large
from models.weights import load_backbone_weights, load_weights

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v3_large": mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet_v3_small,
    "quantizable_mobilenet_v3_large": quantizable_mobilenet_v3_large,
    "fasterrcnn_mobilenet_v3_large_fpn": fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": fasterrcnn_mobilenet_v3_large_320_fpn,
    "lraspp_mobilenet_v3_large": lraspp_mobilenet_v3_large,
    "deeplabv3_mobilenet_v3_large": deeplabv3_mobilenet_v3_large,
    "fcn_mobilenet_v3_large": fcn_mobilenet_v3_large,
}


def build(name: str, **kwargs) -> nn.Module:
    try:
        builder = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}") from None
    return builder(**kwargs)


__all__ = ["MODELS", "MobileNetV3", "build", "count_detector_mult_adds", "count_mult_adds", "load_backbone_weights", "load_weights"]
