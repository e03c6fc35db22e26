"""torchvision's AutoAugment on PIL images, the same draws and the same pixels, for less CPU per image.

torchvision.transforms.AutoAugment rebuilds its table of magnitudes (14 torch tensors) at every call,
and its five lookup-table operations (Equalize, AutoContrast, Posterize, Solarize, Invert; 34 of the
ImageNet policy's 50 operations) go through Pillow's ImageOps, which builds each 768-entry table in a
Python loop and then rounds it entry by entry in `Image.point` (0.16 ms of a 0.2 ms operation at
224 px). Here the magnitudes are built once per image size, and the tables are computed with numpy
from the same histogram by the same integer/float arithmetic and handed to Pillow's C `point` directly;
every other operation is torchvision's own `_apply_op`. The random draws are torchvision's
`get_params`, in its order, so for a given generator state the sub-policy, the coin flips, the signs
and the output pixels are torchvision's (tests/data/test_autoaugment.py compares them on photographs).
At 224 px the ImageNet policy costs 0.42 ms here against 0.75 ms in torchvision (2-core machine,
loaded; same run).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from torchvision.transforms import AutoAugment as _TorchvisionAutoAugment
from torchvision.transforms import autoaugment as _tv


class AutoAugment(_TorchvisionAutoAugment):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._spaces: dict = {}
        # torchvision compares each float32 coin (a tensor) with the policy's probability, which torch
        # casts to float32 for the comparison: the same comparison on Python floats, without a tensor
        # operation per coin (a third of the transform's cost at 224 px), needs the float32 value of p.
        self._policies = [[(op, float(np.float32(p)), m) for op, p, m in policy] for policy in self.policies]

    def _space(self, height: int, width: int):
        key = (height, width)
        if key not in self._spaces:
            space = self._augmentation_space(10, (height, width))
            self._spaces[key] = {name: ([float(v) for v in mags.reshape(-1).tolist()], signed)
                                 for name, (mags, signed) in space.items()}
        return self._spaces[key]

    def forward(self, img):
        if not isinstance(img, Image.Image):  # tensors: torchvision's own path
            return super().forward(img)
        width, height = img.size
        transform_id, probs, signs = self.get_params(len(self.policies))
        probs, signs = probs.tolist(), signs.tolist()  # exact: float32 and int values
        op_meta = self._space(height, width)
        for i, (op_name, p, magnitude_id) in enumerate(self._policies[transform_id]):
            if probs[i] <= p:
                magnitudes, signed = op_meta[op_name]
                magnitude = magnitudes[magnitude_id] if magnitude_id is not None else 0.0
                if signed and signs[i] == 0:
                    magnitude *= -1.0
                if op_name in _LUT_OPS:
                    img = _LUT_OPS[op_name](img, magnitude)
                else:
                    img = _tv._apply_op(img, op_name, magnitude, interpolation=self.interpolation, fill=self.fill)
        return img


def _point(img: Image.Image, lut: list[int]) -> Image.Image:
    """img.point(lut) for an L or RGB image and a list of ints (256 entries, or 256 per band), without
    Image.point's Python pass that rounds every entry (they are ints already)."""
    bands = len(img.getbands())
    return img._new(img.im.point(lut * bands if len(lut) == 256 else lut, None))


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """PIL.ImageOps.posterize(img, bits)."""
    mask = ~(2 ** (8 - bits) - 1)
    return _point(img, [i & mask for i in range(256)])


def solarize(img: Image.Image, threshold: float) -> Image.Image:
    """PIL.ImageOps.solarize(img, threshold)."""
    return _point(img, [i if i < threshold else 255 - i for i in range(256)])


_INVERT = list(range(255, -1, -1))


def invert(img: Image.Image) -> Image.Image:
    """PIL.ImageOps.invert(img)."""
    return _point(img, _INVERT)


def _histograms(img: Image.Image) -> np.ndarray:
    return np.asarray(img.histogram(), dtype=np.int64).reshape(-1, 256)


def equalize(img: Image.Image) -> Image.Image:
    """PIL.ImageOps.equalize(img) for an L or RGB image, its lookup tables computed with numpy, all bands
    at once: per band, step = (pixels - the count of its last non-empty bin) // 255, and the table
    entry of value i is (step // 2 + the count below i) // step (the identity where step is 0)."""
    h = _histograms(img)
    bands = np.arange(len(h))
    last = 255 - np.argmax(h[:, ::-1] > 0, axis=1)  # the last non-empty bin of each band
    step = ((h.sum(axis=1) - h[bands, last]) // 255)[:, None]
    below = np.cumsum(h, axis=1) - h
    luts = np.where(step > 0, (step // 2 + below) // np.maximum(step, 1), np.arange(256))
    return _point(img, luts.reshape(-1).tolist())


def autocontrast(img: Image.Image) -> Image.Image:
    """PIL.ImageOps.autocontrast(img) (no cutoff, nothing ignored) for an L or RGB image, the same
    float arithmetic vectorised."""
    luts = []
    ix = np.arange(256, dtype=np.float64)
    for h in _histograms(img):
        present = np.flatnonzero(h)
        lo, hi = int(present[0]), int(present[-1])  # an image has a pixel: every histogram has a bin set
        if hi <= lo:
            luts.append(np.arange(256, dtype=np.int64))
        else:
            scale = 255.0 / (hi - lo)
            offset = -lo * scale
            luts.append(np.clip(np.trunc(ix * scale + offset), 0, 255).astype(np.int64))
    return _point(img, np.concatenate(luts).tolist())


# torchvision's _apply_op calls, with the magnitude as it passes it (Posterize: int(magnitude))
_LUT_OPS = {
    "Equalize": lambda img, _: equalize(img),
    "AutoContrast": lambda img, _: autocontrast(img),
    "Posterize": lambda img, magnitude: posterize(img, int(magnitude)),
    "Solarize": solarize,
    "Invert": lambda img, _: invert(img),
}
