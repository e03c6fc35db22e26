"""Data checks before training, so that a bad image is not found only after a whole epoch.

- `check_val_images`, at every start: each validation image's header is read (its format, size and
  frame count, without decoding the pixels) and its end is checked for truncation; the size is compared
  with the annotation file's. A file whose header or end looks wrong is decoded in full, so this check
  never refuses an image that decodes. It costs 0.03 s per 1000 images on one thread (the toy data's
  532 JPEGs, on the 2-core CI machine; a full decode of the same took 0.29 s, and it grows with the
  pixel count, which the header read does not), so it runs at every start and resume. It does not find
  damage inside the compressed data: `--check-data` does.
- `check_images` (`--check-data`): decode every image of the dataset (and, where an annotation file
  states sizes, compare them) in parallel; every problem is listed at once.
"""

from __future__ import annotations

import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, UnidentifiedImageError

from engine.errors import DataError

# The last bytes of a complete file, by format (within the file's last TAIL bytes: writers may pad).
TAIL = 64
_ENDS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


def size_mismatch(path: str | Path, actual_hw: tuple[int, int], expected_hw: tuple[int, int],
                  source: str | Path) -> DataError:
    """The error for an image whose decoded size is not the one its annotation file states."""
    (h, w), (eh, ew) = actual_hw, expected_hw
    return DataError(f"{path}: the image is {w} x {h} px (width x height) but {source} says {ew} x {eh}: "
                     "its boxes and masks would not fit the image")


def image_size(path: str, decode: Callable[[str], object], open_file: Callable = open) -> tuple[int, int]:
    """(height, width) of an image file from its header, checking that the file is complete; the file
    is decoded in full (`decode`, which raises a DataError naming it) when the header cannot be read, the
    end is not the format's end marker, or the format is one whose frames need counting (GIF).
    `open_file(path, "rb")`: how a path opens (a shard set's samples: data.shards.ShardSource.open)."""
    try:
        with open_file(path, "rb") as fh, Image.open(fh) as im:
            fmt, (w, h) = im.format, im.size
            complete = False
            if fmt in _ENDS:
                fh.seek(max(0, fh.seek(0, 2) - TAIL))
                complete = _ENDS[fmt] in fh.read()
            elif fmt == "WEBP" and not getattr(im, "is_animated", False):
                fh.seek(0)
                head, size = fh.read(8), fh.seek(0, 2)
                complete = struct.unpack("<I", head[4:8])[0] + 8 <= size  # RIFF: the size it says it has
    except (OSError, UnidentifiedImageError, ValueError, struct.error, Image.DecompressionBombError):
        complete = False
    if complete:
        return h, w
    shape = decode(path).shape
    return int(shape[-2]), int(shape[-1])


def check_val_images(paths: Sequence[str], sizes: Sequence[tuple[int, int]] | None, source: str | Path | None,
                     decode: Callable[[str], object], workers: int, dist, log=None,
                     open_file: Callable = open) -> None:
    """Before training: every validation image's header and end (see the module docstring), and its size
    against `sizes` as `source` states them. Each rank checks its share; every rank raises the same
    DataError, listing every problem. `open_file`: see image_size."""
    start = time.perf_counter()

    def problem(i: int) -> str | None:
        try:
            hw = image_size(paths[i], decode, open_file)
            if sizes is not None and hw != tuple(sizes[i]):
                raise size_mismatch(paths[i], hw, sizes[i], source)
        except DataError as exc:
            return str(exc)
        return None

    mine = range(dist.rank, len(paths), dist.world_size)
    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        local = [p for p in pool.map(problem, mine, chunksize=64) if p is not None]
    from engine.distributed import all_gather_object

    problems = [p for part in all_gather_object(local, dist) for p in part]
    _raise(problems, len(paths), "the validation set")
    if log is not None:
        log.info(f"validation set: {len(paths)} image headers checked in {time.perf_counter() - start:.1f} s")


def check_single_image_batch(build_model: Callable[[], object], image_shape: tuple[int, ...], where: str,
                             fix: str) -> None:
    """For a training batch of one image (`where` says why there is one): a DataError saying `fix` if the
    model cannot train on it (BatchNorm over a 1 x 1 map needs more than one value per channel), found by
    a forward pass on the meta device (shapes only: no memory, no arithmetic)."""
    import torch

    with torch.device("meta"):
        model = build_model()
    try:
        model.train()(torch.empty((1, *image_shape), device="meta"))
    except Exception as exc:  # noqa: BLE001  (what else the meta device cannot run: the real run tells)
        if isinstance(exc, ValueError) and "more than 1 value per channel" in str(exc):
            raise DataError(f"{where}, and the model cannot train on one image (its BatchNorm needs more "
                            f"than one value per channel: {exc}); {fix}") from None


def check_images(paths: Sequence[str], check: Callable[[str], object], workers: int, log) -> None:
    """`--check-data`: run `check` (a decode, with a size check where sizes are known) on each path
    (torchvision's decoders release the GIL, so threads run in parallel); raise a DataError listing every
    file that fails (`check` raises DataError naming the file and the reason)."""
    threads = max(workers, 1)
    log.info(f"--check-data: decoding {len(paths)} images with {threads} thread{'s' if threads > 1 else ''}")

    def problem(path: str) -> str | None:
        try:
            check(path)
        except DataError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = [p for p in pool.map(problem, paths, chunksize=64) if p is not None]
    _raise(problems, len(paths), "--check-data")
    log.info(f"--check-data: all {len(paths)} images decode")


def _raise(problems: list[str], total: int, what: str) -> None:
    if problems:
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise DataError(f"{what}: {len(problems)} of {total} images cannot be used:\n  "
                        + "\n  ".join(problems[:50]) + more)
