"""data/_jpeg.c (libjpeg-turbo's partial decode) and the training transform's use of it: the crop's pixels
are torchvision's full decode cropped afterwards, a scaled crop is Pillow's DCT-scaled decode (`draft`)
cropped, files it does not take fall back to the whole decode, and the draws stay the reference's."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data import classification
from data.classification import TrainTransform, _crop_params, decode_bytes
from tests.data.test_classification import _cfg

_jpeg = pytest.importorskip("data._jpeg", reason="data/_jpeg.c is not built (libjpeg's headers are missing)")


def _variants(photo: Image.Image) -> dict[str, bytes]:
    """The JPEG kinds ImageNet has: 4:2:0 (most), 4:2:2, 4:4:4, progressive, restart markers, grayscale,
    odd sizes (partial MCUs at the right and bottom edges)."""
    odd = photo.crop((3, 5, 3 + 301, 5 + 203))
    kinds = {"420": (photo, {"subsampling": 2}), "422": (photo, {"subsampling": 1}),
             "444": (odd, {"subsampling": 0}), "progressive": (odd, {"progressive": True}),
             "restart": (photo, {"restart_marker_rows": 1}), "gray": (odd.convert("L"), {})}
    out = {}
    for name, (img, kw) in kinds.items():
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90, **kw)
        out[name] = buf.getvalue()
    return out


def _rectangles(h: int, w: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """Random crops, the whole image, one pixel at each corner, and crops touching each edge."""
    rects = [(0, 0, h, w), (0, 0, 1, 1), (h - 1, w - 1, 1, 1), (0, w - 7, 9, 7), (h - 9, 0, 9, 17),
             (1, 1, h - 2, w - 2), (16, 16, 16, 16), (15, 17, 33, 31)]
    rects = [(t, l, ch, cw) for t, l, ch, cw in rects if t >= 0 and l >= 0 and t + ch <= h and l + cw <= w]
    for _ in range(12):
        ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        rects.append((int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw))
    return rects


def test_the_crop_is_torchvisions_full_decode_cropped(photos):
    rng = np.random.default_rng(0)
    files = sorted(photos.rglob("*.jpg"))
    datas = {f.name: f.read_bytes() for f in files[:6]}
    datas |= _variants(Image.open(files[1]).convert("RGB"))
    taken = 0
    for name, data in datas.items():
        full = decode_bytes(data, name)  # torchvision's decoder (its own libjpeg-turbo build)
        size = _jpeg.size(data)
        if size is None:  # the photographs hold a CMYK file or two: not taken (next test)
            assert Image.open(io.BytesIO(data)).mode == "CMYK", name
            continue
        assert size == tuple(full.shape[1:]), name
        for top, left, h, w in _rectangles(*size, rng):
            out = _jpeg.crop(data, top, left, h, w, 1)
            got = torch.frombuffer(out, dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1)
            assert torch.equal(got, full[:, top:top + h, left:left + w]), (name, top, left, h, w)
        taken += 1
    assert taken >= 10


def test_a_scaled_crop_is_pillows_dct_scaled_decode_cropped(photos):
    """At 1/d scale the rectangle is in the scaled image's pixels."""
    rng = np.random.default_rng(1)
    files = sorted(photos.rglob("*.jpg"))
    checked = 0
    for name, data in [(f.name, f.read_bytes()) for f in files[:8]] + list(
            _variants(Image.open(files[2]).convert("RGB")).items()):
        size = _jpeg.size(data)
        if size is None:
            continue
        h, w = size
        for d in (2, 4, 8):
            im = Image.open(io.BytesIO(data))
            im.draft(im.mode, (w // d, h // d))  # Pillow's libjpeg-turbo at scale 1/d
            if im.size != (-(-w // d), -(-h // d)):
                continue  # a tiny image: Pillow picked another scale
            scaled = np.asarray(im.convert("RGB"))
            for top, left, ch, cw in _rectangles(h, w, rng)[:8]:
                t, l = top // d, left // d
                b, r = min(t + -(-ch // d), len(scaled)), min(l + -(-cw // d), scaled.shape[1])
                out = np.frombuffer(_jpeg.crop(data, t, l, b - t, r - l, d), np.uint8).reshape(b - t, r - l, 3)
                assert np.array_equal(out, scaled[t:b, l:r]), (name, d, t, l, b, r)
            checked += 1
    assert checked >= 20


def test_what_it_does_not_take_is_none_and_bad_arguments_are_refused(photos):
    jpeg = sorted(photos.rglob("*.jpg"))[0].read_bytes()
    rgb = Image.open(io.BytesIO(jpeg)).convert("RGB")
    other = {}
    for fmt, mode in (("PNG", "RGB"), ("WEBP", "RGB"), ("JPEG", "CMYK")):
        buf = io.BytesIO()
        rgb.convert(mode).save(buf, format=fmt)
        other[f"{fmt} {mode}"] = buf.getvalue()
    for name, data in {**other, "empty": b"", "text": b"not an image", "two bytes": b"\xff\xd8"}.items():
        assert _jpeg.size(data) is None, name
    h, w = _jpeg.size(jpeg)
    assert _jpeg.size(jpeg[:jpeg.index(b"\xff\xda") + 20]) == (h, w)  # the header is there ...
    assert _jpeg.crop(jpeg[:len(jpeg) // 2], 0, 0, h, w, 1) is None  # ... the data is not: libjpeg warns
    sof = jpeg.index(b"\xff\xc0")
    lying = bytearray(jpeg)
    lying[sof + 5:sof + 7] = (h * 3).to_bytes(2, "big")
    assert _jpeg.size(bytes(lying)) == (3 * h, w) and _jpeg.crop(bytes(lying), 0, 0, 3 * h, w, 1) is None
    assert _jpeg.crop(jpeg, h - 1, 0, 2, w, 1) is None  # below the image: nothing decoded
    assert _jpeg.crop(jpeg, 0, 0, -(-h // 2) + 1, 8, 2) is None  # below the image at 1/2
    assert _jpeg.crop(jpeg, 0, 0, -(-h // 2), -(-w // 2), 2) is not None  # the whole image at 1/2
    for args in ((-1, 0, 1, 1, 1), (0, 0, 0, 1, 1), (0, 0, 1, 1, 3)):
        with pytest.raises(ValueError, match="bad rectangle"):
            _jpeg.crop(jpeg, *args)


class _Spy:
    """data._jpeg with a record of the scales asked for."""

    def __init__(self):
        self.scales = []

    def size(self, data):
        return _jpeg.size(data)

    def crop(self, data, top, left, h, w, d):
        self.scales.append(d)
        return _jpeg.crop(data, top, left, h, w, d)


def test_the_training_item_takes_the_partial_decode_with_the_reference_draws(photos, monkeypatch):
    """dct_downscale false: the item is bit for bit the one from the whole decode (data/_jpeg not built),
    with the same draws consumed; true: only crops >= 2x crop_size are scaled, within a few levels."""
    files = sorted(photos.rglob("*.jpg"))
    datas = [f.read_bytes() for f in files] + list(_variants(Image.open(files[3]).convert("RGB")).values())
    exact = TrainTransform(_cfg("unused", crop_size=96, dct_downscale=False, auto_augment=None))
    scaled = TrainTransform(_cfg("unused", crop_size=96, auto_augment=None))
    runs = {"exact": (exact, _Spy()), "whole": (exact, None), "scaled": (scaled, _Spy())}
    outputs = {}
    for label, (tf, jpeg) in runs.items():
        monkeypatch.setattr(classification, "_jpeg", jpeg)
        note = classification.slow_decode_note()  # what the training scripts log
        assert (note is None) == (jpeg is not None) and (jpeg or "apt-get install libjpeg-dev" in note)
        outputs[label] = []
        for seed, data in enumerate(datas):
            torch.manual_seed(seed)
            outputs[label].append((tf.augment_bytes(data, "x.jpg"), torch.rand(1)))
    cmyk = sum(_jpeg.size(data) is None for data in datas)
    assert runs["exact"][1].scales == [1] * (len(datas) - cmyk)
    for (a, after_a), (b, after_b) in zip(outputs["exact"], outputs["whole"]):
        assert torch.equal(a, b) and torch.equal(after_a, after_b)
    scales = runs["scaled"][1].scales
    assert len(scales) == len(datas) - cmyk and 1 in scales and 2 in scales
    diffs = []
    for seed, ((a, after_a), (b, after_b)) in enumerate(zip(outputs["exact"], outputs["scaled"])):
        assert torch.equal(after_a, after_b)  # the same draws
        torch.manual_seed(seed)
        size = _jpeg.size(datas[seed])
        if size is None:
            continue
        _, _, h, w = _crop_params(size, scaled.scale, scaled.ratio)
        diff = (a.int() - b.int()).abs().float()
        if min(h, w) < 2 * 96:
            assert torch.equal(a, b)
        else:
            diffs.append(diff.mean().item())
    # the crop's edges move by < d source pixels: a shift of up to 1 output pixel on textured photographs
    assert diffs and max(diffs) < 8 and 1 < np.mean(diffs) < 4  # docs/data.md: about 2.7 levels mean


def _segment0(jpeg: bytes) -> tuple[int, int]:
    """Where the first MCU's entropy-coded bytes lie in a file with a restart marker after every MCU."""
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    return start, jpeg.index(b"\xff\xd0", start)


def test_a_file_with_restart_markers_gives_the_same_pixels_and_decodes_only_the_mcus_around_the_crop(photos):
    """restart() keeps the coefficients (the same pixels, whole or cropped, at every scale); a crop of such
    a file reads only the MCUs around it: with the first MCU's data destroyed, a crop away from it still
    decodes exactly, one that needs it does not (libjpeg warns: None), nor does the whole file."""
    rng = np.random.default_rng(2)
    files = sorted(photos.rglob("*.jpg"))
    datas = {f.name: f.read_bytes() for f in files[:5]} | _variants(Image.open(files[4]).convert("RGB"))
    for name, data in datas.items():
        if _jpeg.size(data) is None:
            assert _jpeg.restart(data) is None, name  # CMYK: not taken, the file stays as it is
            continue
        rst = _jpeg.restart(data)
        assert rst != data and 0.9 < len(rst) / len(data) < 1.15, name  # (a progressive file: 1.11)
        full = decode_bytes(data, name)
        assert torch.equal(decode_bytes(rst, name), full), name  # torchvision's decoder: the same pixels
        h, w = _jpeg.size(rst)
        for top, left, ch, cw in _rectangles(h, w, rng):
            got = torch.frombuffer(_jpeg.crop(rst, top, left, ch, cw, 1), dtype=torch.uint8)
            assert torch.equal(got.view(ch, cw, 3).permute(2, 0, 1), full[:, top:top + ch, left:left + cw]), \
                (name, top, left, ch, cw)
        for d in (2, 4, 8):
            im = Image.open(io.BytesIO(data))
            im.draft(im.mode, (w // d, h // d))
            if im.size != (-(-w // d), -(-h // d)):
                continue
            scaled = np.asarray(im.convert("RGB"))
            for top, left, ch, cw in _rectangles(*scaled.shape[:2], rng)[:6]:
                out = np.frombuffer(_jpeg.crop(rst, top, left, ch, cw, d), np.uint8).reshape(ch, cw, 3)
                assert np.array_equal(out, scaled[top:top + ch, left:left + cw]), (name, d, top, left, ch, cw)
    rst = _jpeg.restart(datas["420"])
    start, end = _segment0(rst)
    broken = rst[:start] + b"\x00" + rst[end:]  # MCU (0, 0): one byte where a whole block's codes were
    h, w = _jpeg.size(rst)
    full = decode_bytes(datas["420"], "420")
    far = _jpeg.crop(broken, 64, 64, h - 64, w - 64, 1)
    assert torch.equal(torch.frombuffer(far, dtype=torch.uint8).view(h - 64, w - 64, 3).permute(2, 0, 1),
                       full[:, 64:, 64:])
    assert _jpeg.crop(broken, 0, 0, 40, 40, 1) is None and _jpeg.crop(broken, 0, 0, h, w, 1) is None


def test_the_idct_scale_is_the_largest_that_keeps_the_crop_at_least_crop_size(monkeypatch):
    """The whole image as the crop (scale and ratio 1), crop_size 8: a side s is decoded at 1/d for the
    largest d of libjpeg's 1, 2, 4, 8 with s / d >= 8 (s >= 2 x crop_size for a half, 4 x for a quarter,
    8 x for an eighth, never less than an eighth); dct_downscale false: always whole. Where s / d is exactly
    8 no resampling is left: the item is Pillow's own DCT-scaled decode (`draft`)."""
    rng = np.random.default_rng(3)
    common = dict(crop_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, auto_augment=None)
    scaled = TrainTransform(_cfg("unused", **common))
    exact = TrainTransform(_cfg("unused", dct_downscale=False, **common))
    sides = (15, 16, 31, 32, 63, 64, 200)
    spy = _Spy()
    monkeypatch.setattr(classification, "_jpeg", spy)
    for side in sides:
        buf = io.BytesIO()
        noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(noise).save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        item = scaled.augment_bytes(data, "x.jpg")
        d = spy.scales[-1]
        if side in (16, 32, 64):
            im = Image.open(io.BytesIO(data))
            im.draft("RGB", (side // d, side // d))
            assert im.size == (8, 8), side
            assert torch.equal(item, torch.from_numpy(np.array(im.convert("RGB")))), side
        exact.augment_bytes(data, "x.jpg")
    assert spy.scales == [1, 1, 2, 1, 2, 1, 4, 1, 4, 1, 8, 1, 8, 1]


def test_a_jpeg_libjpeg_warns_about_is_cropped_from_torchvisions_whole_decode(photos, monkeypatch):
    """A scan cut short and closed by an end marker: the partial decode gives None (libjpeg warns),
    torchvision decodes it (the missing rows grey); the item is then the crop of that whole decode, as
    without data/_jpeg, with the same draws."""
    jpeg = sorted(photos.rglob("*.jpg"))[0].read_bytes()
    sos = jpeg.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big")
    cut = jpeg[:start + (len(jpeg) - start) // 2] + b"\xff\xd9"
    h, w = _jpeg.size(cut)
    assert _jpeg.crop(cut, 0, 0, h, w, 1) is None and decode_bytes(cut, "cut.jpg").shape == (3, h, w)
    tf = TrainTransform(_cfg("unused", crop_size=32, auto_augment=None))
    items = []
    for jpeg_module in (_jpeg, None):
        monkeypatch.setattr(classification, "_jpeg", jpeg_module)
        items.append([])
        for seed in range(6):
            torch.manual_seed(seed)
            items[-1].append((tf.augment_bytes(cut, "cut.jpg"), torch.rand(1)))
    for (a, after_a), (b, after_b) in zip(*items):
        assert torch.equal(a, b) and torch.equal(after_a, after_b)
