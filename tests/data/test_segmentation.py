"""COCO -> VOC masks, the mask cache, the joint transforms and the confusion-matrix metric.

Oracles: the published category table written out here, pycocotools' own COCO.annToMask, PIL
and torchvision's functional transforms replaying the same random draws, and numpy formulas.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from data.segmentation import (CAT_LIST, IGNORE_INDEX, CocoVoc, EvalTransform, SizeGroupedBatches, TrainTransform,
                               rasterise, resized_hw, voc_annotations)
from engine.confusion import confusion_matrix, segmentation_scores
from engine.errors import DataError

# recipe-facts.md: COCO id -> VOC class, and the VOC names in order
PUBLISHED_MAP = {5: 1, 2: 2, 16: 3, 9: 4, 44: 5, 6: 6, 3: 7, 17: 8, 62: 9, 21: 10, 67: 11, 18: 12, 19: 13, 4: 14,
                 1: 15, 64: 16, 20: 17, 63: 18, 7: 19, 72: 20}


def _square(x0, y0, s):
    return [[x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]]


def _write_coco(root: Path, images, annotations, split="train", categories=None):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    doc = {"images": images, "annotations": annotations,
           "categories": categories or [{"id": c, "name": str(c)} for c in sorted(PUBLISHED_MAP) + [13]]}
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(doc))
    return path


# ----------------------------------------------------------------------------- categories, overlap, area


def test_category_mapping_is_the_published_table():
    assert dict(zip(CAT_LIST[1:], range(1, 21))) == PUBLISHED_MAP
    anns = [{"id": i, "category_id": c} for i, c in enumerate(list(PUBLISHED_MAP) + [13, 90, 0])]
    out = voc_annotations(anns)
    # 13 and 90 (not VOC) dropped; 0 (no COCO category has it) stays background, as in the reference's filter
    assert [a["category_id"] for a in out] == list(PUBLISHED_MAP.values()) + [0]
    assert anns[0]["category_id"] == 5  # the input is not modified


def test_overlap_rule_against_pycocotools_masks(tmp_path):
    from pycocotools.coco import COCO

    h, w = 40, 50
    anns = [  # person and dog overlap; two cars overlap; a stop sign (13, not VOC) overlaps the dog
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _square(2, 2, 20), "area": 400, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 18, "segmentation": _square(15, 10, 15), "area": 225, "iscrowd": 0},
        {"id": 3, "image_id": 1, "category_id": 3, "segmentation": _square(32, 25, 10) + _square(44, 30, 4),
         "area": 116, "iscrowd": 0},
        {"id": 4, "image_id": 1, "category_id": 3, "segmentation": _square(36, 28, 8), "area": 64, "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 13, "segmentation": _square(20, 20, 10), "area": 100, "iscrowd": 0},
    ]
    crowd = np.zeros((h, w), dtype=np.uint8)
    crowd[30:38, 2:12] = 1
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(crowd))
    anns.append({"id": 6, "image_id": 1, "category_id": 17, "iscrowd": 1, "area": 80,  # compressed RLE
                 "segmentation": {"counts": rle["counts"].decode(), "size": [h, w]}})
    crowd[:] = 0
    crowd[5:15, 40:48] = 1  # overlaps nothing
    flat = crowd.reshape(-1, order="F").astype(int)
    runs = np.diff(np.flatnonzero(np.diff(np.r_[-1, flat, -1]) != 0))  # run lengths, first run of zeros
    anns.append({"id": 7, "image_id": 1, "category_id": 44, "iscrowd": 1, "area": 80,  # uncompressed, as COCO
                 "segmentation": {"counts": [0] * int(flat[0]) + runs.tolist(), "size": [h, w]}})
    path = _write_coco(tmp_path, [{"id": 1, "file_name": "a.jpg", "height": h, "width": w}], anns)
    coco = COCO(str(path))
    kept = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=1)) if a["category_id"] in PUBLISHED_MAP]
    masks = np.stack([coco.annToMask(a) for a in kept])
    classes = np.array([PUBLISHED_MAP[a["category_id"]] for a in kept])
    expected = np.where(masks.sum(0) == 1, (masks * classes[:, None, None]).max(0), 0)
    expected[masks.sum(0) > 1] = IGNORE_INDEX
    got = rasterise(voc_annotations(anns), h, w)
    np.testing.assert_array_equal(got, expected)
    assert {0, 15, 12, 7, 8, 5, 255} == set(np.unique(got).tolist())  # all classes, overlaps (same class too)
    assert got[22, 25] == 12  # the stop sign (dropped) does not make the dog's pixels ignored


def test_area_filter_keeps_train_images_over_1000_px_of_voc_annotations(tmp_path):
    def ann(i, img, cat, area):
        return {"id": i, "image_id": img, "category_id": cat, "segmentation": _square(0, 0, 5), "area": area,
                "iscrowd": 0}

    images = [{"id": i, "file_name": f"{i}.jpg", "height": 10, "width": 10} for i in (1, 2, 3, 4, 5)]
    anns = [ann(1, 1, 1, 1000.0),                     # exactly 1000: dropped
            ann(2, 2, 1, 600.0), ann(3, 2, 62, 400.5),  # 1000.5 over two VOC annotations: kept
            ann(4, 3, 13, 5000.0), ann(5, 3, 1, 10.0),  # big but not VOC: dropped
            ann(6, 5, 72, 1001.0)]                      # image 4 has none
    _write_coco(tmp_path, images, anns, "train")
    _write_coco(tmp_path, images, anns, "val")
    train = CocoVoc(tmp_path, "train", None, 0, tmp_path / "cache")
    val = CocoVoc(tmp_path, "val", None, 0, tmp_path / "cache")
    assert [im[0] for im in train.images] == [2, 5]
    assert [im[0] for im in val.images] == [1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- cache


def _toy_val(toy_data, tmp_path, transform=None):
    return CocoVoc(toy_data / "coco", "val", transform or EvalTransform(64), 0, tmp_path / "cache")


def test_mask_cache_second_epoch_does_no_pycocotools_work(toy_data, tmp_path, monkeypatch):
    from pycocotools import mask as mask_utils

    calls = []
    real = mask_utils.frPyObjects
    monkeypatch.setattr(mask_utils, "frPyObjects", lambda *a: calls.append(1) or real(*a))
    ds = CocoVoc(toy_data / "coco", "train", TrainTransform(64, (48, 96), 0.5), 0, tmp_path / "cache")
    first = [ds.mask(i) for i in range(len(ds))]
    assert len(calls) > len(ds)  # rasterised once per annotation
    calls.clear()
    for i in range(len(ds)):
        ds[(1, i)]
    assert calls == []
    again = CocoVoc(toy_data / "coco", "train", None, 0, tmp_path / "cache")  # a new process, same cache
    assert all(torch.equal(a, again.mask(i)) for i, a in enumerate(first)) and calls == []


def test_mask_cache_is_keyed_by_the_annotation_file(toy_data, tmp_path):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(toy_data / "coco", root)
    ds = CocoVoc(root, "val", EvalTransform(64), 0, tmp_path / "cache")
    before = ds.mask(0).clone()
    assert (before > 0).any()
    ann_file = root / "annotations/instances_val2017.json"
    doc = json.loads(ann_file.read_text())
    first = doc["images"][0]["id"]
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] != first] + [
        {"id": 999, "image_id": first, "category_id": 72, "segmentation": _square(1, 1, 9), "area": 81,
         "iscrowd": 0}]
    ann_file.write_text(json.dumps(doc))
    changed = CocoVoc(root, "val", EvalTransform(64), 0, tmp_path / "cache")
    assert changed.cache.dir != ds.cache.dir
    after = changed.mask(0)
    assert set(after.unique().tolist()) == {0, 20} and not torch.equal(before, after)


# ----------------------------------------------------------------------------- transforms


def _reference_train(image: torch.Tensor, mask: torch.Tensor, size: int, short: int, flip: bool, top: int,
                     left: int):
    """torchvision's reference transforms on PIL (references/segmentation/transforms.py), given the draws."""
    img = F.to_pil_image(image)
    tgt = Image.fromarray(mask.numpy())
    img, tgt = F.resize(img, short), F.resize(tgt, short, interpolation=InterpolationMode.NEAREST)
    if flip:
        img, tgt = F.hflip(img), F.hflip(tgt)
    w, h = img.size
    if min(w, h) < size:
        pad = (0, 0, size - w if w < size else 0, size - h if h < size else 0)
        img, tgt = F.pad(img, pad, fill=0), F.pad(tgt, pad, fill=255)
    img, tgt = F.crop(img, top, left, size, size), F.crop(tgt, top, left, size, size)
    return torch.from_numpy(np.array(img)), torch.from_numpy(np.array(tgt))


@pytest.mark.parametrize("short,flip", [(72, False), (72, True), (150, True), (40, True), (40, False)])
def test_train_transform_matches_the_reference_pipeline(toy_data, tmp_path, short, flip):
    size = 64
    ds = _toy_val(toy_data, tmp_path)
    tf = TrainTransform(size, (40, 150), 0.5)
    g = torch.Generator().manual_seed(short)
    for index in range(3):
        image, mask = ds.load(index)
        h, w = resized_hw(*mask.shape, short)
        top = int(torch.randint(0, max(h, size) - size + 1, (1,), generator=g))
        left = int(torch.randint(0, max(w, size) - size + 1, (1,), generator=g))
        img, tgt = tf.apply(image, mask, short, flip, top, left)
        ref_img, ref_tgt = _reference_train(image, mask, size, short, flip, top, left)
        assert torch.equal(tgt, ref_tgt)  # labels exactly the reference's (PIL nearest, flip, pad 255)
        diff = (img.int() - ref_img.int()).abs()
        assert diff.max() <= 3 and diff.float().mean() < 0.1  # torch's uint8 antialias kernel vs PIL's


def test_train_draws_are_seeded_per_sample_and_cover_the_range(toy_data, tmp_path):
    ds = CocoVoc(toy_data / "coco", "train", TrainTransform(64, (48, 96), 0.5), 7, tmp_path / "cache")
    a, b, c = ds[(3, 5)], ds[(3, 5)], ds[(4, 5)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    tf = TrainTransform(64, (48, 96), 0.5)
    draws = [tf.draw(200, 300, torch.Generator().manual_seed(s)) for s in range(400)]
    shorts = [d[0] for d in draws]
    assert min(shorts) == 48 and max(shorts) == 96  # both ends inclusive, like random.randint
    assert 0.4 < np.mean([d[1] for d in draws]) < 0.6


def test_eval_transform_is_the_reference_resize(toy_data, tmp_path):
    ds = _toy_val(toy_data, tmp_path, EvalTransform(100))
    for index in range(len(ds)):
        _, mask = ds.load(index)
        img, tgt = ds[(0, index)]
        ref = F.resize(Image.fromarray(mask.numpy()), 100, interpolation=InterpolationMode.NEAREST)
        assert torch.equal(tgt, torch.from_numpy(np.array(ref)))
        assert min(img.shape[:2]) == 100 and img.shape[:2] == tgt.shape and img.shape[2] == 3


def test_size_grouped_eval_batches_cover_every_image_once():
    sizes = [(480, 640), (640, 480), (480, 640), (500, 375), (480, 640), (481, 640), (480, 640)]
    seen = []
    for rank in range(2):
        for batch in SizeGroupedBatches(sizes, 520, 2, rank, 2):
            assert len(batch) <= 2 and len({resized_hw(*sizes[i], 520) for _, i in batch}) == 1
            seen += [i for _, i in batch]
    assert sorted(seen) == list(range(len(sizes)))


# ----------------------------------------------------------------------------- bad input


def test_bad_annotation_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"instances_train2017.json: annotation file not found"):
        CocoVoc(tmp_path, "train", None, 0, tmp_path / "cache")
    images = [{"id": 1, "file_name": "1.jpg", "height": 10, "width": 10}]
    path = _write_coco(tmp_path, images, [{"id": 1, "image_id": 1, "category_id": 13, "area": 50,
                                           "segmentation": _square(0, 0, 5), "iscrowd": 0}])
    with pytest.raises(DataError, match=f"{path}: no annotation of a VOC category"):
        CocoVoc(tmp_path, "train", None, 0, tmp_path / "cache")
    path.write_text("{not json")
    with pytest.raises(DataError, match=f"{path}: not a valid JSON annotation file"):
        CocoVoc(tmp_path, "train", None, 0, tmp_path / "cache")


def _edit_first(key, value):
    """An edit of the toy val file: the first annotation's (or image's) `key` set to `value` (None: gone)."""
    def edit(doc):
        entry = doc["images" if key in ("height", "width") else "annotations"][0]
        entry.pop(key) if value is None else entry.update({key: value})
    return edit


@pytest.mark.parametrize("edit,message", [
    (_edit_first("segmentation", [[10.0, 10.0, 40.0, 40.0]]),  # 2 points: pycocotools reads a box, fails
     "annotation 68 (image 5000): polygon 0 has 4 coordinates; expected x, y pairs of at least 3 points"),
    (_edit_first("segmentation", [[10.0, 10.0]]),  # 1 point: pycocotools raised "input type is not supported"
     "annotation 68 (image 5000): polygon 0 has 2 coordinates; expected x, y pairs of at least 3 points"),
    (_edit_first("segmentation", [[10.0, 10.0, 40.0, 40.0, 10.0]]),  # odd: an empty mask, silently
     "annotation 68 (image 5000): polygon 0 has 5 coordinates"),
    (_edit_first("segmentation", None), "annotation 68 (image 5000) has no 'segmentation'"),
    (_edit_first("segmentation", {"counts": [0, 5], "size": [10, 10]}),
     "annotation 68 (image 5000): RLE segmentation with size [10, 10] and 'counts'; expected the image's "
     "size [160, 202] (height, width)"),
    (_edit_first("height", None), "image 5000 (000000005000.jpg) has no 'height'"),
    (_edit_first("width", "202"),
     "image 5000 (000000005000.jpg): height 160 and width '202' are not positive integers"),
    (lambda doc: doc["images"].append(dict(doc["images"][1])), "image id 5001 is listed 2 times in 'images'"),
    (lambda doc: doc["annotations"].append({**doc["annotations"][0], "id": 999, "image_id": 77}),
     "annotation 999 (image 77): its image_id is not in 'images'"),
])
def test_bad_annotations_are_refused_naming_file_image_and_annotation(toy_data, tmp_path, edit, message):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(toy_data / "coco", root)
    path = root / "annotations/instances_val2017.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        CocoVoc(root, "val", EvalTransform(64), 0, tmp_path / "cache")
    assert str(err.value).startswith(f"{path}: 1 problem with its images or annotations:\n  {message}"), \
        str(err.value)


def test_bad_images_name_the_file(toy_data, tmp_path):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(toy_data / "coco", root)
    ds = CocoVoc(root, "val", EvalTransform(64), 0, tmp_path / "cache")
    _, name, h, w = ds.images[0]
    victim = root / "val2017" / name
    Image.new("RGB", (w + 3, h)).save(victim)
    with pytest.raises(DataError, match=f"{victim}: the image is {w + 3} x {h} px .* says {w} x {h}"):
        ds[(0, 0)]
    victim.write_bytes((toy_data / "coco" / "val2017" / name).read_bytes()[:600])
    with pytest.raises(DataError, match=f"{victim}: unreadable or truncated JPEG image"):
        ds[(0, 0)]


# ----------------------------------------------------------------------------- metric


def test_confusion_matrix_and_scores_against_numpy():
    rng = np.random.default_rng(0)
    n = 21
    target = rng.integers(0, n, size=(3, 37, 41)).astype(np.uint8)
    target[rng.random(target.shape) < 0.1] = 255
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, n, size=target.shape))
    pred = np.where(pred == 255, 0, pred).astype(np.int64)
    mat = confusion_matrix(torch.from_numpy(target), torch.from_numpy(pred), n).numpy()
    expected = np.zeros((n, n), dtype=np.int64)
    valid = target != 255
    np.add.at(expected, (target[valid].astype(np.int64), pred[valid]), 1)
    np.testing.assert_array_equal(mat, expected)
    s = segmentation_scores(torch.from_numpy(mat))
    iou = np.diag(expected) / (expected.sum(0) + expected.sum(1) - np.diag(expected))
    assert s["pixel_acc"] == pytest.approx(100 * np.trace(expected) / expected.sum())
    assert s["miou"] == pytest.approx(100 * iou.mean())  # all classes occur: the published mean
    assert s["iou"] == pytest.approx(list(100 * iou))


def test_scores_skip_classes_absent_from_ground_truth_and_predictions():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 5, 5]])
    s = segmentation_scores(confusion_matrix(target, pred, 21))
    # class 0: tp 1, fn 1, fp 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert s["iou"][:3] == pytest.approx([100 / 3, 200 / 3, 50]) and s["iou"][3:] == [None] * 18
    assert s["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 6)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_mask_cache_files_get_the_mode_a_plain_open_would(tmp_path, umask):
    """A team shares one mask cache: its files follow the umask, not mkstemp's 0600."""
    import os

    from data.segmentation import MaskCache

    old = os.umask(umask)
    try:
        cache = MaskCache(tmp_path, "val", "key")
        mask = cache.get(7, lambda: np.arange(12, dtype=np.uint8).reshape(3, 4))
        cache.write_index(1)
    finally:
        os.umask(old)
    assert torch.equal(mask, torch.arange(12, dtype=torch.uint8).reshape(3, 4))
    assert torch.equal(cache.get(7, lambda: None), mask)  # read back from the file
    modes = {p.name: p.stat().st_mode & 0o777 for p in cache.dir.iterdir()}
    assert modes == {"7.png": 0o666 & ~umask, "index.json": 0o666 & ~umask}


def test_the_crop_window_is_drawn_as_torchvisions_random_crop_draws_it():
    """The window (top, left) comes from RandomCrop.get_params on the padded image, drawn from the same
    generator state after the short side and the flip: drawn on each side that exceeds the crop, and not
    drawn at all (no random numbers used) when the padded image is the crop's size."""
    from torchvision.transforms import RandomCrop

    from data.segmentation import resized_hw

    tf = TrainTransform(64, (48, 96), 0.5)
    for height, width in ((200, 300), (300, 64), (64, 300), (40, 40), (64, 64)):
        for s in range(20):
            got = tf.draw(height, width, torch.Generator().manual_seed(s))
            torch.manual_seed(s)  # the reference draws from the global generator, in the same order
            short = int(torch.randint(48, 97, (1,)))
            flip = torch.rand(1).item() < 0.5
            h, w = resized_hw(height, width, short)
            top, left, _, _ = RandomCrop.get_params(torch.empty(1, max(h, 64), max(w, 64)), (64, 64))
            after = torch.rand(1)
            assert got == (short, flip, top, left), (height, width, s)
            g = torch.Generator().manual_seed(s)
            tf.draw(height, width, g)
            assert torch.equal(torch.rand(1, generator=g), after)  # as many numbers drawn as the reference


def test_a_flip_probability_of_0_draws_no_coin_and_a_coin_equal_to_p_does_not_flip():
    """torchvision's segmentation preset adds RandomHorizontalFlip only when hflip_prob > 0: with 0 the crop
    window is drawn right after the short side. A coin is a flip when it is below p (`torch.rand(1) < p`):
    p equal to the drawn coin does not flip."""
    from torchvision.transforms import RandomCrop

    from data.segmentation import resized_hw

    for s in range(10):
        torch.manual_seed(s)
        short = int(torch.randint(48, 97, (1,)))
        h, w = resized_hw(200, 300, short)
        padded = torch.empty(1, max(h, 64), max(w, 64))
        top, left, _, _ = RandomCrop.get_params(padded, (64, 64))
        assert TrainTransform(64, (48, 96), 0.0).draw(200, 300, torch.Generator().manual_seed(s)) == (
            short, False, top, left), s
        g = torch.Generator().manual_seed(s)
        torch.randint(48, 97, (1,), generator=g)
        coin = torch.rand(1, generator=g).item()
        assert TrainTransform(64, (48, 96), coin).draw(200, 300, torch.Generator().manual_seed(s))[1] is False
        above = TrainTransform(64, (48, 96), coin + 1e-6)
        assert above.draw(200, 300, torch.Generator().manual_seed(s))[1] is True
