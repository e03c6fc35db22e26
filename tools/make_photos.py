"""Natural photographs at ImageNet's size distribution, for the data benchmark and the data tests.

    python tools/make_photos.py --out photo_data [--n 400] [--seed 0]

DIR/train/<class>/*.jpg, an ImageFolder of JPEGs made from the real photographs scikit-image ships
(`skimage.data`: astronaut, cat, coffee, rocket, Hubble deep field, retina, motorcycle, camera man,
coins, moon, brick, grass, gravel, cell micrograph, ...). The toy data (tools/make_toy_data.py: flat
synthetic shapes, 64-320 px) makes decoding look cheap: a JPEG's decode cost grows with its pixel
count and its entropy. These files are photographs, downscaled (never enlarged: an upscaled photo is
smoother, so cheaper to decode, than a real one of that size) and cropped to sizes drawn like
ImageNet's: most have a 500 px longer side (4:3, 3:2, 1:1, 5:4, 16:9, a quarter of them portrait),
a fifth are smaller (longer side 100-499 px), a tenth larger (600-2,000 px, mosaics of photographs
where one is not large enough). Mean about 490 x 390, like ImageNet's (about 500 x 375; the
issue's sample of 300 real ImageNet photographs averaged 466 x 390). JPEG quality 90, 4:2:0, baseline
(ImageNet's own files are mostly baseline 4:2:0 at quality 75-95); 4% are saved as 8-bit grayscale
JPEGs and 1% as CMYK JPEGs (ImageNet has both; few of either).

Deterministic: the same --n and --seed give byte-identical files (fixed RNG, PIL's encoder is
deterministic for fixed settings). `ensure(out, n, seed)` builds the folder once and reuses it (a stamp
file records what it holds).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

VERSION = 1
COLOUR = ["astronaut", "cat", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry",
          "motorcycle_left", "motorcycle_right"]
GREY = ["camera", "coins", "moon", "brick", "grass", "gravel", "cell", "clock"]
CLASSES = 10
JPEG = dict(format="JPEG", quality=90, subsampling=2, optimize=False, progressive=False)
ASPECTS = [4 / 3, 4 / 3, 4 / 3, 3 / 2, 3 / 2, 1.0, 5 / 4, 16 / 9]


def sources() -> list[tuple[str, np.ndarray]]:
    """The photographs, (name, uint8 HxWx3), in a fixed order."""
    import warnings

    import skimage.data as d

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        left, right, _ = d.stereo_motorcycle()
        named = {"motorcycle_left": left, "motorcycle_right": right}
        for name in COLOUR + GREY:
            img = named[name] if name in named else getattr(d, name)()
            img = np.asarray(img)
            if img.ndim == 2:
                img = np.repeat(img[:, :, None], 3, axis=2)
            out.append((name, np.ascontiguousarray(img[:, :, :3]).astype(np.uint8)))
    return out


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn like ImageNet's: mostly a 500 px longer side, some smaller, a few large."""
    u = rng.random()
    if u < 0.73:
        longer = 500
    elif u < 0.93:
        longer = int(round(np.exp(rng.uniform(np.log(100), np.log(499)))))
    else:
        longer = int(round(np.exp(rng.uniform(np.log(600), np.log(2000)))))
    aspect = ASPECTS[rng.integers(len(ASPECTS))]
    shorter = max(1, int(round(longer / aspect)))
    return (longer, shorter) if rng.random() < 0.8 else (shorter, longer)


def _region(rng: np.random.Generator, src: np.ndarray, w: int, h: int) -> Image.Image:
    """A w x h picture from `src`: a random window of it downscaled (by 1-2.5x where the photo is large
    enough) to w x h, never upscaled beyond 1.25x."""
    sh, sw = src.shape[:2]
    fit = min(sw / w, sh / h)  # the largest downscale factor the source allows
    factor = rng.uniform(max(min(fit, 1.0), 0.8), max(min(fit, 2.5), 0.8))
    cw, ch = min(sw, int(round(w * factor))), min(sh, int(round(h * factor)))
    x, y = rng.integers(0, sw - cw + 1), rng.integers(0, sh - ch + 1)
    return Image.fromarray(src[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.LANCZOS)


def make_image(rng: np.random.Generator, photos: list[tuple[str, np.ndarray]],
               size: tuple[int, int] | None = None) -> Image.Image:
    """One photograph, `size` (width, height) or drawn by `draw_size`."""
    w, h = size or draw_size(rng)
    canvas = Image.new("RGB", (w, h))
    cols, rows = -(-w // 700), -(-h // 700)  # a mosaic where one photograph is too small
    xs = np.linspace(0, w, cols + 1).round().astype(int)
    ys = np.linspace(0, h, rows + 1).round().astype(int)
    for r in range(rows):
        for c in range(cols):
            _, src = photos[rng.integers(len(photos))]
            canvas.paste(_region(rng, src, xs[c + 1] - xs[c], ys[r + 1] - ys[r]), (int(xs[c]), int(ys[r])))
    # Sensor noise: the downscaled photographs are smoother than a camera's JPEGs (0.27 bytes per pixel
    # at quality 90 without it; ImageNet's files average about 0.6: ~110 kB for ~180 k pixels).
    noise = rng.normal(0.0, rng.uniform(4.0, 9.0), size=(h, w, 1)) + rng.normal(0.0, 3.0, size=(h, w, 3))
    return Image.fromarray(np.clip(np.asarray(canvas, np.float32) + noise, 0, 255).astype(np.uint8))


def write(out: Path, n: int = 400, seed: int = 0) -> Path:
    """Write the n photographs under out/train/<class>/; returns out/train."""
    rng = np.random.default_rng(seed)
    photos = sources()
    split = out / "train"
    if split.exists():
        shutil.rmtree(split)
    for c in range(CLASSES):
        (split / f"class_{c:02d}").mkdir(parents=True)
    for i in range(n):
        img = make_image(rng, photos)
        kind = rng.random()
        path = split / f"class_{i % CLASSES:02d}" / f"photo_{i:04d}.jpg"
        if kind < 0.04:
            img.convert("L").save(path, **JPEG)
        elif kind < 0.05:
            img.convert("CMYK").save(path, format="JPEG", quality=90)
        else:
            img.save(path, **JPEG)
    return split


def ensure(out: str | Path, n: int = 400, seed: int = 0) -> Path:
    """out/train, built once for (n, seed, VERSION) and reused afterwards."""
    out = Path(out)
    stamp = out / ".done"
    want = {"n": n, "seed": seed, "version": VERSION}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return out / "train"
    out.mkdir(parents=True, exist_ok=True)
    split = write(out, n, seed)
    stamp.write_text(json.dumps(want))
    return split


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("photo_data"))
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    return ensure(args.out, args.n, args.seed)


if __name__ == "__main__":
    print(main())
