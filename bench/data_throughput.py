"""The training transform's images/s per loader worker on natural photographs, against the reference PIL
pipeline and against a bare full decode of the same files.

    python bench/data_throughput.py                 # the built-in photographs (tools/make_photos.py)
    python bench/data_throughput.py --data DIR      # any ImageFolder: DIR/<class>/*.jpg, DIR/train/...,
                                                    # or a toy-data root (DIR/imagenet/train)

One thread, as in a DataLoader worker, timed in CPU seconds of that thread (images/s per core); the rows
are timed interleaved in one run, 25 files at a time, each chunk `--reps` times, the fastest counting
(see fastest_of_rounds), so a load on the machine hits them alike. Each reads the file's bytes from
disk (the page cache, after the first round).
- reference: torchvision's classification reference, per sample: PIL decode -> RandomResizedCrop ->
  flip -> AutoAugment(nearest) -> to tensor -> float -> Normalize -> RandomErasing;
- ours: data/classification.py's ImageFolder item (the loader-worker part): the crop drawn from the JPEG
  header, only the crop decoded (data/_jpeg.c, libjpeg-turbo's partial decode; at 1/2-1/8 scale where
  it is >= 2x the output) -> resize (torch, uint8) -> flip + AutoAugment (PIL, data/autoaugment.py) ->
  erase-box draw, seeded per sample. The rest (normalize + erase) runs once per batch on the training
  device; its CPU cost per image is printed too, for training on a CPU. Beside it, ours with
  data.dct_downscale false (every crop decoded at full size: the whole decode's pixels), ours
  decoding whole images (an install without data/_jpeg), and ours on the same photographs rewritten
  by tools/restart_markers.py (a restart marker after every MCU: only the MCUs around the crop are
  entropy-decoded; the same pixels);
- bare decode: PIL open + convert("RGB") of the whole file (torchvision's loader), nothing else: what
  any pipeline that decodes every pixel pays at least; torchvision's full decode (libjpeg-turbo) is
  printed beside it.
Then the pixel difference of ours against the reference for the same generator state (the same crop,
flip, AutoAugment sub-policy and magnitudes): after crop + resize + flip (the decode and resize
differences themselves), and after AutoAugment (where Solarize, Posterize and Equalize can turn a
one-level difference into a large one on a few pixels).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as V1
from torchvision.transforms import InterpolationMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import machine  # noqa: E402
from data import classification  # noqa: E402
from data.classification import (IMAGENET_MEAN, IMAGENET_STD, BatchTransform, ClassificationDataConfig,  # noqa: E402
                                 ImageFolder, TrainTransform, decode)
from tools import make_photos, restart_markers  # noqa: E402

PHOTOS = ROOT / "photo_data"  # git-ignored; built once by tools/make_photos.py


def split_dir(data: Path) -> Path:
    for candidate in (data / "imagenet" / "train", data / "train"):
        if candidate.is_dir():
            return candidate
    return data


def reference_transform(size: int, erase: bool = True):
    return V1.Compose([
        V1.RandomResizedCrop(size, interpolation=InterpolationMode.BILINEAR), V1.RandomHorizontalFlip(),
        V1.AutoAugment(V1.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.NEAREST), V1.PILToTensor(),
        *([V1.ConvertImageDtype(torch.float), V1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
           V1.RandomErasing(p=0.2, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)] if erase else [])])


def fastest_of_rounds(fns: dict, n: int, rounds: int, chunk: int = 25) -> dict[str, float]:
    """CPU seconds of this thread each fn(indices) takes for indices 0..n-1 (images per CPU second is
    images/s per core; everything runs on this one thread): the files in chunks of `chunk`, each chunk
    timed `rounds` times per fn after one warm-up pass, the fns in alternation (in a rotating order)
    chunk by chunk; a chunk counts with its fastest time. CPU time, not wall time, because on a shared
    machine other processes take the core away in bursts (a wall-clock figure then measures them);
    what they still change (caches, memory bandwidth) only slows a measurement down, so the fastest of
    several short ones is the best estimate, and the alternation exposes all pipelines alike."""
    names = list(fns)
    chunks = [list(range(i, min(i + chunk, n))) for i in range(0, n, chunk)]
    for fn in fns.values():
        fn(range(n))
    best = {k: [float("inf")] * len(chunks) for k in fns}
    for r in range(rounds):
        for c, indices in enumerate(chunks):
            order = names[(r + c) % len(names):] + names[:(r + c) % len(names)]
            for k in order:
                start = time.thread_time()
                fns[k](indices)
                best[k][c] = min(best[k][c], time.thread_time() - start)
    return {k: sum(v) for k, v in best.items()}


def pixel_difference(ours: ImageFolder, files: list[str], size: int) -> dict[str, float]:
    """Ours against the reference for the same generator state, per value (uint8 levels)."""
    no_aa = V1.Compose([V1.RandomResizedCrop(size, interpolation=InterpolationMode.BILINEAR),
                        V1.RandomHorizontalFlip(), V1.PILToTensor()])
    with_aa = reference_transform(size, erase=False)
    tf = ours.transform
    saved = tf.auto_augment
    out = {}
    for label, ref, aa in (("crop", no_aa, None), ("aa", with_aa, saved)):
        tf.auto_augment = aa
        diffs = []
        for seed, f in enumerate(files):
            with open(f, "rb") as fh:
                data = fh.read()
            torch.manual_seed(seed)
            a = tf.augment_bytes(data, f).permute(2, 0, 1).int()
            torch.manual_seed(seed)
            b = ref(Image.open(io.BytesIO(data)).convert("RGB")).int()
            diffs.append((a - b).abs().flatten())
        d = torch.cat(diffs)
        out |= {f"{label}_mean": d.float().mean().item(), f"{label}_max": int(d.max()),
                f"{label}_over8": (d > 8).float().mean().item()}
    tf.auto_augment = saved
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None,
                    help="an ImageFolder (default: the built-in photographs, made on first use in photo_data/)")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (the fastest counts)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    split = make_photos.ensure(PHOTOS) if args.data is None else split_dir(args.data)
    cfg = ClassificationDataConfig(root=str(split.parent), batch_size=32, workers=0, crop_size=args.size,
                                   scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear", hflip=0.5,
                                   auto_augment="imagenet", auto_augment_interpolation="nearest",
                                   random_erasing=0.2, val_resize=256, val_crop=args.size)
    ours = ImageFolder(split, TrainTransform(cfg), seed=0, train=True)
    n = min(args.images, len(ours))
    # every (len / n)-th file, so a subset keeps the mix of sizes and classes
    picked = [round(i * len(ours) / n) for i in range(n)]
    files = [ours.samples[i][0] for i in picked]
    reference = reference_transform(args.size)

    def run_reference(indices):
        for i in indices:
            with open(files[i], "rb") as fh:
                reference(Image.open(fh).convert("RGB"))

    def run_ours(indices):
        for i in indices:
            ours[(0, picked[i])]

    exact = ImageFolder(split, TrainTransform(dataclasses.replace(cfg, dct_downscale=False)), seed=0, train=True)

    def run_exact(indices):
        for i in indices:
            exact[(0, picked[i])]

    def run_restarted(indices):  # the same photographs rewritten by tools/restart_markers.py, read from disk
        for i in indices:
            restarted[(0, picked[i])]

    def run_whole(indices):  # an install without data/_jpeg: the whole image decoded (torchvision)
        built, classification._jpeg = classification._jpeg, None
        try:
            run_exact(indices)
        finally:
            classification._jpeg = built

    def run_bare(indices):
        for i in indices:
            with open(files[i], "rb") as fh:
                Image.open(fh).convert("RGB")

    def run_torchvision_decode(indices):
        for i in indices:
            decode(files[i])

    pipelines = {"reference": run_reference, "ours": run_ours, "exact": run_exact, "whole": run_whole, "bare": run_bare,
                 "torchvision_decode": run_torchvision_decode}
    scratch = tempfile.TemporaryDirectory(prefix="restart_markers_")
    if classification._jpeg is None:  # not built: "ours" is the whole decode already
        del pipelines["whole"]
    else:
        counts = restart_markers.rewrite(split, Path(scratch.name) / "train", log=lambda _: None)
        growth = counts["bytes_after"] / counts["bytes_before"]
        restarted = ImageFolder(Path(scratch.name) / "train", TrainTransform(cfg), seed=0, train=True)
        pipelines["restarted"] = run_restarted
    t = fastest_of_rounds(pipelines, n, rounds=args.reps)
    batch_tf = BatchTransform(IMAGENET_MEAN, IMAGENET_STD, channels_last=True)
    items = [ours[(0, i)] for i in picked[:32]]
    batch, boxes = torch.stack([it[0] for it in items]), torch.stack([it[2] for it in items])
    batch_tf(batch, boxes)
    start = time.thread_time()
    for _ in range(5):
        batch_tf(batch, boxes)
    batch_ms = 1e3 * (time.thread_time() - start) / (5 * len(items))
    diff = pixel_difference(ours, files, args.size)
    diff_exact = pixel_difference(exact, files, args.size)
    ips = {k: n / v for k, v in t.items()}
    sizes = np.array([Image.open(f).size for f in files])
    kbytes = np.mean([Path(f).stat().st_size for f in files]) / 1e3
    print(f"machine: {machine()}")
    print(f"{n} images from {split} (mean {sizes[:, 0].mean():.0f} x {sizes[:, 1].mean():.0f} px, "
          f"{kbytes:.0f} kB per file), crop {args.size}, one thread (one loader worker)")
    print(f"  reference PIL pipeline:          {ips['reference']:7.1f} images/s per core")
    print(f"  ours (loader-worker part):       {ips['ours']:7.1f} images/s per core   (JPEG decode: "
          + ("the crop only, data/_jpeg)" if classification._jpeg else "whole images: data/_jpeg is not built)"))
    print(f"    with data.dct_downscale false: {ips['exact']:7.1f} images/s per core")
    if "whole" in ips:
        print(f"    decoding whole images:         {ips['whole']:7.1f} images/s per core   (without data/_jpeg)")
        print(f"    files with restart markers:    {ips['restarted']:7.1f} images/s per core   "
              f"(tools/restart_markers.py: the same pixels, {growth:.3f}x the bytes)")
    print(f"  bare full decode (PIL):          {ips['bare']:7.1f} images/s per core")
    print(f"  bare full decode (torchvision):  {ips['torchvision_decode']:7.1f} images/s per core")
    print(f"  ratio ours / reference:          {ips['ours'] / ips['reference']:.2f}")
    print(f"  ratio ours / bare decode (PIL):  {ips['ours'] / ips['bare']:.2f}   "
          f"(/ torchvision's: {ips['ours'] / ips['torchvision_decode']:.2f})")
    if "restarted" in ips:
        print(f"  with restart markers:            {ips['restarted'] / ips['reference']:.2f} x the reference, "
              f"{ips['restarted'] / ips['bare']:.2f} x the bare PIL decode (of the original files)")
    print(f"  ours, batch part on this CPU:    {batch_ms:.3f} ms/image (on a GPU it runs on the device); "
          f"ratio with it charged to the worker: {(1e3 / ips['reference']) / (1e3 / ips['ours'] + batch_ms):.2f}")
    print("  pixels, ours - reference, same draws (uint8 levels):")
    for label, d in (("ours", diff), ("dct_downscale false", diff_exact)):
        print(f"    {label + ':':21s} after crop+resize+flip mean {d['crop_mean']:.3f}, max {d['crop_max']}, "
              f"{100 * d['crop_over8']:.3f}% of values > 8; after AutoAugment mean {d['aa_mean']:.3f}, "
              f"max {d['aa_max']}, {100 * d['aa_over8']:.3f}% > 8")
    scratch.cleanup()
    return {**ips, "ratio": ips["ours"] / ips["reference"], "ratio_bare": ips["ours"] / ips["bare"], **diff,
            "exact": {"ratio": ips["exact"] / ips["reference"], **diff_exact}}


if __name__ == "__main__":
    main()
