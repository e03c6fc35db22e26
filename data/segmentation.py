"""COCO with the 20 Pascal VOC categories, as torchvision's segmentation reference builds it.

The published conversion (references/segmentation/coco_utils.py):
- the VOC categories keep their COCO ids, remapped to 1..20 in CAT_LIST's order; every other
  annotation is dropped;
- each kept annotation (polygons, and the RLE of crowd regions) is rasterised with pycocotools;
  a pixel takes the class of the instance covering it, and pixels covered by more than one kept
  instance become 255 (ignored by the loss and the metric);
- training keeps the images whose kept annotations' `area` fields sum to more than 1000 (the
  reference sums the annotation file's areas, not rasterised pixels); validation keeps all.

Masks are computed once per image and cached as PNG files under a folder named by the SHA-256 of
the annotation file's bytes (and of the conversion rule), so a second epoch reads a small PNG
instead of redoing the pycocotools work, and an edited annotation file gets a new folder instead
of stale masks. Writes are atomic (temp file + rename), so loader workers and processes may share
the cache.

Transforms run on uint8 tensors in the loader workers; images leave the worker height-width-
channel (so the batch lands on the device in channels_last layout) and masks stay uint8 until the
device. The training transform draws the reference's random short side, flip and crop once per
sample from a generator seeded by (seed, epoch, index), then builds the crop in one pass: the
image is resized whole (antialiased bilinear, torch's uint8 kernel, within 2/255 of PIL's) and only
the crop window is copied out, mirrored if flipped, into a padded buffer; the mask is never resized
whole: the crop window's nearest-neighbour source rows and columns (PIL's rule, so the labels are
exactly the reference's) are gathered straight from the original mask, padding 255.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import io
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from data.classification import IMAGENET_MEAN, IMAGENET_STD, decode, decode_bytes
from data.shards import open_split
from engine import checkpoint
from engine.datacheck import size_mismatch
from engine.errors import DataError
from engine.seeding import sample_seed

# COCO category ids of the VOC classes, in VOC order (index = VOC class; 0 = background, no COCO id).
CAT_LIST = (0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72)
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tv")
NUM_CLASSES = len(CAT_LIST)
IGNORE_INDEX = 255
MIN_TRAIN_AREA = 1000
SPLITS = {"train": ("train2017", "annotations/instances_train2017.json"),
          "val": ("val2017", "annotations/instances_val2017.json")}
MASK_RULE = "coco-voc-v1"  # part of the cache key: change it if the conversion rule ever changes


@dataclasses.dataclass(frozen=True)
class SegmentationDataConfig:
    root: str                                   # COCO: train2017/, val2017/, annotations/instances_*2017.json
    batch_size: int                             # training images per process
    workers: int                                # loader processes per training process
    crop_size: int                              # random crop of the training image (padded if smaller)
    short_side: tuple[int, int]                 # training: short side drawn uniformly from [lo, hi]
    hflip: float                                # probability
    eval_size: int                              # evaluation: short side (520 published, 320 low-res)
    eval_batch_size: int = 1                    # images of equal size are batched: same numbers as batch 1
    mask_cache: Optional[str] = None            # None: $XDG_CACHE_HOME (or ~/.cache)/mbv3-recipes/coco-voc-masks
    format: Literal["folder", "shards"] = "folder"  # shards: data.root as tools/make_shards.py writes it
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def validate(self):
        for name in ("batch_size", "crop_size", "eval_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                yield name, f"expected a positive number, got {getattr(self, name)}"
        if self.workers < 0:
            yield "workers", f"expected >= 0, got {self.workers}"
        if not 0 < self.short_side[0] <= self.short_side[1]:
            yield "short_side", f"expected [lo, hi] with 0 < lo <= hi, got {list(self.short_side)}"
        if not 0 <= self.hflip <= 1:
            yield "hflip", f"expected a probability in [0, 1], got {self.hflip}"

    def cache_dir(self) -> Path:
        if self.mask_cache is not None:
            return Path(self.mask_cache)
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(base) / "mbv3-recipes" / "coco-voc-masks"


# ----------------------------------------------------------------------------- annotations -> masks


def read_annotations(ann_file: Path) -> tuple[dict, str]:
    """The parsed annotation file and its cache key (SHA-256 of its bytes and the conversion rule)."""
    try:
        raw = ann_file.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{ann_file}: annotation file not found") from None
    except OSError as exc:
        raise DataError(f"{ann_file}: cannot read the annotation file ({exc.strerror})") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{ann_file}: not a valid JSON annotation file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) \
            or not isinstance(doc.get("annotations"), list):
        raise DataError(f"{ann_file}: not a COCO instances file (expected 'images' and 'annotations' lists)")
    return doc, cache_key(raw)


def cache_key(raw: bytes) -> str:
    """Names the cache folder: the annotation file's bytes and the conversion rule."""
    return hashlib.sha256(raw + f"|{MASK_RULE}|{CAT_LIST}".encode()).hexdigest()[:16]


def split_files(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split under data.root."""
    folder, ann_rel = SPLITS[split]
    return Path(root) / folder, Path(root) / ann_rel


def cached_image_count(root: str | Path, split: str, cache_root: str | Path) -> int | None:
    """Images a split keeps, from the cache of an earlier run (None if there is none): lets
    --print-config count training steps without parsing the annotation file."""
    try:
        raw = split_files(root, split)[1].read_bytes()
        return int(json.loads((Path(cache_root) / f"{split}-{cache_key(raw)}" / "index.json").read_text())["images"])
    except (OSError, ValueError, KeyError):
        return None


def voc_annotations(annotations: list[dict]) -> list[dict]:
    """Keep the VOC categories; category_id becomes the VOC class 1..20 (copies, input untouched)."""
    index = {cat: i for i, cat in enumerate(CAT_LIST)}
    return [{**a, "category_id": index[a["category_id"]]} for a in annotations if a.get("category_id") in index]


def check_annotations(doc: dict, ann_file: Path) -> None:
    """What the conversion reads, checked up front (a loader worker would otherwise fail on it mid-epoch):
    each image's id, file_name, height and width, each id listed once; each VOC-category annotation's id,
    image_id (listed in 'images'), area, and segmentation (polygons of at least 3 points, or an RLE of
    the image's size). One DataError names the file and every bad image or annotation (the first 5)."""
    problems: list[str] = []
    sizes: dict = {}
    counts: Counter = Counter()
    for k, im in enumerate(doc["images"]):
        if not isinstance(im, dict):
            problems.append(f"images[{k}] is not an object")
            continue
        where = f"image {im['id']} ({im.get('file_name')})" if "id" in im else f"images[{k}]"
        if "id" in im:
            counts[im["id"]] += 1
        missing = [key for key in ("id", "file_name", "height", "width") if key not in im]
        h, w = im.get("height"), im.get("width")
        if missing:
            problems.append(f"{where} has no {', '.join(map(repr, missing))}")
        elif not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
            problems.append(f"{where}: height {h!r} and width {w!r} are not positive integers")
        else:
            sizes[im["id"]] = (h, w)
    problems += [f"image id {i} is listed {n} times in 'images'" for i, n in counts.items() if n > 1]
    voc = set(CAT_LIST[1:])
    for k, a in enumerate(doc["annotations"]):
        if not isinstance(a, dict):
            problems.append(f"annotations[{k}] is not an object")
            continue
        if a.get("category_id") not in voc:
            continue  # dropped by the conversion, never read
        where = f"annotation {a.get('id', f'annotations[{k}]')} (image {a.get('image_id')})"
        missing = [key for key in ("id", "image_id", "area", "segmentation") if key not in a]
        if missing:
            problems.append(f"{where} has no {', '.join(map(repr, missing))}")
        elif a["image_id"] not in sizes and a["image_id"] not in counts:
            problems.append(f"{where}: its image_id is not in 'images'")
        elif not isinstance(a["area"], (int, float)) or isinstance(a["area"], bool):
            problems.append(f"{where}: area {a['area']!r} is not a number")
        elif a["image_id"] in sizes:
            why = _segmentation_problem(a["segmentation"], sizes[a["image_id"]])
            if why:
                problems.append(f"{where}: {why}")
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        plural = "s" if len(problems) > 1 else ""
        raise DataError(f"{ann_file}: {len(problems)} problem{plural} with its images or annotations:\n  "
                        + "\n  ".join(problems[:5]) + more)


def _segmentation_problem(seg, size: tuple[int, int]) -> str | None:
    """Why pycocotools cannot rasterise `seg`, or None. (frPyObjects fails on a polygon of 1 point, and on
    one of 2, whose 4 numbers it takes for a box; one of an odd length silently gives an empty mask.)"""
    if isinstance(seg, dict):
        if "counts" not in seg or seg.get("size") != list(size):
            return (f"RLE segmentation with size {seg.get('size')!r} and {'' if 'counts' in seg else 'no '}"
                    f"'counts'; expected the image's size {list(size)} (height, width)")
        return None
    if not isinstance(seg, list) or not seg:
        return f"segmentation {str(seg)[:40]!r} is neither a list of polygons nor an RLE object"
    for j, poly in enumerate(seg):
        if not isinstance(poly, list):
            return (f"polygon {j} is a {type(poly).__name__}; expected a list of polygons "
                    "[[x1, y1, x2, y2, x3, y3, ...], ...]")
        if len(poly) < 6 or len(poly) % 2:
            return (f"polygon {j} has {len(poly)} coordinates; expected x, y pairs of at least 3 points "
                    "([x1, y1, x2, y2, x3, y3, ...])")
    return None


def keep_for_training(voc_anns: list[dict]) -> bool:
    """The reference's train filter: kept annotations whose `area` fields sum to > 1000 (none: 0)."""
    return sum(a["area"] for a in voc_anns) > MIN_TRAIN_AREA


def rasterise(voc_anns: list[dict], height: int, width: int) -> np.ndarray:
    """(height, width) uint8 label map: VOC class, 0 background, 255 where kept instances overlap."""
    from pycocotools import mask as coco_mask

    target = np.zeros((height, width), dtype=np.uint8)
    covered = np.zeros((height, width), dtype=bool)  # by some instance so far
    overlap = np.zeros((height, width), dtype=bool)  # by two or more: the reference's masks.sum(0) > 1, exact
    for a in voc_anns:
        seg = a["segmentation"]
        if isinstance(seg, dict) and isinstance(seg.get("counts"), str):  # compressed RLE: already pycocotools'
            rle = {"size": seg["size"], "counts": seg["counts"].encode()}  # (COCO's own files use uncompressed)
        else:  # polygons or uncompressed RLE, exactly as the reference converts them
            rle = coco_mask.frPyObjects(seg, height, width)
        m = coco_mask.decode(rle)
        if m.ndim == 3:  # one plane per polygon of the instance
            m = m.any(axis=2)
        m = m.astype(bool)
        np.maximum(target, np.where(m, np.uint8(a["category_id"]), np.uint8(0)), out=target)
        overlap |= covered & m  # (a uint8 counter would wrap to 0 at 256 instances)
        covered |= m
    target[overlap] = IGNORE_INDEX
    return target


class MaskCache:
    """PNG label maps in `root/<split>-<key>/<image id>.png`, computed on first use."""

    def __init__(self, root: Path, split: str, key: str):
        self.dir = Path(root) / f"{split}-{key}"

    def get(self, image_id: int, compute) -> torch.Tensor:
        path = self.dir / f"{image_id}.png"
        try:
            return io.decode_png(io.read_file(str(path)))[0]
        except (RuntimeError, OSError):  # not cached yet (or unreadable): compute and store
            pass
        mask = torch.from_numpy(compute())
        self._write(path, io.encode_png(mask[None]).numpy().tobytes())
        return mask

    def write_index(self, n_images: int) -> None:
        self._write(self.dir / "index.json", json.dumps({"images": n_images}).encode())

    def _write(self, path: Path, data: bytes) -> None:
        """Atomically (temp file + rename): concurrent writers of the same file write the same bytes."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as exc:
            raise DataError(f"data.mask_cache: cannot write to {self.dir} ({exc.strerror or exc})") from None
        try:
            os.fchmod(fd, checkpoint.file_mode())  # shared like the run's files, not mkstemp's 0600
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ----------------------------------------------------------------------------- transforms


def resized_hw(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's Resize(int): the short side becomes `short`, the long side int(short * long / short_old)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


def nearest_index(n_in: int, n_out: int, start: int, stop: int) -> torch.Tensor:
    """Source indices of output pixels [start, stop) of a nearest resize n_in -> n_out, exactly as
    PIL computes them (the reference resizes masks with PIL): pixel centres, floor((x + 0.5) * n_in /
    n_out), but accumulated step by step in double precision (Geometry.c ImagingScaleAffine), which
    lands one pixel lower than the closed form where the centre falls on an integer."""
    if n_in == n_out:  # PIL copies
        return torch.arange(start, stop)
    scale = n_in / n_out
    steps = np.full(stop, scale)
    steps[0] = scale * 0.5
    src = np.cumsum(steps)[start:stop].astype(np.int64)  # sequential sums, like `xo += a[0]`
    return torch.from_numpy(src).clamp_(max=n_in - 1)


def resize_image(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (h, w, 3), antialiased bilinear (PIL's filter, torch's uint8 kernel).
    The kernel runs on channels-last data (5x faster than on planar data here) and returns it so."""
    hwc = image.permute(1, 2, 0).contiguous()
    out = TF.resize(hwc.permute(2, 0, 1), list(hw), interpolation=InterpolationMode.BILINEAR, antialias=True)
    return out.permute(1, 2, 0)


class TrainTransform:
    """The reference's RandomResize(lo, hi) -> RandomHorizontalFlip -> RandomCrop(size, pad image 0,
    mask 255), on image and mask at once; `draw` and `apply` are separate so tests can replay draws."""

    def __init__(self, crop_size: int, short_side: tuple[int, int], hflip: float):
        self.size, self.lo, self.hi, self.hflip = crop_size, short_side[0], short_side[1], hflip

    def draw(self, height: int, width: int, g: torch.Generator) -> tuple[int, bool, int, int]:
        """(short side, flip, top, left) in the reference's order; the crop window as
        torchvision's RandomCrop.get_params draws it on the padded image."""
        short = int(torch.randint(self.lo, self.hi + 1, (1,), generator=g))
        flip = self.hflip > 0 and torch.rand(1, generator=g).item() < self.hflip
        h, w = resized_hw(height, width, short)
        ph, pw = max(h, self.size), max(w, self.size)
        if ph == self.size and pw == self.size:
            return short, flip, 0, 0
        top = int(torch.randint(0, ph - self.size + 1, (1,), generator=g))
        left = int(torch.randint(0, pw - self.size + 1, (1,), generator=g))
        return short, flip, top, left

    def apply(self, image: torch.Tensor, mask: torch.Tensor, short: int, flip: bool, top: int, left: int):
        """image uint8 (3, H, W), mask uint8 (H, W) -> uint8 (S, S, 3), uint8 (S, S)."""
        S = self.size
        H, W = mask.shape
        h, w = resized_hw(H, W, short)
        rows = (top, min(top + S, h))
        cols = (left, min(left + S, w))  # in the (flipped) resized image
        src_cols = (w - cols[1], w - cols[0]) if flip else cols  # the same columns before the flip
        img_out = torch.zeros((S, S, 3), dtype=torch.uint8)
        crop = resize_image(image, (h, w))[rows[0]:rows[1], src_cols[0]:src_cols[1]]
        rh, rw = crop.shape[:2]
        img_out[:rh, :rw] = crop.flip(1) if flip else crop
        mask_out = torch.full((S, S), IGNORE_INDEX, dtype=torch.uint8)
        r = nearest_index(H, h, *rows)
        c = nearest_index(W, w, *src_cols)
        if flip:
            c = c.flip(0)
        mask_out[:rh, :rw] = mask.index_select(0, r).index_select(1, c)
        return img_out, mask_out

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, g: torch.Generator):
        return self.apply(image, mask, *self.draw(*mask.shape, g))


class EvalTransform:
    """The reference's RandomResize(s, s): short side s, image bilinear (antialiased), mask nearest."""

    def __init__(self, eval_size: int):
        self.size = eval_size

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        H, W = mask.shape
        h, w = resized_hw(H, W, self.size)
        return resize_image(image, (h, w)), mask.index_select(0, nearest_index(H, h, 0, h)).index_select(
            1, nearest_index(W, w, 0, w))


# ----------------------------------------------------------------------------- dataset


class CocoVoc(Dataset):
    """COCO images with VOC label maps. Items are addressed by (epoch, index) keys (EpochSampler);
    training items are augmented from a generator seeded by sample_seed(seed, epoch, index).
    An item is (image uint8 (h, w, 3), mask uint8 (h, w))."""

    def __init__(self, root: str | Path, split: str, transform, seed: int, cache_root: str | Path,
                 data_format: str = "folder"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.root: {self.root} does not exist")
        self.image_dir, self.ann_file = split_files(root, split)
        self.split, self.train, self.transform, self.seed = split, split == "train", transform, seed
        doc, key = read_annotations(self.ann_file)
        check_annotations(doc, self.ann_file)
        by_image: dict[int, list[dict]] = {}
        for a in voc_annotations(doc["annotations"]):
            by_image.setdefault(a["image_id"], []).append(
                {k: a[k] for k in ("id", "category_id", "segmentation", "area")})
        if not by_image:
            cats = sorted({a.get("category_id") for a in doc["annotations"]}, key=str)
            raise DataError(f"{self.ann_file}: no annotation of a VOC category (COCO ids {list(CAT_LIST[1:])}); "
                            f"the file's annotations use category ids {cats[:20]}")
        images = sorted(doc["images"], key=lambda im: im["id"])
        if self.train:
            images = [im for im in images if keep_for_training(by_image.get(im["id"], []))]
        if not images:
            raise DataError(f"{self.ann_file}: no image left (training keeps images whose VOC annotations "
                            f"cover more than {MIN_TRAIN_AREA} px)")
        # per item only what the worker needs, so forked workers share little else
        self.images = [(im["id"], im["file_name"], int(im["height"]), int(im["width"])) for im in images]
        self.anns = {im[0]: by_image.get(im[0], []) for im in self.images}
        self.shards = open_split(self.image_dir, data_format, "files")  # None: the folder's files
        if self.shards is not None:  # item -> its shard sample (by file name, image id checked)
            self.in_shards = self.shards.match([im[1] for im in self.images], [im[0] for im in self.images],
                                               self.ann_file)
        self.cache = MaskCache(Path(cache_root), split, key)
        self.cache.write_index(len(self.images))

    def __len__(self) -> int:
        return len(self.images)

    def paths(self) -> list[str]:
        if self.shards is not None:
            return [self.shards.name(k) for k in self.in_shards]
        return [str(self.image_dir / name) for _, name, _, _ in self.images]

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each image as the annotation file states it."""
        return [(h, w) for _, _, h, w in self.images]

    def mask(self, index: int) -> torch.Tensor:
        image_id, file_name, h, w = self.images[index]

        def compute() -> np.ndarray:
            try:
                return rasterise(self.anns[image_id], h, w)
            except (IndexError, KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{self.ann_file}: image {image_id} ({file_name}): cannot rasterise its "
                                f"segmentation ({type(exc).__name__}: {exc})") from None

        return self.cache.get(image_id, compute)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded image (3, H, W) and its label map (H, W), both uint8, sizes checked."""
        _, file_name, h, w = self.images[index]
        if self.shards is not None:
            path = self.shards.name(self.in_shards[index])
            image = decode_bytes(self.shards.read(self.in_shards[index]), path)
        else:
            path = self.image_dir / file_name
            if not path.is_file():
                raise DataError(f"{path}: image file not found (listed in {self.ann_file})")
            image = decode(str(path))
        if tuple(image.shape[1:]) != (h, w):
            raise size_mismatch(path, tuple(image.shape[1:]), (h, w), self.ann_file)
        return image, self.mask(index)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, mask = self.load(index)
        if not self.train:
            return self.transform(image, mask)
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
        return self.transform(image, mask, g)


class SizeGroupedBatches(Sampler):
    """Evaluation batches: this rank's images (rank, rank + world, ...; each image once, no padding)
    grouped by their resized size, so a batch needs no padding and scores exactly as batch size 1."""

    def __init__(self, sizes: list[tuple[int, int]], eval_size: int, batch_size: int, rank: int = 0, world: int = 1):
        groups: dict[tuple[int, int], list[int]] = {}
        for i in range(rank, len(sizes), world):
            groups.setdefault(resized_hw(*sizes[i], eval_size), []).append(i)
        self.batches = [g[k:k + batch_size] for g in groups.values() for k in range(0, len(g), batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter([[(0, i) for i in b] for b in self.batches])

    def __len__(self) -> int:
        return len(self.batches)


# ----------------------------------------------------------------------------- pictures for TensorBoard


def voc_palette(n: int = NUM_CLASSES) -> list[tuple[int, int, int]]:
    """Pascal VOC's colour map (bits of the class index spread over the high bits of R, G, B)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def overlay(image_hwc: torch.Tensor, labels: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """uint8 (3, H, W): the label map's classes (background and 255 left clear) blended over the image."""
    from torchvision.utils import draw_segmentation_masks

    classes = torch.arange(1, NUM_CLASSES, device=labels.device)[:, None, None]
    masks = labels[None].long() == classes
    return draw_segmentation_masks(image_hwc.permute(2, 0, 1).cpu(), masks.cpu(), alpha=alpha,
                                   colors=voc_palette()[1:])
