"""Segmentation: training and evaluation images/s against torchvision's reference pipeline, and the
low-res / high-res evaluation speed-up beside the published one, on CPU.

    python bench/segmentation.py --data toy_data [--model lraspp_mobilenet_v3_large] [--images 8]

Both pipelines read the same toy COCO images and annotation file, one thread each (one process).
Reference (torchvision's references/segmentation, as the weights were trained): PIL decode ->
pycocotools masks rebuilt for every sample (FilterAndRemapCocoCategories + ConvertCocoPolysToMask) ->
RandomResize (PIL) -> flip -> RandomCrop with padding -> ToTensor -> Normalize, float batches,
torchvision's model in NCHW; evaluation: Resize(520) on PIL, float tensors, confusion matrix by
bincount. Ours (train_segmentation.py): masks from the PNG cache, the seeded joint transform on
uint8 tensors, uint8 batches normalized once per batch, the model channels_last; evaluation: the
same uint8 path, size-grouped batches (here batch 1, as the reference), engine.confusion.
- training data: the per-sample part, what one loader worker does (decode, mask, augment);
- train: one optimizer step (SGD, the recipe's) on a batch prepared from scratch (data + step);
- eval: one image from file to confusion-matrix update;
- speed-up: model inference at short side 320 against 520 on a 4:3 image (COCO's usual shape),
  1 - t320 / t520, for each model, beside the blog's CPU figures (LR-ASPP 65.26%, DeepLabV3 63.86%,
  FCN 57.57%).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved, machine  # noqa: E402
from data.classification import IMAGENET_MEAN, IMAGENET_STD, BatchTransform  # noqa: E402
from data.segmentation import CAT_LIST, CocoVoc, EvalTransform, TrainTransform  # noqa: E402
from engine.confusion import confusion_matrix  # noqa: E402
from models import build  # noqa: E402

# blog, low-res table: CPU s/img at 520 and at 320, and the speed-up it states (1 - t320 / t520, in percent)
PUBLISHED_SPEEDUP = {"lraspp_mobilenet_v3_large": (0.3278, 0.1139, 65.26),
                     "deeplabv3_mobilenet_v3_large": (0.5869, 0.2121, 63.86),
                     "fcn_mobilenet_v3_large": (0.3702, 0.1571, 57.57)}


# ----------------------------------------------------------------------------- the reference pipeline


class ReferenceCocoVoc:
    """torchvision's references/segmentation/coco_utils.py get_coco(), transforms applied per sample."""

    def __init__(self, root: Path, split: str, train: bool, crop: int, base: int):
        import contextlib
        import io

        from pycocotools.coco import COCO

        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO(str(root / "annotations" / f"instances_{split}2017.json"))
        self.folder, self.train, self.crop, self.base = root / f"{split}2017", train, crop, base
        ids = sorted(self.coco.imgs)
        if train:  # _coco_remove_images_without_annotations
            def ok(i):
                anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=i)) if a["category_id"] in CAT_LIST]
                return len(anns) > 0 and sum(a["area"] for a in anns) > 1000
            ids = [i for i in ids if ok(i)]
        self.ids = ids

    def target(self, img_id: int, w: int, h: int) -> Image.Image:
        from pycocotools import mask as coco_mask

        anns = [dict(a, category_id=CAT_LIST.index(a["category_id"]))
                for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id)) if a["category_id"] in CAT_LIST]
        if not anns:
            return Image.fromarray(np.zeros((h, w), dtype=np.uint8))
        masks = []
        for a in anns:
            m = coco_mask.decode(coco_mask.frPyObjects(a["segmentation"], h, w))
            masks.append(torch.as_tensor(m[..., None] if m.ndim < 3 else m, dtype=torch.uint8).any(dim=2))
        masks = torch.stack(masks).to(torch.uint8)
        cats = torch.as_tensor([a["category_id"] for a in anns], dtype=torch.uint8)
        target, _ = (masks * cats[:, None, None]).max(dim=0)
        target[masks.sum(0) > 1] = 255
        return Image.fromarray(target.numpy())

    def __getitem__(self, index: int):
        img_id = self.ids[index]
        info = self.coco.loadImgs(img_id)[0]
        image = Image.open(self.folder / info["file_name"]).convert("RGB")
        target = self.target(img_id, *image.size)
        if self.train:
            size = int(torch.randint(self.base // 2, 2 * self.base + 1, (1,)))
            image, target = TF.resize(image, size), TF.resize(target, size, interpolation=InterpolationMode.NEAREST)
            if torch.rand(1) < 0.5:
                image, target = TF.hflip(image), TF.hflip(target)
            w, h = image.size
            if min(w, h) < self.crop:
                pad = [0, 0, max(self.crop - w, 0), max(self.crop - h, 0)]
                image, target = TF.pad(image, pad, fill=0), TF.pad(target, pad, fill=255)
            top = int(torch.randint(0, image.size[1] - self.crop + 1, (1,)))
            left = int(torch.randint(0, image.size[0] - self.crop + 1, (1,)))
            image, target = TF.crop(image, top, left, self.crop, self.crop), TF.crop(target, top, left, self.crop,
                                                                                     self.crop)
        else:
            image = TF.resize(image, self.base)
            target = TF.resize(target, self.base, interpolation=InterpolationMode.NEAREST)
        x = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        return x, torch.as_tensor(np.array(target), dtype=torch.int64)


def reference_confusion(target: torch.Tensor, pred: torch.Tensor, n: int = 21) -> torch.Tensor:
    """references/segmentation/utils.py ConfusionMatrix.update."""
    a, b = target.flatten(), pred.flatten()
    k = (a >= 0) & (a < n)
    return torch.bincount(n * a[k].to(torch.int64) + b[k], minlength=n ** 2).reshape(n, n)


# ----------------------------------------------------------------------------- measurements


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-6)


def _train_step(model, opt, x, y):
    loss = F.cross_entropy(model(x)["out"], y, ignore_index=255)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("toy_data"), help="folder made by tools/make_toy_data.py")
    ap.add_argument("--model", default="lraspp_mobilenet_v3_large")
    ap.add_argument("--crop", type=int, default=480)
    ap.add_argument("--eval-size", type=int, default=520)
    ap.add_argument("--low-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--images", type=int, default=8, help="val images per evaluation measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--speedup-models", nargs="*", default=list(PUBLISHED_SPEEDUP))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = args.data / "coco"
    cache = Path(tempfile.mkdtemp(prefix="seg-bench-cache-"))

    ours_train = CocoVoc(root, "train", TrainTransform(args.crop, (args.eval_size // 2, 2 * args.eval_size), 0.5), 0,
                         cache)
    ours_val = CocoVoc(root, "val", EvalTransform(args.eval_size), 0, cache)
    for ds in (ours_train, ours_val):  # fill the mask cache: a training run computes each mask once
        for i in range(len(ds)):
            ds.mask(i)
    ref_train = ReferenceCocoVoc(root, "train", True, args.crop, args.eval_size)
    ref_val = ReferenceCocoVoc(root, "val", False, args.crop, args.eval_size)
    batch_tf = BatchTransform(IMAGENET_MEAN, IMAGENET_STD, channels_last=True)

    tv_builder = getattr(torchvision.models.segmentation, args.model, None)
    ref_model = (tv_builder(weights=None, weights_backbone=None, num_classes=21) if tv_builder is not None
                 else build(args.model))  # torchvision has no FCN-MobileNetV3: its own parts, NCHW
    ours_model = copy.deepcopy(ref_model) if tv_builder is None else build(args.model)
    ours_model.load_state_dict(ref_model.state_dict())
    ours_model = ours_model.to(memory_format=torch.channels_last)
    ref_opt, ours_opt = _sgd(ref_model), _sgd(ours_model)
    counter = {"ref": 0, "ours": 0, "epoch": 0}

    def ref_train_batch():
        ref_model.train()
        items = [ref_train[(counter["ref"] + k) % len(ref_train.ids)] for k in range(args.batch)]
        counter["ref"] += args.batch
        _train_step(ref_model, ref_opt, torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))

    def ours_train_batch():
        ours_model.train()
        items = [ours_train[(counter["epoch"], (counter["ours"] + k) % len(ours_train))] for k in range(args.batch)]
        counter["ours"] += args.batch
        images, masks = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
        _train_step(ours_model, ours_opt, batch_tf(images), masks.long())

    n_eval = min(args.images, len(ours_val))

    @torch.no_grad()
    def ref_eval():
        ref_model.eval()
        mat = torch.zeros(21, 21, dtype=torch.int64)
        for i in range(n_eval):
            x, y = ref_val[i]
            mat += reference_confusion(y, ref_model(x[None])["out"].argmax(1)[0])

    @torch.no_grad()
    def ours_eval():
        ours_model.eval()
        mat = torch.zeros(21, 21, dtype=torch.int64)
        for i in range(n_eval):
            image, mask = ours_val[(0, i)]
            mat += confusion_matrix(mask, ours_model(batch_tf(image[None]))["out"].argmax(1)[0], 21)

    n_data = min(4 * args.batch, len(ours_train))

    def ref_data():
        for i in range(n_data):
            ref_train[i]

    def ours_data():
        for i in range(n_data):
            ours_train[(0, i)]

    t_data = interleaved({"reference": ref_data, "ours": ours_data}, reps=args.reps, warmup=1)
    t_train = interleaved({"reference": ref_train_batch, "ours": ours_train_batch}, reps=args.reps, warmup=1)
    t_eval = interleaved({"reference": ref_eval, "ours": ours_eval}, reps=args.reps, warmup=1)
    res = {"data_reference": n_data / t_data["reference"], "data_ours": n_data / t_data["ours"],
           "train_reference": args.batch / t_train["reference"], "train_ours": args.batch / t_train["ours"],
           "eval_reference": n_eval / t_eval["reference"], "eval_ours": n_eval / t_eval["ours"]}
    res["data_ratio"] = res["data_ours"] / res["data_reference"]
    res["train_ratio"] = res["train_ours"] / res["train_reference"]
    res["eval_ratio"] = res["eval_ours"] / res["eval_reference"]

    speedups = {}
    for name in args.speedup_models:
        model = build(name, **({} if name.startswith("lraspp") else {"aux_loss": True})).eval()  # as released
        model = model.to(memory_format=torch.channels_last)
        shapes = {s: (s, round(s * 4 / 3)) for s in (args.eval_size, args.low_size)}
        inputs = {s: torch.randn(1, 3, *hw).contiguous(memory_format=torch.channels_last) for s, hw in shapes.items()}

        def infer(x, m=model):
            with torch.no_grad():
                m(x)["out"].argmax(1)

        t = interleaved({s: (lambda x=x: infer(x)) for s, x in inputs.items()}, reps=args.reps, warmup=1)
        hi, lo = t[args.eval_size], t[args.low_size]
        speedups[name] = {"high_s": hi, "low_s": lo, "speedup": 1 - lo / hi,
                          "published": PUBLISHED_SPEEDUP[name][2] / 100}

    print(f"machine: {machine()}")
    print(f"{args.model}: toy COCO images, one thread; train crop {args.crop} (short side "
          f"[{args.eval_size // 2}, {2 * args.eval_size}]) batch {args.batch}; eval short side {args.eval_size}")
    print(f"  training data, one worker:  reference {res['data_reference']:6.2f} images/s   ours "
          f"{res['data_ours']:6.2f} images/s   ratio {res['data_ratio']:.2f}")
    print(f"  training, data + SGD step:  reference {res['train_reference']:6.2f} images/s   ours "
          f"{res['train_ours']:6.2f} images/s   ratio {res['train_ratio']:.2f}")
    print(f"  evaluation, file to metric: reference {res['eval_reference']:6.2f} images/s   ours "
          f"{res['eval_ours']:6.2f} images/s   ratio {res['eval_ratio']:.2f}")
    print(f"  low-res speed-up, inference at short side {args.low_size} vs {args.eval_size} on a 4:3 image:")
    for name, s in speedups.items():
        print(f"    {name:30s} {s['high_s'] * 1e3:8.1f} ms -> {s['low_s'] * 1e3:7.1f} ms: {100 * s['speedup']:.1f}% "
              f"faster (published {100 * s['published']:.2f}%)")
    return {**res, "speedup": speedups}


if __name__ == "__main__":
    main()
