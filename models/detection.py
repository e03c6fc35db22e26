"""Faster R-CNN + FPN on this project's MobileNetV3-Large, assembled from torchvision's framework.

The FPN taps are named layers of the backbone ("block13" and "last_conv" by default, as published);
pass more names (e.g. ("block7", "block13", "last_conv")) to tap more stages. Trainable layers
count stages from the top, as torchvision does: 6 stages start at stem, block2, block4, block7,
block13 and last_conv, and trainable_layers=3 trains from block7 on.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from models.mobilenetv3 import MobileNetV3
from models.weights import load_backbone_weights

DEFAULT_TAPS = ("block13", "last_conv")


def mobilenet_fpn_backbone(backbone: MobileNetV3, taps: tuple[str, ...], trainable_layers: int,
                           out_channels: int = 256) -> BackboneWithFPN:
    stages = [backbone.layer_index(n) for n in backbone.stage_names]
    if not 0 <= trainable_layers <= len(stages):
        raise ValueError(f"trainable_layers must be in [0, {len(stages)}], got {trainable_layers}")
    features = backbone.features
    freeze_before = len(features) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    for layer in features[:freeze_before]:
        layer.requires_grad_(False)
    indices = [backbone.layer_index(t) for t in taps]
    if indices != sorted(set(indices)):
        raise ValueError(f"FPN taps must be distinct and in network order, got {taps}")
    return_layers = {str(idx): str(i) for i, idx in enumerate(indices)}  # FPN levels "0", "1", ...
    in_channels = [features[idx].out_channels for idx in indices]
    return BackboneWithFPN(features, return_layers, in_channels, out_channels, extra_blocks=LastLevelMaxPool())


def _fasterrcnn(num_classes: int, backbone_weights: str | Path | None, trainable_layers: int | None,
                frozen_bn: bool | None, taps: tuple[str, ...], anchor_sizes: tuple[int, ...],
                aspect_ratios: tuple[float, ...], **kwargs) -> FasterRCNN:
    pretrained = backbone_weights is not None
    frozen_bn = pretrained if frozen_bn is None else frozen_bn
    # torchvision trains every stage when the backbone starts from scratch, the top 3 otherwise.
    trainable_layers = (3 if pretrained else 6) if trainable_layers is None else trainable_layers
    # torchvision's detectors pass their own norm layer to the backbone: FrozenBatchNorm2d, or plain
    # BatchNorm2d when not frozen; both with PyTorch's eps 1e-5 (not the classifier's 0.001).
    backbone = MobileNetV3("large", dilated=False, norm_layer=FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d)
    if pretrained:
        load_backbone_weights(backbone, backbone_weights)
    fpn = mobilenet_fpn_backbone(backbone, tuple(taps), trainable_layers)
    n_levels = len(taps) + 1  # + the max-pool level
    anchors = AnchorGenerator((tuple(anchor_sizes),) * n_levels, (tuple(aspect_ratios),) * n_levels)
    return FasterRCNN(fpn, num_classes, rpn_anchor_generator=anchors, **kwargs)


def fasterrcnn_mobilenet_v3_large_fpn(num_classes: int = 91, *, backbone_weights=None, trainable_layers=None,
                                      frozen_bn=None, taps=DEFAULT_TAPS, anchor_sizes=(32, 64, 128, 256, 512),
                                      aspect_ratios=(0.5, 1.0, 2.0), min_size=800, max_size=1333,
                                      rpn_score_thresh=0.05, rpn_pre_nms_top_n_test=1000,
                                      rpn_post_nms_top_n_test=1000, **kwargs) -> FasterRCNN:
    return _fasterrcnn(num_classes, backbone_weights, trainable_layers, frozen_bn, taps, anchor_sizes,
                       aspect_ratios, min_size=min_size, max_size=max_size, rpn_score_thresh=rpn_score_thresh,
                       rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
                       rpn_post_nms_top_n_test=rpn_post_nms_top_n_test, **kwargs)


def fasterrcnn_mobilenet_v3_large_320_fpn(num_classes: int = 91, **kwargs) -> FasterRCNN:
    """Low-res: 320-640 px and test-time RPN pre/post-NMS top-n 150 (train keeps 2000/2000)."""
    defaults = dict(min_size=320, max_size=640, rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=150)
    return fasterrcnn_mobilenet_v3_large_fpn(num_classes, **{**defaults, **kwargs})


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
