"""data/segmentation.py's small parts in isolation: the VOC colour map (the VOC devkit's table), where the mask
cache goes by default."""

from pathlib import Path

from data.segmentation import SegmentationDataConfig, voc_palette

# VOCdevkit's colour map (labelcolormap / the PNG palette of SegmentationClass), classes 0-20
VOC_COLOURS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
               (128, 128, 128), (64, 0, 0), (192, 0, 0), (64, 128, 0), (192, 128, 0), (64, 0, 128), (192, 0, 128),
               (64, 128, 128), (192, 128, 128), (0, 64, 0), (128, 64, 0), (0, 192, 0), (128, 192, 0), (0, 64, 128)]


def test_voc_palette_is_the_devkit_colour_map():
    assert voc_palette() == VOC_COLOURS
    assert voc_palette(256)[255] == (224, 224, 192)  # the devkit's "void" (ignore) colour


def _data(**kw):
    return SegmentationDataConfig(root="r", batch_size=1, workers=0, crop_size=8, short_side=(8, 8), hflip=0.5,
                                  eval_size=8, **kw)


def test_mask_cache_goes_to_the_xdg_cache_or_home_unless_given(monkeypatch, tmp_path):
    assert _data(mask_cache=str(tmp_path / "masks")).cache_dir() == tmp_path / "masks"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _data().cache_dir() == tmp_path / "xdg" / "mbv3-recipes" / "coco-voc-masks"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _data().cache_dir() == tmp_path / "home" / ".cache" / "mbv3-recipes" / "coco-voc-masks"
    assert isinstance(_data().cache_dir(), Path)


def test_the_data_section_is_frozen():
    import dataclasses

    import pytest

    cfg = _data()
    assert list(cfg.validate()) == []
    with pytest.raises(dataclasses.FrozenInstanceError):  # nothing writes back into the config
        cfg.batch_size = 2


def test_the_mask_cache_key_is_stable_for_the_same_annotation_file():
    """The cache folder's name: caches written by earlier runs (and by the folder and shard runs, which share
    it) are found again only if the key of the same file and rule stays the same. A deliberate change of the
    conversion rule changes MASK_RULE, and this golden value with it."""
    from data.segmentation import cache_key

    assert cache_key(b'{"images": [], "annotations": []}') == "df61a6c53810e44f"
    assert cache_key(b'{"images": [], "annotations": [] }') != cache_key(b'{"images": [], "annotations": []}')


def test_an_annotation_that_is_not_an_object_is_named_by_its_position(tmp_path):
    import pytest

    from data.segmentation import check_annotations
    from engine.errors import DataError

    doc = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
           "annotations": [{"id": 5, "image_id": 1, "category_id": 5, "area": 4.0,
                            "segmentation": [[1, 1, 4, 1, 4, 4]]}, "not an annotation"]}
    with pytest.raises(DataError) as err:
        check_annotations(doc, tmp_path / "instances.json")
    assert str(err.value) == (f"{tmp_path / 'instances.json'}: 1 problem with its images or annotations:\n"
                              "  annotations[1] is not an object")


def test_a_mask_cache_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A failure between the temporary file and its rename (here the rename itself) removes the temporary
    file, so concurrent and later runs never find half-written masks or litter."""
    import os

    import numpy as np
    import pytest

    from data import segmentation
    from data.segmentation import MaskCache

    cache = MaskCache(tmp_path, "val", "k")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segmentation.os, "replace", fail)
    with pytest.raises(OSError):
        cache.get(3, lambda: np.ones((4, 5), dtype=np.uint8))
    assert os.listdir(tmp_path / "val-k") == []
    monkeypatch.undo()
    assert cache.get(3, lambda: np.full((4, 5), 7, dtype=np.uint8)).unique().tolist() == [7]
    assert os.listdir(tmp_path / "val-k") == ["3.png"]


def test_an_image_of_1_px_is_a_size_and_0_px_is_not(tmp_path):
    import pytest

    from data.segmentation import check_annotations
    from engine.errors import DataError

    def doc(h, w):
        return {"images": [{"id": 1, "file_name": "a.jpg", "height": h, "width": w}], "annotations": []}

    check_annotations(doc(1, 1), tmp_path / "a.json")
    for h, w in ((0, 5), (5, 0), (True, 5), (2.0, 5)):
        with pytest.raises(DataError, match=r"height .* and width .* are not positive integers"):
            check_annotations(doc(h, w), tmp_path / "a.json")


def test_the_image_count_of_an_earlier_runs_cache_is_found_by_the_annotation_files_key(tmp_path):
    """--print-config counts training steps from the mask cache's index.json, found under the key of the
    split's annotation file (not the image folder): no cache, no count."""
    from data.segmentation import cache_key, cached_image_count

    (tmp_path / "annotations").mkdir()
    raw = b'{"images": [], "annotations": []}'
    (tmp_path / "annotations" / "instances_train2017.json").write_bytes(raw)
    cache = tmp_path / "cache"
    assert cached_image_count(tmp_path, "train", cache) is None
    (cache / f"train-{cache_key(raw)}").mkdir(parents=True)
    (cache / f"train-{cache_key(raw)}" / "index.json").write_text('{"images": 1234}')
    assert cached_image_count(tmp_path, "train", cache) == 1234
    assert cached_image_count(tmp_path, "val", cache) is None


def test_data_section_bounds_at_both_sides_of_each_limit():
    from data.segmentation import SegmentationDataConfig

    base = dict(root="r", batch_size=4, workers=1, crop_size=480, short_side=(260, 1040), hflip=0.5, eval_size=520)

    def problems(**kw):
        return list(SegmentationDataConfig(**{**base, **kw}).validate())

    assert problems() == [] and problems(workers=0, hflip=0.0) == [] and problems(hflip=1.0) == []
    for key in ("batch_size", "crop_size", "eval_size", "eval_batch_size"):
        assert problems(**{key: 1}) == [], key
        assert problems(**{key: 0}) == [(key, "expected a positive number, got 0")], key
    assert problems(workers=-1) == [("workers", "expected >= 0, got -1")]
    assert problems(short_side=(1, 1)) == []
    for bad in ((0, 5), (6, 5)):
        assert problems(short_side=bad) == [("short_side", f"expected [lo, hi] with 0 < lo <= hi, got {list(bad)}")]
    for bad in (-0.01, 1.01):
        assert problems(hflip=bad) == [("hflip", f"expected a probability in [0, 1], got {bad}")]


def _problems(doc, path):
    """check_annotations' DataError message for `doc`, as the user sees it."""
    import pytest

    from data.segmentation import check_annotations
    from engine.errors import DataError

    with pytest.raises(DataError) as err:
        check_annotations(doc, path)
    return str(err.value)


def _image(i, h=10, w=10):
    return {"id": i, "file_name": f"{i}.jpg", "height": h, "width": w}


def _ann(i, **kw):  # a VOC-category annotation (COCO 5: aeroplane) of image 1 that passes every check
    return {"id": i, "image_id": 1, "category_id": 5, "area": 4.0, "segmentation": [[1, 1, 4, 1, 4, 4]], **kw}


def test_an_image_entry_that_is_not_an_object_is_named_by_its_position(tmp_path):
    path = tmp_path / "instances.json"
    doc = {"images": [_image(1), "2.jpg", _image(3), [4]], "annotations": [_ann(5)]}
    assert _problems(doc, path) == (f"{path}: 2 problems with its images or annotations:\n"
                                    "  images[1] is not an object\n  images[3] is not an object")
    doc["images"] = [_image(1), 7]
    assert _problems(doc, path) == (f"{path}: 1 problem with its images or annotations:\n"
                                    "  images[1] is not an object")


def test_an_area_that_is_not_a_number_is_named_and_a_bool_is_not_a_number(tmp_path):
    """int and float areas pass (the train filter sums them); a string, null or a bool (an int to Python)
    does not."""
    from data.segmentation import check_annotations

    path = tmp_path / "instances.json"
    good = [_ann(1, area=3), _ann(2, area=2.5)]
    check_annotations({"images": [_image(1)], "annotations": good}, path)
    doc = {"images": [_image(1)], "annotations": good + [_ann(3, area="12"), _ann(4, area=True),
                                                         _ann(5, area=None), _ann(6, area=False)]}
    assert _problems(doc, path) == (f"{path}: 4 problems with its images or annotations:\n"
                                    "  annotation 3 (image 1): area '12' is not a number\n"
                                    "  annotation 4 (image 1): area True is not a number\n"
                                    "  annotation 5 (image 1): area None is not a number\n"
                                    "  annotation 6 (image 1): area False is not a number")


def test_a_segmentation_that_is_neither_polygons_nor_rle_is_named_with_its_first_40_characters(tmp_path):
    from data.segmentation import check_annotations

    path = tmp_path / "instances.json"
    rle = {"size": [10, 10], "counts": [0, 100]}
    check_annotations({"images": [_image(1)], "annotations": [_ann(1), _ann(2, segmentation=rle)]}, path)
    long = "0123456789" * 4 + "ABC"  # 43 characters: the message shows the first 40
    doc = {"images": [_image(1)], "annotations": [_ann(1), _ann(2, segmentation="abc"), _ann(3, segmentation=[]),
                                                  _ann(4, segmentation=long), _ann(5, segmentation=7)]}
    assert _problems(doc, path) == (
        f"{path}: 4 problems with its images or annotations:\n"
        "  annotation 2 (image 1): segmentation 'abc' is neither a list of polygons nor an RLE object\n"
        "  annotation 3 (image 1): segmentation '[]' is neither a list of polygons nor an RLE object\n"
        f"  annotation 4 (image 1): segmentation '{long[:40]}' is neither a list of polygons nor an RLE object\n"
        "  annotation 5 (image 1): segmentation '7' is neither a list of polygons nor an RLE object")


def _voc_tree(root):
    """data.root/train2017 whose training filter keeps images 2 and 9 (VOC areas over 1000 px) of the four
    listed out of id order; the image files are empty (paths() decodes nothing)."""
    import json

    images = [_image(9, 50, 50), _image(2, 50, 50), _image(5, 50, 50), _image(7, 50, 50)]
    square = [[0, 0, 40, 0, 40, 40, 0, 40]]
    anns = [{"id": 1, "image_id": 9, "category_id": 5, "area": 1600.0, "segmentation": square},
            {"id": 2, "image_id": 2, "category_id": 1, "area": 1001, "segmentation": square},
            {"id": 3, "image_id": 5, "category_id": 1, "area": 1000.0, "segmentation": square},  # not over 1000
            {"id": 4, "image_id": 7, "category_id": 13, "area": 1600.0, "segmentation": square}]  # not VOC
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    for im in images:
        (root / "train2017" / im["file_name"]).write_bytes(b"")
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_paths_are_the_kept_images_files_in_item_order_from_a_folder_and_from_shards(tmp_path):
    from data.segmentation import CocoVoc
    from tools import make_shards

    root = _voc_tree(tmp_path / "coco")
    ds = CocoVoc(root, "train", None, 0, tmp_path / "masks")
    assert ds.paths() == [str(root / "train2017" / "2.jpg"), str(root / "train2017" / "9.jpg")]
    out = tmp_path / "shards"
    assert make_shards.main([str(root), str(out)]) == 0
    sharded = CocoVoc(out, "train", None, 0, tmp_path / "masks", "shards")
    shard = out / "train2017" / "shard-00000.tar"  # SHARD[member], the member named as the file
    assert sharded.paths() == [f"{shard}[2.jpg]", f"{shard}[9.jpg]"]


def test_overlay_blends_the_voc_colour_of_each_class_and_leaves_background_and_ignore_clear():
    import torch
    from torchvision.utils import draw_segmentation_masks

    from data.segmentation import overlay

    assert [voc_palette()[c] for c in (1, 2, 3, 15)] == [(128, 0, 0), (0, 128, 0), (128, 128, 0), (192, 128, 128)]
    h, w = 3, 4  # not square: the (H, W, 3) -> (3, H, W) permutation is seen
    image = torch.arange(h * w * 3, dtype=torch.uint8).reshape(h, w, 3) * 7 + 3
    labels = torch.tensor([[0, 1, 2, 255], [3, 15, 0, 20], [1, 255, 0, 15]], dtype=torch.uint8)
    for alpha in (0.25, 0.5, 1.0):
        masks = torch.stack([labels == c for c in range(1, 21)])
        expected = draw_segmentation_masks(image.permute(2, 0, 1), masks, alpha=alpha, colors=VOC_COLOURS[1:])
        out = overlay(image, labels, alpha)
        assert torch.equal(out, expected), alpha
        clear = (labels == 0) | (labels == 255)
        assert torch.equal(out[:, clear], image.permute(2, 0, 1)[:, clear]), alpha
    out = overlay(image, labels, 0.25)
    # the pixel (1, 1), class 15: 3/4 of the image's colour plus 1/4 of (192, 128, 128), truncated to uint8
    assert image[1, 1].tolist() == [108, 115, 122]
    assert out[:, 1, 1].tolist() == [int(108 * 0.75 + 192 * 0.25), int(115 * 0.75 + 128 * 0.25),
                                     int(122 * 0.75 + 128 * 0.25)] == [129, 118, 123]
    assert torch.equal(overlay(image, labels), overlay(image, labels, 0.5))  # the default: half and half


def test_a_file_without_images_and_annotations_lists_is_refused_naming_it(tmp_path):
    import json

    import pytest

    from data.segmentation import cache_key, read_annotations
    from engine.errors import DataError

    path = tmp_path / "instances.json"
    for doc in ([], {"annotations": []}, {"images": []}, {"images": {}, "annotations": []},
                {"images": [], "annotations": None}):
        path.write_text(json.dumps(doc))
        with pytest.raises(DataError) as err:
            read_annotations(path)
        want = f"{path}: not a COCO instances file (expected 'images' and 'annotations' lists)"
        assert str(err.value) == want, doc
    path.write_text('{"images": [], "annotations": []}')
    assert read_annotations(path) == ({"images": [], "annotations": []}, cache_key(path.read_bytes()))


def test_every_problem_is_named_up_to_five_and_the_rest_counted(tmp_path):
    """A non-object annotation does not stop the check of the ones after it. Five problems are shown whole;
    from six on, the first five and "... and N more"."""
    path = tmp_path / "instances.json"
    doc = {"images": [_image(1)], "annotations": ["not an annotation", _ann(2, area="12")]}
    assert _problems(doc, path) == (f"{path}: 2 problems with its images or annotations:\n"
                                    "  annotations[0] is not an object\n"
                                    "  annotation 2 (image 1): area '12' is not a number")
    bad = [_ann(i, area=None) for i in range(1, 8)]
    lines = [f"  annotation {i} (image 1): area None is not a number" for i in range(1, 8)]
    header = f"{path}: {{}} problems with its images or annotations:\n"
    assert _problems({"images": [_image(1)], "annotations": bad[:5]}, path) == (
        header.format(5) + "\n".join(lines[:5]))
    assert _problems({"images": [_image(1)], "annotations": bad[:6]}, path) == (
        header.format(6) + "\n".join(lines[:5]) + "\n  ... and 1 more")
    assert _problems({"images": [_image(1)], "annotations": bad}, path) == (
        header.format(7) + "\n".join(lines[:5]) + "\n  ... and 2 more")


def test_a_file_without_voc_annotations_names_the_voc_ids_and_the_first_20_ids_it_has(tmp_path):
    """The VOC classes' COCO ids in VOC order (torchvision's CAT_LIST without background), and the file's
    category ids, the first 20 in the order of their text."""
    import json

    import pytest

    from data.segmentation import CocoVoc
    from engine.errors import DataError

    ids = [8, 10, 11, 13, 14, 15, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39]  # none is VOC
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "instances_train2017.json"
    path.write_text(json.dumps({"images": [_image(1)], "annotations": [_ann(i, category_id=c)
                                                                      for i, c in enumerate(ids, 1)]}))
    with pytest.raises(DataError) as err:
        CocoVoc(tmp_path, "train", None, 0, tmp_path / "masks")
    assert str(err.value) == (
        f"{path}: no annotation of a VOC category (COCO ids [5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, "
        "4, 1, 64, 20, 63, 7, 72]); the file's annotations use category ids [10, 11, 13, 14, 15, 22, 23, 24, "
        "25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39]")


def test_the_dataset_records_its_image_count_for_the_next_print_config(tmp_path):
    """Building the dataset writes the count that cached_image_count reads back: 2 training images of the
    tree's 4 pass the area filter, and validation keeps all 4."""
    from data.segmentation import CocoVoc, cached_image_count

    root = _voc_tree(tmp_path / "coco")
    assert cached_image_count(root, "train", tmp_path / "masks") is None
    CocoVoc(root, "train", None, 0, tmp_path / "masks")
    assert cached_image_count(root, "train", tmp_path / "masks") == 2


def test_eval_batches_group_equal_resized_sizes_in_order_and_default_to_one_image(tmp_path):
    """Short side 520: 480 x 640 -> 520 x 693, 640 x 480 and 500 x 375 -> 693 x 520, 481 x 640 -> 520 x 691
    (torchvision's Resize(int)). Batches keep each size's images in order, sizes in order of first
    appearance; keys are (0, index). Without rank and world: every image, once. The data section's default
    eval_batch_size is the reference's batch 1."""
    from data.segmentation import SizeGroupedBatches

    sizes = [(480, 640), (640, 480), (480, 640), (500, 375), (480, 640), (481, 640)]
    assert list(SizeGroupedBatches(sizes, 520, 2)) == [[(0, 0), (0, 2)], [(0, 4)], [(0, 1), (0, 3)], [(0, 5)]]
    assert list(SizeGroupedBatches(sizes, 520, 2, 1, 2)) == [[(0, 1), (0, 3)], [(0, 5)]]
    one = SizeGroupedBatches(sizes, 520, _data().eval_batch_size)
    assert list(one) == [[(0, 0)], [(0, 2)], [(0, 4)], [(0, 1)], [(0, 3)], [(0, 5)]] and len(one) == 6


def test_nearest_source_indices_are_pils_nearest_resize(tmp_path):
    """The mask's source rows and columns: what PIL's NEAREST resize (the reference's mask resize) picks, seen
    on a row whose pixel values are their own indices; a window [start, stop) is that part of it."""
    import numpy as np
    from PIL import Image

    from data.segmentation import nearest_index

    for n_in, n_out in ((10, 3), (7, 5), (5, 7), (3, 10), (37, 100), (100, 37), (256, 91), (200, 200),
                        (1, 4)):
        row = Image.fromarray(np.arange(n_in, dtype=np.uint8)[None, :])
        want = np.array(row.resize((n_out, 1), Image.NEAREST))[0].tolist()
        assert nearest_index(n_in, n_out, 0, n_out).tolist() == want, (n_in, n_out)
        assert nearest_index(n_in, n_out, 1, n_out - 1).tolist() == want[1:-1], (n_in, n_out)
