import pytest
import torch
import torchvision
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

from models import build, count_detector_mult_adds
from models.flops import detector_mult_adds_breakdown
from models.detection import count_parameters

TV = {"fasterrcnn_mobilenet_v3_large_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
      "fasterrcnn_mobilenet_v3_large_320_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn}


def _compare(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(b, strict=True)
    ours.eval(), ref.eval()
    torch.manual_seed(0)
    images = [torch.rand(3, 200, 260), torch.rand(3, 240, 180)]
    with torch.no_grad():
        out_a, out_b = ours(images), ref(images)
    for da, db in zip(out_a, out_b):
        assert len(db["boxes"]) > 0
        torch.testing.assert_close(da["boxes"], db["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(da["scores"], db["scores"], atol=1e-5, rtol=0)
        assert torch.equal(da["labels"], db["labels"])


@pytest.mark.parametrize("name", sorted(TV))
def test_matches_torchvision(name):
    # box_score_thresh 0 so randomly initialised heads still return boxes to compare
    kw = dict(num_classes=91, box_score_thresh=0.0, min_size=224, max_size=320)
    ours = build(name, **kw)
    ref = TV[name](weights=None, weights_backbone=None, **kw)
    assert ours.rpn._pre_nms_top_n == ref.rpn._pre_nms_top_n and ours.rpn.score_thresh == 0.05
    assert ours.rpn._post_nms_top_n == ref.rpn._post_nms_top_n
    _compare(ours, ref)


def test_frozen_bn_backbone_matches_torchvision_parts_and_published_count():
    """As trained: ImageNet backbone with FrozenBatchNorm, top 3 of 6 stages trainable."""
    ours = build("fasterrcnn_mobilenet_v3_large_fpn", frozen_bn=True, trainable_layers=3,
                 box_score_thresh=0.0, min_size=224, max_size=320)
    tv_backbone = _mobilenet_extractor(torchvision.models.mobilenet_v3_large(norm_layer=FrozenBatchNorm2d), True, 3)
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    ref = FasterRCNN(tv_backbone, 91, rpn_anchor_generator=anchors, rpn_score_thresh=0.05, box_score_thresh=0.0,
                     min_size=224, max_size=320)
    assert count_parameters(ours) == 19_386_354
    trainable = lambda m: [n for n, p in m.named_parameters() if p.requires_grad]  # noqa: E731
    assert trainable(ours) == trainable(ref)
    assert not any(n.startswith(("backbone.body.0.", "backbone.body.6.")) for n in trainable(ours))
    assert any(n.startswith("backbone.body.7.") for n in trainable(ours))
    _compare(ours, ref)


def test_more_taps_and_bad_taps():
    m = build("fasterrcnn_mobilenet_v3_large_fpn", taps=("block7", "block13", "last_conv"))
    assert [b[0].in_channels for b in m.backbone.fpn.inner_blocks] == [80, 160, 960]
    with pytest.raises(KeyError, match="no layer named 'block99'"):
        build("fasterrcnn_mobilenet_v3_large_fpn", taps=("block99", "last_conv"))


def test_mult_adds_reported_with_proposals():
    m = build("fasterrcnn_mobilenet_v3_large_320_fpn")
    macs, proposals = count_detector_mult_adds(m, torch.rand(3, 320, 320))
    assert 0 < proposals <= 150 and macs > 0


@pytest.mark.parametrize("name,size,gflops", [("fasterrcnn_mobilenet_v3_large_fpn", 800, 4.494),
                                              ("fasterrcnn_mobilenet_v3_large_320_fpn", 320, 0.719)])
def test_published_detector_gflops_are_the_count_without_proposals(name, size, gflops):
    fixed, per_proposal = detector_mult_adds_breakdown(build(name), size)
    assert round(fixed / 1e9, 3) == gflops
    assert round(per_proposal / 1e6, 2) == 14.36  # TwoMLPHead 12544->1024->1024 + predictors
