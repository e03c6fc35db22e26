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
