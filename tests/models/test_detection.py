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
from tests.oracle import assert_close, randomize

TV = {"fasterrcnn_mobilenet_v3_large_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
      "fasterrcnn_mobilenet_v3_large_320_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn}


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 200, 260, generator=g), torch.rand(3, 240, 180, generator=g)]


def _targets():
    return [{"boxes": torch.tensor([[10.0, 20.0, 120.0, 150.0], [60.0, 30.0, 250.0, 190.0]]),
             "labels": torch.tensor([1, 18])},
            {"boxes": torch.tensor([[5.0, 5.0, 90.0, 200.0]]), "labels": torch.tensor([3])}]


def _compare(ours, ref, seed=0):
    """Same keys/shapes; then at random weights and BN statistics (the same in both) the same boxes,
    scores and labels in eval mode, and the same losses in train mode (same RNG for the samplers)."""
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    ours.eval(), ref.eval()
    images = _images()
    randomize(ref, seed, inputs=images)
    ours.load_state_dict(ref.state_dict(), strict=True)
    with torch.no_grad():
        out_a, out_b = ours(images), ref(images)
    for i, (da, db) in enumerate(zip(out_a, out_b)):
        assert len(db["boxes"]) >= 20 and len(db["labels"].unique()) > 3, "degenerate reference detections"
        # As tight as this comparison always was (boxes within 1e-4 px, scores within 1e-5): the
        # detector is torchvision's own around our backbone, and the numbers agree bit for bit.
        # (A numerically different backbone path, e.g. channels_last, reorders near-tied detections
        # anyway: detection outputs cannot be compared with a rounding-size tolerance.)
        assert_close(da["boxes"], db["boxes"], rtol=3e-7, min_scale=10.0, msg=f"image {i} boxes")
        assert_close(da["scores"], db["scores"], rtol=1e-5, min_scale=1e-3, msg=f"image {i} scores")
        assert torch.equal(da["labels"], db["labels"])
    ours.train(), ref.train()
    losses = []
    for m in (ours, ref):
        torch.manual_seed(seed)
        losses.append(m(_images(), _targets()))
    assert sorted(losses[0]) == sorted(losses[1]) == ["loss_box_reg", "loss_classifier", "loss_objectness",
                                                      "loss_rpn_box_reg"]
    for k in losses[1]:
        assert_close(losses[0][k], losses[1][k], min_scale=1e-3, msg=k)


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
