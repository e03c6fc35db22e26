import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from engine import checkpoint
from models import build, load_weights
from tests.oracle import assert_close, randomize

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _same_state(ours: dict, ref: dict) -> None:
    assert list(ours) == list(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


def test_loads_torchvision_state_dict_and_project_checkpoint(tmp_path):
    ref = randomize(torchvision.models.mobilenet_v3_small(), 0, inputs=X).eval()
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    ours = load_weights(build("mobilenet_v3_small"), tmp_path / "tv.pth").eval()
    _same_state(ours.state_dict(), ref.state_dict())
    with torch.no_grad():
        assert_close(ours(X), ref(X), msg="torchvision file")
    checkpoint.save(checkpoint.new(ref.state_dict(), epoch=3), tmp_path / "ckpt.pt")
    again = load_weights(build("mobilenet_v3_small"), tmp_path / "ckpt.pt").eval()
    _same_state(again.state_dict(), ref.state_dict())
    with torch.no_grad():
        assert_close(again(X), ref(X), msg="project checkpoint")


def _tv_features(state: dict, dilated: bool, frozen: bool, taps: list[int]) -> list[torch.Tensor]:
    """torchvision's MobileNetV3-Large features with `state` (classifier dropped), outputs at `taps`."""
    norm = {"norm_layer": FrozenBatchNorm2d} if frozen else {}
    ref = torchvision.models.mobilenet_v3_large(dilated=dilated, **norm).eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert all(k.startswith("classifier.") for k in missing)
    assert all(k.endswith("num_batches_tracked") or k.startswith("classifier.") for k in unexpected)
    outs, x = [], X
    with torch.no_grad():
        for i, layer in enumerate(ref.features):
            x = layer(x)
            if i in taps:
                outs.append(x)
    return outs


def test_backbone_weights_reach_detection_and_segmentation_backbones(tmp_path):
    """ImageNet weights (a torchvision file, or a toy 10-class project checkpoint: classifier
    ignored) land in the detection backbone (frozen BN) and the dilated segmentation backbone: the
    tapped features equal torchvision's MobileNetV3-Large features with the same weights."""
    ref = randomize(torchvision.models.mobilenet_v3_large(), 0, inputs=X)
    state = ref.state_dict()
    torch.save(state, tmp_path / "tv.pth")
    toy = {k: (v[:10] if k.startswith("classifier.3.") else v) for k, v in state.items()}
    checkpoint.save(checkpoint.new(toy, epoch=1), tmp_path / "toy.pt")
    for path in (tmp_path / "tv.pth", tmp_path / "toy.pt"):
        det = build("fasterrcnn_mobilenet_v3_large_fpn", backbone_weights=path).eval()
        assert isinstance(det.backbone.body["0"][1], FrozenBatchNorm2d)
        with torch.no_grad():
            got = list(det.backbone.body(X).values())
        for i, (a, b) in enumerate(zip(got, _tv_features(state, dilated=False, frozen=True, taps=[13, 16]))):
            assert_close(a, b, msg=f"{path.name} detection tap {i}")
        seg = build("lraspp_mobilenet_v3_large", backbone_weights=path).eval()
        with torch.no_grad():
            got = seg.backbone(X)
        low, high = _tv_features(state, dilated=True, frozen=False, taps=[4, 16])
        assert_close(got["low"], low, msg=f"{path.name} segmentation low")
        assert_close(got["high"], high, msg=f"{path.name} segmentation high")


def test_wrong_architecture_is_a_clear_error(tmp_path):
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError) as err:
        load_weights(build("mobilenet_v3_large"), tmp_path / "small.pth")
    text = str(err.value)
    assert "small.pth" in text and "missing from the file" in text and "shape differences" in text
    assert "features.1.block.1.fc1.weight" in text and "checkpoint (72, 16, 1, 1) vs model (64, 16, 1, 1)" in text


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable checkpoint"):
        load_weights(build("mobilenet_v3_small"), tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_weights(build("mobilenet_v3_small"), tmp_path / "missing.pt")
