"""data/detection.py against oracles: torchvision's reference filtering and grouping (transcribed below from
references/detection, Jan-Feb 2021), pycocotools' COCOeval, and plain formulas."""

import bisect
import contextlib
import copy
import io
import json
import math
import shutil
from collections import defaultdict
from itertools import chain, repeat

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DistributedSampler

from data.detection import (CocoDetection, GroupedBatchSampler, aspect_ratio_groups, coco_bbox_stats, collate,
                            make_train_loader, read_annotations, to_device)
from engine.errors import DataError
from engine.loop import EpochBatches

# ----------------------------------------------------------------------------- the reference, transcribed


def ref_has_valid_annotation(anno):  # coco_utils._coco_remove_images_without_annotations
    if len(anno) == 0:
        return False
    return not all(any(o <= 1 for o in obj["bbox"][2:]) for obj in anno)


def ref_target(anno, w, h):  # coco_utils.ConvertCocoPolysToMask, boxes and labels
    anno = [obj for obj in anno if obj["iscrowd"] == 0]
    boxes = torch.as_tensor([obj["bbox"] for obj in anno], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=w)
    boxes[:, 1::2].clamp_(min=0, max=h)
    classes = torch.tensor([obj["category_id"] for obj in anno], dtype=torch.int64)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return boxes[keep], classes[keep]


def ref_quantize(aspect_ratios, k):  # group_by_aspect_ratio.create_aspect_ratio_groups
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    bins = sorted(copy.deepcopy(bins))
    return [bisect.bisect_right(bins, y) for y in aspect_ratios]


def _repeat_to_at_least(iterable, n):  # group_by_aspect_ratio._repeat_to_at_least
    repeat_times = math.ceil(n / len(iterable))
    repeated = chain.from_iterable(repeat(iterable, repeat_times))
    return list(repeated)


def ref_grouped_batches(sampler, group_ids, batch_size):  # group_by_aspect_ratio.GroupedBatchSampler.__iter__
    """The reference, line for line: its assert re-creates an emptied group's buffer at the end of the
    defaultdict (which orders equal-sized leftovers), and leftovers are refilled by repetition."""
    buffer_per_group, samples_per_group = defaultdict(list), defaultdict(list)
    num_batches, out = 0, []
    for idx in sampler:
        group_id = group_ids[idx]
        buffer_per_group[group_id].append(idx)
        samples_per_group[group_id].append(idx)
        if len(buffer_per_group[group_id]) == batch_size:
            out.append(buffer_per_group[group_id])
            num_batches += 1
            del buffer_per_group[group_id]
        assert len(buffer_per_group[group_id]) < batch_size
    expected_num_batches = len(sampler) // batch_size
    num_remaining = expected_num_batches - num_batches
    if num_remaining > 0:
        for group_id, _ in sorted(buffer_per_group.items(), key=lambda x: len(x[1]), reverse=True):
            remaining = batch_size - len(buffer_per_group[group_id])
            samples_from_group_id = _repeat_to_at_least(samples_per_group[group_id], remaining)
            buffer_per_group[group_id].extend(samples_from_group_id[:remaining])
            assert len(buffer_per_group[group_id]) == batch_size
            out.append(buffer_per_group[group_id])
            num_remaining -= 1
            if num_remaining == 0:
                break
    assert num_remaining == 0
    return out


# ----------------------------------------------------------------------------- a hand-made COCO set


def write_coco(root, images, annotations, split="train", categories=None):
    """images: [(id, w, h)]; annotations: [(image_id, category_id, [x, y, w, h], iscrowd)]."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for image_id, w, h in images:
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{split}2017" / f"{image_id}.jpg")
    doc = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, w, h in images],
           "annotations": [{"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd,
                            "area": 1.0} for n, (i, c, b, crowd) in enumerate(annotations)],
           "categories": categories or [{"id": c, "name": f"c{c}"} for c in (1, 3, 18, 90)]}
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(doc))
    return path


CASES = (
    [(7, 40, 30), (3, 50, 40), (5, 40, 40), (1, 30, 40), (2, 40, 30), (4, 40, 30), (6, 40, 30)],
    [(7, 1, [2, 3, 10, 12], 0), (7, 3, [20, 5, 8, 9], 0), (7, 18, [0, 0, 40, 30], 1),  # crowd: not a target
     # 3: no annotation at all -> dropped from train, kept in val
     (5, 1, [4, 4, 1, 9], 0), (5, 3, [10, 10, 0.5, 0.5], 0),                   # only boxes <= 1 px: dropped
     (1, 90, [3, 3, 10, 10], 1),                                               # only a crowd box: kept, empty
     (2, 1, [5, 5, 1.0, 10], 0), (2, 3, [10, 2, 10, 10], 0),                   # a 1-px-wide box stays
     (4, 18, [30.5, 2, 10, 10], 0),                                            # 0.5 px past the edge: clamped
     (6, 1, [5, 5, 0, 10], 0), (6, 3, [1, 1, 30, 20], 0)],                     # zero-width box: dropped
)


def test_train_filter_and_targets_match_the_reference(tmp_path):
    ann_file = write_coco(tmp_path, *CASES)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    ids = sorted(coco.imgs)
    keep = [i for i in ids if ref_has_valid_annotation(coco.loadAnns(coco.getAnnIds(imgIds=i, iscrowd=None)))]
    assert keep == [1, 2, 4, 6, 7]  # the oracle itself: 3 (no annotation) and 5 (degenerate) dropped

    train = CocoDetection(tmp_path, "train", train=True, hflip=0.0, seed=0)
    assert [train.image_id(i) for i in range(len(train))] == keep
    for i, image_id in enumerate(keep):
        image, target = train[(0, i)]
        info = coco.imgs[image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        boxes, labels = ref_target(anns, info["width"], info["height"])
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, info["height"], info["width"])
        assert target["image_id"] == image_id
        assert torch.equal(target["boxes"], boxes) and torch.equal(target["labels"], labels)
    assert len(train[(0, 0)][1]["boxes"]) == 0          # image 1: only a crowd box
    assert train[(0, 2)][1]["boxes"][0, 2] == 40         # image 4: clamped to the width
    assert train[(0, 4)][1]["labels"].tolist() == [1, 3]  # image 7: the crowd box is gone

    val = CocoDetection(tmp_path, "train", train=False, hflip=0.5, seed=0)
    assert [val.image_id(i) for i in range(len(val))] == ids  # validation keeps every image


def test_toy_train_set_matches_the_reference(toy_data):
    ann_file = toy_data / "coco/annotations/instances_train2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    keep = [i for i in sorted(coco.imgs) if ref_has_valid_annotation(coco.loadAnns(coco.getAnnIds(imgIds=i)))]
    ds = CocoDetection(toy_data / "coco", "train", train=True, hflip=0.0, seed=0)
    assert [ds.image_id(i) for i in range(len(ds))] == keep and len(keep) < len(coco.imgs)
    crowd_images = {a["image_id"] for a in coco.anns.values() if a["iscrowd"]}
    assert crowd_images & set(keep)  # the toy set exercises crowd removal
    for i, image_id in enumerate(keep):
        info = coco.imgs[image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        boxes, labels = ref_target(anns, info["width"], info["height"])
        _, target = ds[(0, i)]
        assert torch.equal(target["boxes"], boxes) and torch.equal(target["labels"], labels)


def test_flip_is_seeded_per_sample_and_moves_the_boxes(toy_data):
    plain = CocoDetection(toy_data / "coco", "train", train=True, hflip=0.0, seed=0)
    ds = CocoDetection(toy_data / "coco", "train", train=True, hflip=0.5, seed=3)
    keys = [(e, i) for e in range(2) for i in range(len(ds))]
    first = {k: ds[k] for k in keys}
    torch.manual_seed(1234)  # the global RNG plays no part
    again = {k: ds[k] for k in reversed(keys)}
    flips = 0
    for k in keys:
        (image, target), (image2, target2) = first[k], again[k]
        assert torch.equal(image, image2) and torch.equal(target["boxes"], target2["boxes"])
        ref_image, ref_target_ = plain[k]
        width = ref_image.shape[-1]
        if torch.equal(image, ref_image):
            assert torch.equal(target["boxes"], ref_target_["boxes"])
        else:
            flips += 1
            assert torch.equal(image, ref_image.flip(-1))
            expected = ref_target_["boxes"].clone()
            expected[:, [0, 2]] = width - ref_target_["boxes"][:, [2, 0]]  # the reference's xyxy flip
            assert torch.equal(target["boxes"], expected)
        assert torch.equal(target["labels"], ref_target_["labels"])
    assert 0.3 * len(keys) < flips < 0.7 * len(keys)
    other_seed = CocoDetection(toy_data / "coco", "train", train=True, hflip=0.5, seed=4)
    assert any(not torch.equal(other_seed[k][0], first[k][0]) for k in keys)


def test_aspect_ratio_groups_match_the_reference():
    rng = np.random.default_rng(0)
    ratios = np.exp(rng.uniform(np.log(0.3), np.log(3.0), 500)).tolist() + [0.5, 1.0, 2.0, 2 ** (1 / 3)]
    for k in (0, 1, 3):
        assert aspect_ratio_groups(ratios, k) == ref_quantize(ratios, k)
    assert sorted(set(aspect_ratio_groups(ratios, 3))) == list(range(8))


@pytest.mark.parametrize("world,batch", [(1, 2), (2, 2), (3, 4)])
def test_grouped_batches_are_the_references_on_a_seeded_shard(world, batch):
    rng = np.random.default_rng(1)
    ratios = np.exp(rng.uniform(np.log(0.4), np.log(2.5), 203)).tolist()
    groups = aspect_ratio_groups(ratios, 3)
    n = len(ratios)
    seen = []
    for epoch in (0, 1, 5):
        for rank in range(world):
            ours = GroupedBatchSampler(groups, n, batch, rank, world, seed=7)
            ours.set_epoch(epoch)
            shard = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=7)
            shard.set_epoch(epoch)
            ref = ref_grouped_batches(list(shard), groups, batch)
            got = list(ours)
            assert [[i for _, i in b] for b in got] == ref
            assert all(e == epoch for b in got for e, _ in b) and len(got) == len(ours) == len(shard) // batch
            # purity: every batch the reference makes from full buffers is single-group, and so is ours
            pure = sum(len({groups[i] for _, i in b}) == 1 for b in got)
            assert pure == sum(len({groups[i] for i in b}) == 1 for b in ref) == len(got)
            seen.append([i for b in ref for i in b])
    assert seen[0] != seen[world]  # another epoch, another order


def test_grouped_batches_are_deterministic_and_resume_mid_epoch():
    groups = aspect_ratio_groups(np.linspace(0.4, 2.4, 60).tolist(), 3)
    a, b = GroupedBatchSampler(groups, 60, 2, 0, 1, seed=0), GroupedBatchSampler(groups, 60, 2, 0, 1, seed=0)
    torch.manual_seed(0)
    a.set_epoch(3)
    full = list(a)
    torch.manual_seed(99)
    wrapped = EpochBatches(batch_sampler=b)
    wrapped.set_epoch(3, skip=11)
    assert list(wrapped) == full[11:] and len(wrapped) == len(full) - 11
    c = GroupedBatchSampler(groups, 60, 2, 0, 1, seed=1)
    c.set_epoch(3)
    assert list(c) != full
    ungrouped = GroupedBatchSampler(None, 61, 2, 0, 1, seed=0)
    assert len(list(ungrouped)) == 30 and all(len(x) == 2 for x in ungrouped)


def test_loader_keeps_uint8_until_the_device(toy_data):
    ds = CocoDetection(toy_data / "coco", "train", train=True, hflip=0.5, seed=0)
    loader = make_train_loader(ds, 2, 3, 0, 1, 0, workers=0, pin_memory=False)
    loader.batch_sampler.set_epoch(0)
    images, targets = next(iter(loader))
    assert len(images) == 2 and all(im.dtype == torch.uint8 for im in images)
    ratio = [im.shape[2] / im.shape[1] for im in images]  # width / height, as the reference's COCO path
    assert len(set(aspect_ratio_groups(ratio, 3))) == 1  # one aspect-ratio group per batch
    x, t = to_device(images, targets, torch.device("cpu"))
    assert x[0].dtype == torch.float32 and torch.equal(x[0], images[0].float() / 255)
    assert set(t[0]) == {"boxes", "labels"} and torch.equal(t[1]["boxes"], targets[1]["boxes"])
    assert collate([(images[0], targets[0])]) == ([images[0]], [targets[0]])


# ----------------------------------------------------------------------------- COCO evaluation parity


def _pycocotools_stats(ann_file, results):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats.tolist()


def assert_same_stats(ours, ref):
    assert len(ours) == len(ref) == 12
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def jittered_detections(ann_file, seed=0):
    """Boxes near the ground truth (some with the wrong class, some far off), random scores."""
    doc = json.loads(ann_file.read_text())
    rng = np.random.default_rng(seed)
    out = []
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        for k in range(3):
            j = rng.normal(0, 0.1 * (k + 1), 4) * [w, h, w, h]
            cat = a["category_id"] if k < 2 else doc["categories"][k]["id"]
            out.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                        "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])]})
    return out


def test_faster_coco_eval_gives_pycocotools_stats(toy_data, tmp_path):
    ann_file = toy_data / "coco/annotations/instances_val2017.json"
    results = jittered_detections(ann_file)
    ours = coco_bbox_stats(ann_file, results)
    assert_same_stats(ours, _pycocotools_stats(ann_file, results))
    assert 0.1 < ours[0] < 0.9 and ours[3] > 0  # neither empty nor perfect, with small boxes
    # a bigger set with large objects, crowd regions and an image without annotations
    train_ann = toy_data / "coco/annotations/instances_train2017.json"
    results = jittered_detections(train_ann, seed=1)
    assert_same_stats(coco_bbox_stats(train_ann, results), _pycocotools_stats(train_ann, results))


# ----------------------------------------------------------------------------- bad input


def _toy_copy(toy_data, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(toy_data / "coco", root)
    return root


def test_missing_files_are_named(toy_data, tmp_path):
    with pytest.raises(DataError, match=f"data.root: {tmp_path / 'nope'} does not exist"):
        CocoDetection(tmp_path / "nope", "val", train=False, hflip=0, seed=0)
    root = _toy_copy(toy_data, tmp_path)
    (root / "annotations/instances_val2017.json").unlink()
    with pytest.raises(DataError, match=r"val2017.json: annotation file not found \(expected data.root/"):
        CocoDetection(root, "val", train=False, hflip=0, seed=0)
    shutil.rmtree(root / "train2017")
    with pytest.raises(DataError, match=r"train2017: image folder not found \(expected data.root/train2017/"):
        CocoDetection(root, "train", train=True, hflip=0, seed=0)


@pytest.mark.parametrize("edit,message", [
    (lambda d: "{not json", "not a COCO instances file (not JSON"),
    (lambda d: [d], "not a COCO instances file (the top level is a list"),
    (lambda d: {"images": d["images"]}, "not a COCO instances file (no 'annotations', 'categories' list"),
    (lambda d: {**d, "images": [{"id": 1}]}, "instances file (an entry lacks or mistypes 'file_name'"),
    (lambda d: {**d, "images": d["images"] + [d["images"][3]]},
     "'images' lists image id 1003 more than once (each image must be listed once)"),
    (lambda d: {**d, "annotations": d["annotations"] + [{**d["annotations"][0], "id": 999, "image_id": 77}]},
     "1 bad annotation:\n  annotation 999 refers to image 77, which 'images' does not list"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [300.0, 10.0, 50.0, 40.0]}]},
     "annotation 1: bbox [x, y, w, h] = [300.0, 10.0, 50.0, 40.0] lies outside its image 1000"),
    (lambda d: {**d, "annotations": [{**d["annotations"][0], "bbox": [1.0, 2.0, -3.0, 4.0]}]},
     "annotation 1: bbox [1.0, 2.0, -3.0, 4.0] is not [x, y, width >= 0, height >= 0]"),
])
def test_bad_annotation_files_are_named(toy_data, tmp_path, edit, message):
    root = _toy_copy(toy_data, tmp_path)
    path = root / "annotations/instances_train2017.json"
    out = edit(json.loads(path.read_text()))
    path.write_text(out if isinstance(out, str) else json.dumps(out))
    with pytest.raises(DataError) as err:
        read_annotations(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)


def test_missing_corrupt_and_mismatched_images_are_named(toy_data, tmp_path):
    root = _toy_copy(toy_data, tmp_path)
    victim = root / "val2017/000000005001.jpg"
    victim.unlink()
    with pytest.raises(DataError, match=f"val2017.json: lists 1 image that {root / 'val2017'} does not have, "
                                        f"e.g. {victim}"):
        CocoDetection(root, "val", train=False, hflip=0, seed=0)
    victim.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 200)  # a JPEG header, then nothing
    ds = CocoDetection(root, "val", train=False, hflip=0, seed=0)
    with pytest.raises(DataError, match=f"{victim}: unreadable or truncated"):
        ds[1]
    Image.new("RGB", (33, 44)).save(victim)
    with pytest.raises(DataError, match=rf"{victim}: the image is 33 x 44 px \(width x height\) but "
                                        r".*val2017.json says 200 x 160"):
        ds[1]
