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


def test_a_tensor_image_takes_torchvisions_own_path():
    """Tensors are left to torchvision's AutoAugment (the fast path is for PIL images): the same draws and
    the same pixels on a uint8 (3, H, W) tensor."""
    image = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 24, 32), dtype=np.uint8))
    ref = V1.AutoAugment(V1.AutoAugmentPolicy.IMAGENET)
    ours = autoaugment.AutoAugment(V1.AutoAugmentPolicy.IMAGENET)
    for seed in range(20):
        torch.manual_seed(seed)
        a, after = ours(image), torch.rand(1)
        torch.manual_seed(seed)
        assert torch.equal(a, ref(image)) and torch.equal(after, torch.rand(1)), seed


def test_a_coin_equal_to_the_operations_probability_applies_it_as_torchvision_does():
    """torchvision applies an operation when its float32 coin is <= the policy's probability (cast to
    float32): a coin exactly at the probability applies it, the next float32 above it does not. ImageNet's
    first sub-policy: Posterize (p 0.4, 4 bits) and Rotate (p 0.6, 30 degrees, the sign drawn)."""
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 32, 3), dtype=np.uint8))
    p = torch.tensor([0.4, 0.6], dtype=torch.float32)
    above = torch.nextafter(p, torch.tensor(1.0))
    outputs = []
    for probs in (p, above):
        for sign in (0, 1):
            params = (torch.tensor(0), probs, torch.tensor([sign, sign]))
            ref = V1.AutoAugment(V1.AutoAugmentPolicy.IMAGENET)
            ours = autoaugment.AutoAugment(V1.AutoAugmentPolicy.IMAGENET)
            ref.get_params = ours.get_params = lambda n, params=params: params
            expected = np.asarray(ref(image))
            assert np.array_equal(np.asarray(ours(image)), expected), (probs, sign)
            outputs.append(expected)
    at_p_negative, at_p_positive, above_negative, above_positive = outputs
    assert not np.array_equal(at_p_negative, at_p_positive)  # applied, rotated each way
    assert np.array_equal(above_negative, np.asarray(image))
    assert np.array_equal(above_positive, np.asarray(image))


def test_equalize_equals_pillows_where_the_last_bin_holds_one_pixel():
    """Pillow leaves out the last non-empty bin, however few pixels it holds: 256 pixels with one of them
    alone in the top bin make a step of (256 - 1) // 255 = 1 (not the identity that leaving out a fuller
    bin would give)."""
    values = np.random.default_rng(3).integers(0, 200, 256).astype(np.uint8)
    values[17] = 250
    for image in (Image.fromarray(values.reshape(16, 16)),
                  Image.fromarray(np.stack([values] * 3, -1).reshape(16, 16, 3))):
        ours, pillows = autoaugment.equalize(image).tobytes(), ImageOps.equalize(image).tobytes()
        assert ours == pillows and pillows != image.tobytes(), image.mode
