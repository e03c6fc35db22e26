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
