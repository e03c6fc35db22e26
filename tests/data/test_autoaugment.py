"""data/autoaugment.py against its oracle, torchvision's AutoAugment and Pillow's ImageOps: the same
draws and the same pixels, on photographs and on the images where the lookup tables have edge cases."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms as V1
from torchvision.transforms import InterpolationMode

from data import autoaugment


def _images(photos):
    """224 px crops of the photographs, a greyscale one, and the lookup tables' edge cases: a flat
    image, a two-level image, a narrow-histogram image."""
    out = [Image.open(p).convert("RGB").resize((224, 224)) for p in sorted(photos.rglob("*.jpg"))[:8]]
    out.append(out[0].convert("L"))
    out.append(Image.new("RGB", (224, 224), (10, 200, 30)))
    two = np.zeros((224, 224, 3), np.uint8)
    two[::2] = 255
    out.append(Image.fromarray(two))
    out.append(Image.fromarray((np.random.default_rng(0).integers(120, 124, (224, 224, 3))).astype(np.uint8)))
    return out


@pytest.mark.parametrize("policy", ["imagenet", "cifar10"])
def test_same_draws_and_pixels_as_torchvision(photos, policy):
    images = [im for im in _images(photos) if im.mode == "RGB"]
    ref = V1.AutoAugment(V1.AutoAugmentPolicy(policy), interpolation=InterpolationMode.NEAREST)
    ours = autoaugment.AutoAugment(V1.AutoAugmentPolicy(policy), interpolation=InterpolationMode.NEAREST)
    for seed in range(300):
        image = images[seed % len(images)]
        torch.manual_seed(seed)
        a = np.asarray(ours(image))
        next_ours = torch.rand(1)
        torch.manual_seed(seed)
        b = np.asarray(ref(image))
        assert np.array_equal(a, b) and torch.equal(next_ours, torch.rand(1)), seed


def test_lookup_table_operations_equal_pillows(photos):
    for image in _images(photos):
        assert autoaugment.equalize(image).tobytes() == ImageOps.equalize(image).tobytes()
        assert autoaugment.autocontrast(image).tobytes() == ImageOps.autocontrast(image).tobytes()
        assert autoaugment.invert(image).tobytes() == ImageOps.invert(image).tobytes()
        for bits in range(1, 9):
            assert autoaugment.posterize(image, bits).tobytes() == ImageOps.posterize(image, bits).tobytes()
        for threshold in (0.0, 1.0, 127.5, 227.66666, 255.0):
            assert autoaugment.solarize(image, threshold).tobytes() == ImageOps.solarize(image, threshold).tobytes()


def test_equalize_equals_pillows_where_each_bin_step_is_small():
    """Small images (toy crops): per band, step = (pixels - the last bin's count) // 255 is 1, 2 or 3, where a
    wrong divisor or rounding shows in every table entry."""
    rng = np.random.default_rng(0)
    for pixels in (300, 600, 900):
        for mode in ("RGB", "L"):
            shape = (pixels // 20, 20, 3) if mode == "RGB" else (pixels // 20, 20)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
            assert autoaugment.equalize(image).tobytes() == ImageOps.equalize(image).tobytes(), (pixels, mode)
