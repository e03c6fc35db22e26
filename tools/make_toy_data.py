"""Write small, deterministic datasets in the real on-disk formats.

    python tools/make_toy_data.py --out DIR [--seed N] [--coco-train 24] [--coco-val 8]

DIR/imagenet/{train,val}/<class>/*.jpg   ImageFolder, 10 visually distinct classes, 64-320 px JPEGs
DIR/coco/{train2017,val2017}/*.jpg        COCO images with several objects each
DIR/coco/annotations/instances_{train,val}2017.json
                                          boxes (xywh), polygons, areas, crowd RLEs, empty images,
                                          real COCO category ids (mostly VOC ones, one outside)

The same seed gives byte-identical files (PIL's JPEG encoder is deterministic for fixed settings,
JSON is written with sorted keys). Runs in a few seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ["circle", "square", "triangle", "hstripes", "vstripes", "checker", "ring", "cross", "dots", "diamond"]
PALETTE = {  # one dominant hue per class, plus shape: distinct to a small CNN in a few epochs
    "circle": (220, 40, 40), "square": (40, 90, 220), "triangle": (40, 180, 60), "hstripes": (230, 200, 30),
    "vstripes": (160, 50, 200), "checker": (30, 200, 200), "ring": (240, 120, 20), "cross": (240, 240, 240),
    "dots": (120, 70, 30), "diamond": (240, 100, 180),
}
# COCO category ids are the real ones; all but "stop sign" belong to the VOC subset.
COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 5, "name": "airplane", "supercategory": "vehicle"},
    {"id": 13, "name": "stop sign", "supercategory": "outdoor"},
    {"id": 17, "name": "cat", "supercategory": "animal"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 44, "name": "bottle", "supercategory": "kitchen"},
    {"id": 62, "name": "chair", "supercategory": "furniture"},
]
JPEG = dict(format="JPEG", quality=90, optimize=False, progressive=False, subsampling=2)


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    base = rng.integers(40, 200, size=3)
    noise = rng.normal(0, 18, size=(h, w, 3))
    grad = np.linspace(-25, 25, w)[None, :, None] * rng.choice([-1, 1])
    arr = np.clip(base[None, None, :] + noise + grad, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in colour)


def _draw_class(img: Image.Image, name: str, rng: np.random.Generator) -> None:
    w, h = img.size
    d = ImageDraw.Draw(img)
    colour = _jitter(rng, PALETTE[name])
    s = int(min(w, h) * rng.uniform(0.45, 0.8))
    x0 = int(rng.integers(0, max(1, w - s)))
    y0 = int(rng.integers(0, max(1, h - s)))
    x1, y1 = x0 + s, y0 + s
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    lw = max(2, s // 10)
    if name == "circle":
        d.ellipse([x0, y0, x1, y1], fill=colour)
    elif name == "square":
        d.rectangle([x0, y0, x1, y1], fill=colour)
    elif name == "triangle":
        d.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif name == "hstripes":
        for y in range(y0, y1, 2 * lw):
            d.rectangle([x0, y, x1, y + lw - 1], fill=colour)
    elif name == "vstripes":
        for x in range(x0, x1, 2 * lw):
            d.rectangle([x, y0, x + lw - 1, y1], fill=colour)
    elif name == "checker":
        cell = max(4, s // 5)
        for i, y in enumerate(range(y0, y1, cell)):
            for j, x in enumerate(range(x0, x1, cell)):
                if (i + j) % 2 == 0:
                    d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour)
    elif name == "ring":
        d.ellipse([x0, y0, x1, y1], outline=colour, width=max(3, s // 7))
    elif name == "cross":
        d.rectangle([cx - lw, y0, cx + lw, y1], fill=colour)
        d.rectangle([x0, cy - lw, x1, cy + lw], fill=colour)
    elif name == "dots":
        r = max(2, s // 12)
        for _ in range(12):
            px, py = rng.uniform(x0, x1), rng.uniform(y0, y1)
            d.ellipse([px - r, py - r, px + r, py + r], fill=colour)
    elif name == "diamond":
        d.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def _random_size(rng: np.random.Generator, lo: int = 64, hi: int = 320) -> tuple[int, int]:
    w = int(rng.integers(lo, hi + 1))
    ratio = math.exp(rng.uniform(math.log(3 / 5), math.log(5 / 3)))
    h = int(np.clip(round(w / ratio), lo, hi))
    return w, h


def make_imagenet(out: Path, seed: int, train_per_class: int = 40, val_per_class: int = 10) -> None:
    for split, n, offset in (("train", train_per_class, 0), ("val", val_per_class, 10_000)):
        for ci, name in enumerate(CLASSES):
            folder = out / split / f"n{ci:08d}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                rng = np.random.default_rng([seed, ci, offset + k])
                w, h = _random_size(rng)
                img = _background(rng, w, h)
                _draw_class(img, name, rng)
                img.save(folder / f"{name}_{split}_{k:04d}.jpg", **JPEG)


# ------------------------------------------------------------------------------ COCO


def _polygon(rng: np.random.Generator, cat_id: int, x0: float, y0: float, s: float) -> list[float]:
    """A category-specific shape as a flat COCO polygon [x1, y1, x2, y2, ...]."""
    cx, cy = x0 + s / 2, y0 + s / 2
    kind = cat_id % 4
    if kind == 0:  # octagon-ish blob
        pts = [(cx + s / 2 * math.cos(a), cy + s / 2 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 9)[:-1]]
    elif kind == 1:  # tall rectangle
        pts = [(x0 + s * 0.25, y0), (x0 + s * 0.75, y0), (x0 + s * 0.75, y0 + s), (x0 + s * 0.25, y0 + s)]
    elif kind == 2:  # triangle
        pts = [(cx, y0), (x0 + s, y0 + s), (x0, y0 + s)]
    else:  # wide rectangle
        pts = [(x0, y0 + s * 0.3), (x0 + s, y0 + s * 0.3), (x0 + s, y0 + s * 0.7), (x0, y0 + s * 0.7)]
    return [round(float(v), 2) for p in pts for v in p]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros)."""
    flat = np.asfortranarray(mask).reshape(-1, order="F").astype(np.uint8)
    counts, prev, run = [], 0, 0
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def make_coco(out: Path, seed: int, n_train: int = 24, n_val: int = 8) -> None:
    from pycocotools import mask as mask_utils

    (out / "annotations").mkdir(parents=True, exist_ok=True)
    colours = {c["id"]: tuple(int(v) for v in np.random.default_rng([seed, c["id"]]).integers(30, 250, 3))
               for c in COCO_CATEGORIES}
    ann_id = 1
    for split, n, base_id in (("train2017", n_train, 1000), ("val2017", n_val, 5000)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for k in range(n):
            rng = np.random.default_rng([seed, base_id, k])
            w, h = _random_size(rng, 160, 320)
            img = _background(rng, w, h)
            draw = ImageDraw.Draw(img)
            image_id = base_id + k
            file_name = f"{image_id:012d}.jpg"
            empty = k in (n - 1, n - 2) if split == "train2017" else k == n - 1
            n_obj = 0 if empty else int(rng.integers(2, 5))
            for o in range(n_obj):
                cat = COCO_CATEGORIES[int(rng.integers(0, len(COCO_CATEGORIES)))]
                s = float(rng.uniform(0.25, 0.55) * min(w, h))
                x0, y0 = float(rng.uniform(0, w - s)), float(rng.uniform(0, h - s))
                poly = _polygon(rng, cat["id"], x0, y0, s)
                draw.polygon(list(zip(poly[0::2], poly[1::2])), fill=colours[cat["id"]])
                crowd = o == 0 and k % 5 == 3  # a few crowd regions, stored as RLE like COCO does
                rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
                if crowd:
                    segmentation = _uncompressed_rle(mask_utils.decode(rle))
                else:
                    segmentation = [poly]
                bx, by, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": cat["id"],
                    "bbox": [round(bx, 2), round(by, 2), round(bw, 2), round(bh, 2)],
                    "area": float(mask_utils.area(rle)), "iscrowd": int(crowd), "segmentation": segmentation,
                })
                ann_id += 1
            img.save(folder / file_name, **JPEG)
            images.append({"id": image_id, "file_name": file_name, "width": w, "height": h})
        doc = {
            "info": {"description": "mbv3-recipes toy COCO", "version": "1.0", "year": 2026},
            "licenses": [], "images": images, "annotations": annotations, "categories": COCO_CATEGORIES,
        }
        name = split.replace("2017", "")
        (out / "annotations" / f"instances_{name}2017.json").write_text(json.dumps(doc, sort_keys=True))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (replaced if it exists)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--coco-train", type=int, default=24, help="toy COCO training images (the toy detector "
                    "learns more from more: recipes/toy/detection.yaml's README figure used 96)")
    ap.add_argument("--coco-val", type=int, default=8, help="toy COCO validation images")
    args = ap.parse_args(argv)
    for sub in ("imagenet", "coco"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    make_imagenet(args.out / "imagenet", args.seed)
    make_coco(args.out / "coco", args.seed, args.coco_train, args.coco_val)
    print(f"toy data written to {args.out}")


if __name__ == "__main__":
    main()
