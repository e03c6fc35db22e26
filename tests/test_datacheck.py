"""engine/datacheck.py: the header-and-end check of the validation set against a full decode (the oracle:
torchvision's decoder, which the loaders use), and the batch-of-one check against a real forward pass."""

import glob
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.classification import decode
from engine.datacheck import check_single_image_batch, check_val_images, image_size
from engine.distributed import DistState
from engine.errors import DataError
from models import build


def _counting(calls):
    def counted(path):
        calls.append(path)
        return decode(path)
    return counted


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_image_size_reads_the_header_and_decodes_only_what_looks_incomplete(tmp_path, fmt):
    path = tmp_path / f"image.{fmt.lower()}"
    pixels = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    whole = path.read_bytes()
    calls = []
    assert image_size(str(path), _counting(calls)) == (50, 70)
    assert len(calls) == (fmt == "GIF")  # a GIF's frames must be counted: decoded
    path.write_bytes(whole + b"\0" * 300)  # bytes after the end marker: decoded, and fine
    assert image_size(str(path), _counting(calls)) == (50, 70)
    path.write_bytes(whole[:len(whole) * 2 // 3])
    with pytest.raises(DataError, match=f"{path}: unreadable or truncated {fmt[0]}"):
        image_size(str(path), decode)


def test_image_size_is_the_decoded_size_on_the_toy_data_without_decoding(toy_data):
    paths = sorted(glob.glob(str(toy_data / "*/*/*.jpg")) + glob.glob(str(toy_data / "imagenet/*/*/*.jpg")))
    calls = []
    assert len(paths) == 532
    for p in paths[::7]:
        assert image_size(p, _counting(calls)) == tuple(decode(p).shape[1:]), p
    assert calls == []


def test_val_check_lists_every_problem_with_the_file_and_the_size_it_expected(toy_data, tmp_path):
    shutil.copytree(toy_data / "coco/val2017", tmp_path / "val")
    paths = sorted(str(p) for p in (tmp_path / "val").iterdir())
    sizes = [tuple(decode(p).shape[1:]) for p in paths]
    check_val_images(paths, sizes, "ann.json", decode, 2, DistState())
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:900])
    h, w = sizes[4]
    Image.new("RGB", (w + 1, h)).save(paths[4], format="JPEG")
    with pytest.raises(DataError) as err:
        check_val_images(paths, sizes, "ann.json", decode, 2, DistState())
    assert str(err.value) == (
        f"the validation set: 2 of 8 images cannot be used:\n"
        f"  {paths[1]}: unreadable or truncated JPEG image (Image is incomplete or truncated)\n"
        f"  {paths[4]}: the image is {w + 1} x {h} px (width x height) but ann.json says {w} x {h}: its "
        "boxes and masks would not fit the image")


def test_a_batch_of_one_is_refused_only_where_the_model_cannot_train_on_it():
    small = partial(build, "mobilenet_v3_small", num_classes=10, width_mult=0.5)
    for crop, fails in ((32, True), (64, False)):
        torch.manual_seed(0)
        try:  # the oracle: a real forward pass in training mode
            small().train()(torch.rand(1, 3, crop, crop))
            real = False
        except ValueError:
            real = True
        assert real == fails
        if fails:
            with pytest.raises(DataError, match=r"^X, and the model cannot train on one image \(its "
                                                r"BatchNorm needs more than one value per channel: "
                                                r"Expected more .*\); Y$"):
                check_single_image_batch(small, (3, crop, crop), "X", "Y")
        else:
            check_single_image_batch(small, (3, crop, crop), "X", "Y")


def test_the_end_marker_is_looked_for_in_the_last_64_bytes(tmp_path):
    """Writers may pad a JPEG after its end marker (FF D9): up to 62 bytes of padding leave the marker
    within the last 64 bytes, where the header check finds it; with more the file is decoded to be sure."""
    path = tmp_path / "padded.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    whole = path.read_bytes()
    assert whole.endswith(b"\xff\xd9")
    for padding, decoded in ((0, 0), (62, 0), (63, 1), (64, 1)):
        path.write_bytes(whole + b"\0" * padding)
        calls = []
        assert image_size(str(path), _counting(calls)) == (50, 70)
        assert len(calls) == decoded, padding


def test_check_data_says_how_many_images_it_decodes_and_with_how_many_threads(tmp_path):
    from engine.datacheck import check_images

    class Log:
        lines = []

        def info(self, text):
            self.lines.append(text)

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((4, 5, 3), i, dtype=np.uint8)).save(paths[-1])
    for workers in (0, 1, 2):
        check_images(paths, decode, workers, Log())
    assert Log.lines == ["--check-data: decoding 3 images with 1 thread", "--check-data: all 3 images decode"] * 2 + [
        "--check-data: decoding 3 images with 2 threads", "--check-data: all 3 images decode"]


def test_check_data_names_every_image_that_fails_and_how_many_of_how_many(tmp_path):
    from engine.datacheck import check_images

    class Log:
        def info(self, text):
            pass

    good, bad = tmp_path / "good.png", tmp_path / "bad.jpg"
    Image.fromarray(np.full((4, 5, 3), 9, dtype=np.uint8)).save(good)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(DataError) as err:
        check_images([str(good), str(bad)], decode, 1, Log())
    lines = str(err.value).splitlines()
    assert lines[0] == "--check-data: 1 of 2 images cannot be used:" and lines[1].startswith(f"  {bad}: ")
    assert len(lines) == 2


def test_the_val_check_logs_how_many_headers_it_read_and_how_long_it_took(tmp_path):
    """One line after a clean check: every path counted and the time the call took (0.0 s for 3 tiny
    images; never more than the call's own duration); nothing when the check refuses the set."""
    import re
    import time

    class Log:
        def __init__(self):
            self.lines = []

        def info(self, text):
            self.lines.append(text)

    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((4, 5, 3), i, dtype=np.uint8)).save(paths[-1])
    log = Log()
    start = time.perf_counter()
    check_val_images(paths, [(4, 5)] * 3, "ann.json", decode, 1, DistState(), log)
    took = time.perf_counter() - start
    [line] = log.lines
    match = re.fullmatch(r"validation set: 3 image headers checked in (\d+\.\d) s", line)
    assert match, line
    assert 0.0 <= float(match[1]) <= took + 0.05  # .1f rounds to the nearest tenth
    log = Log()
    with pytest.raises(DataError):
        check_val_images(paths, [(4, 6)] * 3, "ann.json", decode, 1, DistState(), log)
    assert log.lines == []


def test_files_whose_header_cannot_vouch_for_them_are_decoded_so_the_loaders_error_names_them(tmp_path):
    """A BMP (PIL reads its header, but it has neither an end marker nor a size field checked here, and the
    loaders cannot decode it) and a file PIL cannot identify at all: both go to the decoder, whose error is
    the one the training loader would raise, found before training instead."""
    bmp, text = tmp_path / "image.bmp", tmp_path / "notes.jpg"
    Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8)).save(bmp)
    text.write_text("hello world, not an image")
    with pytest.raises(DataError) as err:
        image_size(str(bmp), decode)
    assert str(err.value) == (f"{bmp}: not an image (the file starts with bytes {bmp.read_bytes()[:8].hex(' ')}, "
                              "not a JPEG, PNG, WebP or GIF signature)")
    with pytest.raises(DataError) as err:
        image_size(str(text), decode)
    assert str(err.value) == (f"{text}: not an image (the file starts with bytes 68 65 6c 6c 6f 20 77 6f, not a JPEG, "
                              "PNG, WebP or GIF signature)")


def test_the_val_check_without_annotated_sizes_checks_only_that_each_image_is_whole(tmp_path):
    """A classification val set has no annotation file: sizes=None. Any size is fine; a truncated file is
    still listed."""
    paths = []
    for i, hw in enumerate(((4, 5), (7, 3))):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((*hw, 3), i, dtype=np.uint8)).save(paths[-1])
    check_val_images(paths, None, None, decode, 1, DistState())
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:40])
    with pytest.raises(DataError) as err:
        check_val_images(paths, None, None, decode, 1, DistState())
    assert str(err.value).startswith(f"the validation set: 1 of 2 images cannot be used:\n  {paths[1]}: ")
    assert len(str(err.value).splitlines()) == 2


def test_a_long_list_of_problems_shows_the_first_50_and_counts_the_rest():
    from engine.datacheck import check_images

    class Log:
        def info(self, text):
            pass

    def check(path):
        raise DataError(f"{path}: broken")

    for n, more in ((50, []), (51, ["  ... and 1 more"]), (53, ["  ... and 3 more"])):
        paths = [f"img{i:02d}.jpg" for i in range(n)]
        with pytest.raises(DataError) as err:
            check_images(paths, check, 2, Log())
        assert str(err.value).splitlines() == [f"--check-data: {n} of {n} images cannot be used:"] + [
            f"  img{i:02d}.jpg: broken" for i in range(50)] + more, n


def test_only_the_batchnorm_error_of_a_batch_of_one_is_refused_anything_else_the_meta_device_cannot_run_passes():
    """The meta-device pass must not stop a run for an error the real run would not have: any other
    exception (another ValueError included) is left for the real run to tell."""

    class Fails(torch.nn.Module):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def forward(self, x):
            raise self.exc

    for exc in (ValueError("Expected 4D input"), NotImplementedError("more than 1 value per channel"),
                RuntimeError("no meta kernel")):
        check_single_image_batch(lambda: Fails(exc), (3, 8, 8), "X", "Y")
    with pytest.raises(DataError, match=r"^X, and the model cannot train on one image \(its BatchNorm needs more "
                                        r"than one value per channel: Expected more than 1 value per channel\); Y$"):
        check_single_image_batch(lambda: Fails(ValueError("Expected more than 1 value per channel")), (3, 8, 8),
                                 "X", "Y")
