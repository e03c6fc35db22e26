"""COCO detection for Faster R-CNN: dataset, aspect-ratio grouped batches, uint8 collate, COCO evaluation.

What torchvision's reference did (references/detection, Jan-Feb 2021), and how it is done here:
- Train keeps images with at least one annotation whose box is wider and taller than 1 px (crowd
  annotations count for that test, as in the reference's `_coco_remove_images_without_annotations`);
  targets drop crowd annotations, clamp boxes to the image and drop empty ones. Val keeps every image.
- Labels are COCO category ids (1..90; 91 classes with background 0).
- The only augmentation is a horizontal flip (p 0.5). Its coin comes from a generator seeded by
  engine.seeding.sample_seed(seed, epoch, index), not the global RNG, so a resumed or re-sharded
  run flips exactly the images the original run flipped.
- Resizing and normalization happen inside the model (GeneralizedRCNNTransform). Images therefore
  travel as uint8 (C, H, W) tensors from the decoder to the device and become float there (4x less
  host memory traffic, pinning and transfer than the reference's float tensors).
- Batches are grouped by aspect ratio (factor 3: bins 2 ** linspace(-1, 1, 7)) with the reference's
  GroupedBatchSampler algorithm, over a per-(seed, epoch) shuffled, per-rank shard.
- Evaluation: COCO bbox on the original annotation file with faster-coco-eval (C++; identical
  twelve numbers to pycocotools, tested), detections gathered from every rank to rank 0, each val
  image counted once.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch.utils.data import Dataset, DistributedSampler
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from data.classification import decode, decode_bytes
from data.shards import open_split
from engine.datacheck import size_mismatch
from engine.errors import DataError
from engine.loop import EpochBatches
from engine.preemption import data_loader
from engine.seeding import sample_seed

SPLITS = ("train", "val")


@dataclasses.dataclass(frozen=True)
class DetectionDataConfig:
    root: str                            # annotations/instances_{train,val}2017.json, train2017/, val2017/
    batch_size: int                      # training images per process (evaluation is always 1 per process)
    workers: int                         # loader processes per training process
    hflip: float                         # probability of the horizontal flip
    aspect_ratio_group_factor: int       # k: 2k+1 bin edges 2 ** linspace(-1, 1, 2k+1); -1: no grouping
    box_margin: float = 1.0              # px a box may reach beyond the image (clamped, as the reference
                                         # does); a box further out is an error in the annotation file
    format: Literal["folder", "shards"] = "folder"  # shards: data.root as tools/make_shards.py writes it

    def validate(self):
        if self.batch_size <= 0:
            yield "batch_size", f"expected a positive per-process batch size, got {self.batch_size}"
        if self.workers < 0:
            yield "workers", f"expected >= 0, got {self.workers}"
        if not 0 <= self.hflip <= 1:
            yield "hflip", f"expected a probability in [0, 1], got {self.hflip}"
        if self.aspect_ratio_group_factor < -1:
            yield "aspect_ratio_group_factor", \
                f"expected -1 (off) or k >= 0, got {self.aspect_ratio_group_factor}"
        if self.box_margin < 0:
            yield "box_margin", f"expected >= 0 px, got {self.box_margin}"


def split_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of a split under data.root."""
    root = Path(root)
    return root / "annotations" / f"instances_{split}2017.json", root / f"{split}2017"


# ----------------------------------------------------------------------------- annotations


@dataclasses.dataclass
class Annotations:
    """A validated COCO instances file: images sorted by id, their boxes (xyxy, clamped) per image."""

    path: Path
    image_ids: list[int]
    files: list[str]
    sizes: list[tuple[int, int]]          # (height, width) as the file states them
    boxes: list[np.ndarray]               # float32 (n, 4) xyxy, clamped to the image, crowd excluded
    labels: list[np.ndarray]              # int64 (n,)
    usable: list[bool]                    # the reference's train filter (see module docstring)
    categories: dict[int, str]


def _not_coco(path: Path, why: str) -> DataError:
    return DataError(f"{path}: not a COCO instances file ({why}; expected a JSON object with 'images' "
                     "[{id, file_name, width, height}], 'annotations' [{id, image_id, category_id, "
                     "bbox [x, y, w, h], iscrowd}] and 'categories' [{id, name}])")


def read_annotations(path: str | Path, box_margin: float = 1.0) -> Annotations:
    """Parse and check a COCO instances file; every problem is a DataError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found (expected data.root/annotations/{path.name})")
    try:
        doc = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _not_coco(path, f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _not_coco(path, f"the top level is a {type(doc).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    if missing:
        raise _not_coco(path, f"no {', '.join(repr(k) for k in missing)} list")
    try:
        images = {int(im["id"]): (str(im["file_name"]), int(im["height"]), int(im["width"]))
                  for im in doc["images"]}
        categories = {int(c["id"]): str(c["name"]) for c in doc["categories"]}
        anns = [(int(a["id"]), int(a["image_id"]), int(a["category_id"]), [float(v) for v in a["bbox"]],
                 int(a.get("iscrowd", 0))) for a in doc["annotations"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise _not_coco(path, f"an entry lacks or mistypes {exc}") from None
    if len(images) != len(doc["images"]):
        twice = sorted(i for i, n in Counter(int(im["id"]) for im in doc["images"]).items() if n > 1)
        raise DataError(f"{path}: 'images' lists image id{'s' if len(twice) > 1 else ''} "
                        f"{', '.join(map(str, twice[:10]))} more than once (each image must be listed once)")

    per_image: dict[int, list] = defaultdict(list)
    problems: list[str] = []
    for ann_id, image_id, cat, bbox, crowd in anns:
        if image_id not in images:
            problems.append(f"annotation {ann_id} refers to image {image_id}, which 'images' does not list")
            continue
        if cat not in categories:
            problems.append(f"annotation {ann_id} has category_id {cat}, which 'categories' does not list")
            continue
        if len(bbox) != 4 or not all(math.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
            problems.append(f"annotation {ann_id}: bbox {bbox} is not [x, y, width >= 0, height >= 0]")
            continue
        _, h, w = images[image_id]
        x, y, bw, bh = bbox
        m = box_margin
        if x < -m or y < -m or x + bw > w + m or y + bh > h + m:
            problems.append(f"annotation {ann_id}: bbox [x, y, w, h] = {bbox} lies outside its image "
                            f"{image_id} ({w} x {h} px) by more than data.box_margin {m:g} px")
            continue
        per_image[image_id].append((bbox, cat, crowd))
    if problems:
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise DataError(f"{path}: {len(problems)} bad annotation{'s' if len(problems) > 1 else ''}:\n  "
                        + "\n  ".join(problems[:5]) + more)

    out = Annotations(path, [], [], [], [], [], [], categories)
    for image_id in sorted(images):  # the reference's CocoDetection order: sorted image ids
        file_name, h, w = images[image_id]
        entries = per_image.get(image_id, [])
        # Reference train filter: some annotation (crowd or not) has a box wider and taller than 1 px.
        usable = any(bw > 1 and bh > 1 for (_, _, bw, bh), _, _ in entries)
        kept = [(b, c) for b, c, crowd in entries if not crowd]
        boxes = np.array([b for b, _ in kept], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        out.image_ids.append(image_id)
        out.files.append(file_name)
        out.sizes.append((h, w))
        out.boxes.append(boxes[keep])
        out.labels.append(np.array([c for _, c in kept], dtype=np.int64)[keep])
        out.usable.append(usable)
    return out


# ----------------------------------------------------------------------------- dataset


class CocoDetection(Dataset):
    """COCO images as uint8 (3, H, W) tensors with targets {boxes (n, 4) xyxy float32, labels (n,) int64,
    image_id}. Training items are addressed by (epoch, index) keys so the flip is seeded per sample."""

    def __init__(self, root: str | Path, split: str, train: bool, hflip: float, seed: int,
                 box_margin: float = 1.0, annotations: Annotations | None = None, data_format: str = "folder"):
        self.ann_file, self.image_dir = split_paths(root, split)
        if not Path(root).is_dir():
            raise DataError(f"data.root: {root} does not exist")
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image folder not found (expected data.root/{split}2017/ with "
                            f"the images that {self.ann_file.name} lists)")
        self.ann = annotations or read_annotations(self.ann_file, box_margin)
        self.shards = open_split(self.image_dir, data_format, "files")  # None: the folder's files
        on_disk = set(os.listdir(self.image_dir)) if self.shards is None else set(self.shards.names)
        absent = [f for f in self.ann.files if f not in on_disk]
        if absent:
            raise DataError(f"{self.ann_file}: lists {len(absent)} image{'s' if len(absent) > 1 else ''} "
                            f"that {self.image_dir} does not have, e.g. {self.image_dir / absent[0]}")
        # Train: the reference's filter; val: every image (COCO's metric counts all 5000).
        every = range(len(self.ann.files))
        self.indices = [i for i in every if self.ann.usable[i]] if train else list(every)
        if not self.indices:
            raise DataError(f"{self.ann_file}: no image has a usable annotation (a box wider and taller "
                            "than 1 px)")
        if not train and not any(len(b) for b in self.ann.boxes):  # COCOeval would report -1 ("no data")
            raise DataError(f"{self.ann_file}: the validation set has no annotations (no box that is not "
                            "iscrowd), so its box mAP is undefined; expected the instances file of the "
                            "validation images with their ground-truth boxes")
        self.train, self.hflip, self.seed = train, hflip, seed
        if self.shards is not None:  # annotation entry j -> its shard sample (by file name, image id checked)
            self.in_shards = self.shards.match(self.ann.files, self.ann.image_ids, self.ann_file)

    def __len__(self) -> int:
        return len(self.indices)

    def paths(self) -> list[str]:
        if self.shards is not None:
            return [self.shards.name(self.in_shards[j]) for j in self.indices]
        return [str(self.image_dir / self.ann.files[j]) for j in self.indices]

    def image_id(self, i: int) -> int:
        return self.ann.image_ids[self.indices[i]]

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each item, as the annotation file states it."""
        return [self.ann.sizes[j] for j in self.indices]

    def load(self, i: int) -> torch.Tensor:
        """Item i's image, decoded (uint8 (3, H, W)) and checked against the annotation file's size."""
        j = self.indices[i]
        if self.shards is None:
            path = self.image_dir / self.ann.files[j]
            image = decode(str(path))
        else:
            path = self.shards.name(self.in_shards[j])
            image = decode_bytes(self.shards.read(self.in_shards[j]), path)
        if tuple(image.shape[1:]) != self.ann.sizes[j]:
            raise size_mismatch(path, tuple(image.shape[1:]), self.ann.sizes[j], self.ann_file)
        return image

    def aspect_ratios(self) -> list[float]:
        """width / height of each item, from the annotation file (no image is opened): the reference's
        COCO path (_compute_aspect_ratios_coco_dataset). The bins are symmetric around 1, so only images
        exactly on an edge (1:1, 1:2, 2:1) land in another group than with height / width."""
        return [w / h for h, w in (self.ann.sizes[j] for j in self.indices)]

    def __getitem__(self, key: int | tuple[int, int]):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        j = self.indices[i]
        image = self.load(i)
        h, w = self.ann.sizes[j]
        boxes = torch.from_numpy(self.ann.boxes[j])
        if self.train and self.hflip > 0:
            coin = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
            if torch.rand(1, generator=coin).item() < self.hflip:
                image = F.horizontal_flip(image)
                boxes = F.horizontal_flip(tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)))
                boxes = boxes.as_subclass(torch.Tensor)
        labels = torch.from_numpy(self.ann.labels[j])
        target = {"boxes": boxes, "labels": labels, "image_id": self.ann.image_ids[j]}
        return image, target


def collate(batch: Sequence) -> tuple[list[torch.Tensor], list[dict]]:
    """Images stay a list of uint8 tensors of their own sizes (the model pads and resizes them)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def to_device(images: list[torch.Tensor], targets: list[dict] | None, device: torch.device):
    """uint8 -> float [0, 1] on the device (what the model's transform expects); targets follow."""
    images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    if targets is not None:
        targets = [{"boxes": t["boxes"].to(device, non_blocking=True),
                    "labels": t["labels"].to(device, non_blocking=True)} for t in targets]
    return images, targets


# ----------------------------------------------------------------------------- sampling


def aspect_ratio_groups(aspect_ratios: Sequence[float], k: int) -> list[int]:
    """The reference's create_aspect_ratio_groups: bisect into bins 2 ** linspace(-1, 1, 2k+1)."""
    bins = sorted((2 ** np.linspace(-1, 1, 2 * k + 1)).tolist()) if k > 0 else [1.0]
    return [bisect.bisect_right(bins, r) for r in aspect_ratios]


class GroupedBatchSampler:
    """Batches of (epoch, index) keys whose images share an aspect-ratio group.

    The order within an epoch is DistributedSampler's (shuffled by seed + epoch, padded, rank's shard),
    so it depends on (seed, epoch, rank, world size) only, never on the global RNG. Grouping is the
    reference's GroupedBatchSampler algorithm: walk the shard, emit a group's buffer when it holds
    batch_size items; at the end, top up the fullest leftover buffers (ties in the reference's order)
    with the group's samples of the epoch, repeated if too few (its _repeat_to_at_least), so that there
    are always len(shard) // batch_size full batches. group_ids None: plain
    consecutive batches of the shard (drop_last, as the reference without grouping).
    """

    def __init__(self, group_ids: list[int] | None, n: int, batch_size: int, rank: int, world_size: int,
                 seed: int):
        self.group_ids, self.batch_size, self.epoch = group_ids, batch_size, 0
        self._shard = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                         seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._shard.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self._shard) // self.batch_size

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return ([(self.epoch, i) for i in batch] for batch in self.index_batches())

    def index_batches(self) -> Iterator[list[int]]:
        order = list(self._shard)
        if self.group_ids is None:
            for b in range(len(self)):
                yield order[b * self.batch_size:(b + 1) * self.batch_size]
            return
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        emitted = 0
        for i in order:
            g = self.group_ids[i]
            buffers[g].append(i)
            seen[g].append(i)
            if len(buffers[g]) == self.batch_size:
                yield buffers.pop(g)
                # The reference's defaultdict re-creates the emptied buffer at once (its assert reads it),
                # at the end of the dict: that place orders equal-sized leftovers below (a stable sort).
                buffers[g] = []
                emitted += 1
        remaining = len(self) - emitted
        for g, buf in sorted(buffers.items(), key=lambda kv: len(kv[1]), reverse=True):
            if remaining <= 0:
                break
            need = self.batch_size - len(buf)
            yield buf + (seen[g] * -(-need // len(seen[g])))[:need]  # the reference's _repeat_to_at_least
            remaining -= 1


class EvalShard:
    """Val indices rank, rank + world, ...: every image exactly once across ranks, no padding."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = range(rank, n, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ----------------------------------------------------------------------------- evaluation

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def detection_rows(image_id: int, output: dict) -> np.ndarray:
    """One image's model output as float64 rows [image_id, x, y, w, h, score, category_id] (boxes in
    the original image's pixels: the model's transform already mapped them back)."""
    boxes = output["boxes"].detach().float().cpu()
    rows = np.empty((len(boxes), 7), dtype=np.float64)
    rows[:, 0] = image_id
    rows[:, 1:3] = boxes[:, :2].numpy()
    rows[:, 3:5] = (boxes[:, 2:] - boxes[:, :2]).numpy()
    rows[:, 5] = output["scores"].detach().float().cpu().numpy()
    rows[:, 6] = output["labels"].cpu().numpy()
    return rows


def gather_rows(rows: list[np.ndarray], world_size: int) -> np.ndarray | None:
    """Every rank's detections on rank 0 (None elsewhere), sorted by image id (stable, so each image keeps
    the model's order): the result and the file do not depend on the number of ranks."""
    local = np.concatenate(rows) if rows else np.empty((0, 7))
    if world_size > 1:
        parts = [None] * world_size if torch.distributed.get_rank() == 0 else None
        torch.distributed.gather_object(local, parts, dst=0)
        if parts is None:
            return None
        local = np.concatenate(parts)
    return local[np.argsort(local[:, 0], kind="stable")]


def to_results(rows: np.ndarray) -> list[dict]:
    """COCO results format: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]."""
    return [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [float(v) for v in r[1:5]],
             "score": float(r[5])} for r in rows]


def bbox_metrics(stats: Sequence[float]) -> dict:
    """The detection entries of a metrics row from the twelve stats, in percent. COCOeval's "no data"
    sentinel (-1: no ground truth in that area range) becomes None (JSON null), never a number."""
    defined = [None if v < 0 else float(v) for v in stats]
    percent = [None if v is None else 100.0 * v for v in defined]
    return {"bbox_map": percent[0], "bbox_stats": defined,
            **{f"bbox_{k}": v for k, v in zip(STAT_NAMES[1:6], percent[1:])}}


def _quiet(*args, **kwargs) -> None:
    pass


def coco_ground_truth(ann_file: str | Path) -> COCO:
    """The original annotation file as faster-coco-eval's COCO (load once, evaluate every epoch)."""
    return COCO(str(ann_file), print_function=_quiet)


def coco_bbox_stats(gt: COCO | str | Path, results: list[dict],
                    image_ids: Sequence[int] | None = None) -> list[float]:
    """The twelve COCO bbox stats (fractions; -1 where undefined) with faster-coco-eval: AP, AP50, AP75,
    AP small/medium/large, AR@1, AR@10, AR@100, AR small/medium/large (STAT_NAMES).

    gt: the original annotation file (or its coco_ground_truth). image_ids: the images evaluated
    (default: every image of the file, as a full val pass does).
    """
    if not isinstance(gt, COCO):
        gt = coco_ground_truth(gt)
    dt = gt.loadRes([dict(r) for r in results])  # loadRes adds keys to the dicts it gets: copies
    ev = COCOeval_faster(gt, dt, "bbox", print_function=_quiet)
    if image_ids is not None:
        ev.params.imgIds = list(image_ids)
    ev.evaluate()  # faster-coco-eval accumulates here too (separate_eval=False): no accumulate() call needed
    ev.summarize()
    return [float(v) for v in ev.stats[:12]]


# ----------------------------------------------------------------------------- loaders


def _generator() -> torch.Generator:
    # A DataLoader draws its workers' base seed from `generator` whenever an iterator starts; with the
    # global RNG that draw would shift the RPN/ROI samplers' draws in a resumed run. Nothing here
    # uses the worker seed (the flip is seeded per sample), so a fixed one is exact.
    return torch.Generator().manual_seed(0)


def make_train_loader(dataset: CocoDetection, batch_size: int, group_factor: int, rank: int, world_size: int,
                      seed: int, workers: int, pin_memory: bool):
    """Aspect-ratio grouped, resumable (engine.loop.EpochBatches) batches of uint8 images."""
    groups = aspect_ratio_groups(dataset.aspect_ratios(), group_factor) if group_factor >= 0 else None
    sampler = GroupedBatchSampler(groups, len(dataset), batch_size, rank, world_size, seed)
    return data_loader(dataset, batch_sampler=EpochBatches(batch_sampler=sampler), collate_fn=collate,
                       num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                       generator=_generator())


def make_eval_loader(dataset: CocoDetection, rank: int, world_size: int, workers: int, pin_memory: bool):
    """Batch 1 (as the published numbers were measured), each image on exactly one rank."""
    return data_loader(dataset, batch_size=1, sampler=EvalShard(len(dataset), rank, world_size),
                       collate_fn=collate, num_workers=workers, pin_memory=pin_memory,
                       persistent_workers=workers > 0, generator=_generator())
