import pytest
import torch
import torchvision

from engine import checkpoint
from models import build, load_weights


def test_loads_torchvision_state_dict_and_project_checkpoint(tmp_path):
    ref = torchvision.models.mobilenet_v3_small()
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    ours = load_weights(build("mobilenet_v3_small"), tmp_path / "tv.pth")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    checkpoint.save(checkpoint.new(ref.state_dict(), epoch=3), tmp_path / "ckpt.pt")
    again = load_weights(build("mobilenet_v3_small"), tmp_path / "ckpt.pt")
    assert torch.equal(again.classifier[3].weight, ref.classifier[3].weight)


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
