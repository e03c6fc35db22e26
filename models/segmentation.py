"""LR-ASPP, DeepLabV3 and FCN heads (torchvision's) on a dilated MobileNetV3-Large (output stride 16).

Taps are named layers of the backbone: the low/aux feature is "block4" (40 ch, OS 8), the high/out
feature "last_conv" (960 ch, OS 16), as published.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.models.segmentation.lraspp import LRASPP

from models.mobilenetv3 import MobileNetV3
from models.weights import load_backbone_weights


def _dilated_backbone(backbone_weights: str | Path | None) -> MobileNetV3:
    backbone = MobileNetV3("large", dilated=True)
    if backbone_weights is not None:  # ImageNet weights of the non-dilated model fit: dilation has no weights
        load_backbone_weights(backbone, backbone_weights)
    return backbone


def _getter(backbone: MobileNetV3, taps: dict[str, str]) -> tuple[IntermediateLayerGetter, dict[str, int]]:
    idx = {out: backbone.layer_index(name) for name, out in taps.items()}
    channels = {out: backbone.features[i].out_channels for out, i in idx.items()}
    return IntermediateLayerGetter(backbone.features, {str(i): out for out, i in idx.items()}), channels


def lraspp_mobilenet_v3_large(num_classes: int = 21, *, backbone_weights=None, low: str = "block4",
                              high: str = "last_conv", inter_channels: int = 128) -> LRASPP:
    body, ch = _getter(_dilated_backbone(backbone_weights), {low: "low", high: "high"})
    return LRASPP(body, ch["low"], ch["high"], num_classes, inter_channels)


def _out_and_aux(num_classes: int, backbone_weights, aux_loss: bool, out: str, aux: str):
    """Backbone body returning "out" (and "aux"), the out channels, and the optional aux FCN head."""
    taps = {out: "out", aux: "aux"} if aux_loss else {out: "out"}
    body, ch = _getter(_dilated_backbone(backbone_weights), taps)
    return body, ch["out"], FCNHead(ch["aux"], num_classes) if aux_loss else None


def deeplabv3_mobilenet_v3_large(num_classes: int = 21, *, backbone_weights=None, aux_loss: bool = False,
                                 out: str = "last_conv", aux: str = "block4") -> DeepLabV3:
    body, out_channels, aux_head = _out_and_aux(num_classes, backbone_weights, aux_loss, out, aux)
    return DeepLabV3(body, DeepLabHead(out_channels, num_classes), aux_head)


def fcn_mobilenet_v3_large(num_classes: int = 21, *, backbone_weights=None, aux_loss: bool = False,
                           out: str = "last_conv", aux: str = "block4") -> FCN:
    """The unreleased FCN: FCNHead(960 -> 240 -> classes) on the last feature, optional aux FCNHead."""
    body, out_channels, aux_head = _out_and_aux(num_classes, backbone_weights, aux_loss, out, aux)
    return FCN(body, FCNHead(out_channels, num_classes), aux_head)
