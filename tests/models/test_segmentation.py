import pytest
import torch
import torchvision.models.segmentation as tvseg
from torchvision.models.segmentation.fcn import FCN, FCNHead
from torchvision.models._utils import IntermediateLayerGetter
import torchvision

from models import build, count_mult_adds
from tests.oracle import assert_close, randomize


def _fcn_reference(aux: bool):
    """torchvision never released FCN-MobileNetV3; assemble it from torchvision's parts the same way
    it assembles DeepLabV3 (features[16] out, features[4] aux)."""
    backbone = torchvision.models.mobilenet_v3_large(dilated=True).features
    layers = {"16": "out", "4": "aux"} if aux else {"16": "out"}
    return FCN(IntermediateLayerGetter(backbone, layers), FCNHead(960, 21), FCNHead(40, 21) if aux else None)


CASES = [
    ("lraspp_mobilenet_v3_large", {}, lambda: tvseg.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)),
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": True},
     lambda: tvseg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True)),
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": False},
     lambda: tvseg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=False)),
    ("fcn_mobilenet_v3_large", {"aux_loss": True}, lambda: _fcn_reference(True)),
]


@pytest.mark.parametrize("name,kw,ref_fn", CASES)
def test_matches_torchvision(name, kw, ref_fn):
    """Same keys/shapes; at random weights and BN statistics (the same in both) the same `out` (and
    `aux`) in eval mode, and in train mode (batch statistics, dropout with the same RNG)."""
    ours, ref = build(name, **kw).eval(), ref_fn().eval()
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(0))
    randomize(ref, 0, inputs=x)
    ours.load_state_dict(ref.state_dict(), strict=True)
    for mode in ("eval", "train"):
        ours.train(mode == "train"), ref.train(mode == "train")
        with torch.no_grad():
            torch.manual_seed(1)
            out_a = ours(x)
            torch.manual_seed(1)
            out_b = ref(x)
        assert sorted(out_a) == sorted(out_b)
        for k in out_b:
            assert out_a[k].shape[-2:] == x.shape[-2:]
            assert_close(out_a[k], out_b[k], msg=f"{name} {mode} {k}")


@pytest.mark.parametrize("name,kw,params,gflops", [
    ("lraspp_mobilenet_v3_large", {}, 3_221_538, 2.086),
    ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}, 11_029_328, 10.452),
])
def test_published_params_and_mult_adds(name, kw, params, gflops):
    m = build(name, **kw)
    assert sum(p.numel() for p in m.parameters()) == params
    assert round(count_mult_adds(m, torch.randn(1, 3, 520, 520)) / 1e9, 3) == gflops


def test_fcn_parameter_count_near_blog():
    m = build("fcn_mobilenet_v3_large", aux_loss=True)
    n = sum(p.numel() for p in m.parameters())
    assert n == 5_054_944 and round(n / 1e6, 2) == 5.05  # the blog's "5.05 M"


def test_backbone_is_dilated_output_stride_16():
    m = build("lraspp_mobilenet_v3_large")
    feats = m.backbone(torch.randn(1, 3, 224, 224))
    assert feats["low"].shape[-1] == 28 and feats["high"].shape[-1] == 14
