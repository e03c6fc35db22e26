"""The training transform's images/s per loader worker on real JPEGs, against the reference PIL pipeline.

    python bench/data_throughput.py --data toy_data [--images 400] [--size 224]

One thread, as in a DataLoader worker. Reference (torchvision's classification reference, per
sample): PIL decode -> RandomResizedCrop -> flip -> AutoAugment(nearest) -> to tensor -> float ->
Normalize -> RandomErasing. Ours (data/classification.py, per sample in the worker): decode to a
uint8 tensor -> RandomResizedCrop + flip on the tensor -> AutoAugment on PIL -> uint8 tensor +
erase-box draw, seeded per sample. The rest of ours (normalize + erase) runs once per batch on the
training device; its CPU cost per image is printed too, for training on a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as V1
from torchvision.transforms import InterpolationMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved, machine  # noqa: E402
from data.classification import (IMAGENET_MEAN, IMAGENET_STD, BatchTransform, ClassificationDataConfig,  # noqa: E402
                                 ImageFolder, TrainTransform)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("toy_data"), help="folder made by tools/make_toy_data.py")
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = ClassificationDataConfig(root=str(args.data / "imagenet"), batch_size=32, workers=0, crop_size=args.size,
                                   scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear", hflip=0.5,
                                   auto_augment="imagenet", auto_augment_interpolation="nearest",
                                   random_erasing=0.2, val_resize=256, val_crop=args.size)
    ours = ImageFolder(args.data / "imagenet" / "train", TrainTransform(cfg), seed=0, train=True)
    n = min(args.images, len(ours))
    files = [p for p, _ in ours.samples[:n]]
    reference = V1.Compose([
        V1.RandomResizedCrop(args.size, interpolation=InterpolationMode.BILINEAR), V1.RandomHorizontalFlip(),
        V1.AutoAugment(V1.AutoAugmentPolicy.IMAGENET, interpolation=InterpolationMode.NEAREST), V1.PILToTensor(),
        V1.ConvertImageDtype(torch.float), V1.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        V1.RandomErasing(p=0.2, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)])

    def run_reference():
        for f in files:
            with open(f, "rb") as fh:
                reference(Image.open(fh).convert("RGB"))

    def run_ours():
        for i in range(n):
            ours[(0, i)]

    t = interleaved({"reference": run_reference, "ours": run_ours}, reps=args.reps, warmup=1)
    batch_tf = BatchTransform(IMAGENET_MEAN, IMAGENET_STD, channels_last=True)
    batch = torch.stack([ours[(0, i)][0] for i in range(32)])
    boxes = torch.stack([ours[(0, i)][2] for i in range(32)])
    batch_tf(batch, boxes)
    start = time.perf_counter()
    for _ in range(5):
        batch_tf(batch, boxes)
    batch_ms = 1e3 * (time.perf_counter() - start) / (5 * 32)
    ref_ips, ours_ips = n / t["reference"], n / t["ours"]
    print(f"machine: {machine()}")
    print(f"{n} JPEGs from {args.data / 'imagenet/train'}, crop {args.size}, one thread (one loader worker)")
    print(f"  reference PIL pipeline:        {ref_ips:7.1f} images/s per worker")
    print(f"  ours (worker part):            {ours_ips:7.1f} images/s per worker")
    print(f"  ratio ours / reference:        {ours_ips / ref_ips:.2f}")
    print(f"  ours, batch part on this CPU:  {batch_ms:.3f} ms/image (on a GPU it runs on the device); "
          f"ratio with it charged to the worker: {(1e3 / ref_ips) / (1e3 / ours_ips + batch_ms):.2f}")
    return {"reference": ref_ips, "ours": ours_ips, "ratio": ours_ips / ref_ips}


if __name__ == "__main__":
    main()
