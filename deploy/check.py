"""The check every export passes before it is kept: run the exported file in its runtime on the recipe's
validation set and compare with PyTorch on the same inputs.

Inputs are what the training script evaluates: classification the resized, centre-cropped, normalized
val images; segmentation the val images at short side data.eval_size, normalized; detection the val
images as float [0, 1] tensors of their own sizes (the detector resizes and normalizes inside its graph).

Tolerances (TOLERANCE): float exports must match PyTorch's logits / segmentation logits within an
absolute difference and give the same Acc@1 / mIoU on the val set; int8 exports must be within 1 point of
Acc@1 of the eager int8 model (the published row's model), or not shown to differ from it by the paired
test below; detections must match one for one (same count, same labels, boxes and scores within the
tolerance).

The int8 rule and small val sets. int8 kernels round differently (qnnpack, ONNX Runtime, XNNPACK), so a
faithful export still flips the top-1 of near-tied images, in both directions. On ImageNet's 50,000 val
images one point is 500 images and the flips cancel far below it; on a 100-image val set one point is one
image, and ONNX Runtime running the very same eager int8 model moved a toy run's Acc@1 by 2. So a
difference of more than 1 point fails only when it is also more than such flips explain. Of the images
exactly one of the two gets right (b only the export, c only the eager model), a faithful export's are
equally likely either way; the difference fails when the exact two-sided McNemar (sign) test of b against
c gives p < 0.05. On ImageNet that is the 1-point rule as it stands (1 point is 500 images net: p < 1e-6
even if 10,000 images flip); a broken export (wrong scales, layout or preprocessing) loses tens of points
with nearly every flip one way (p < 1e-9 on 100 images).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import torch

from deploy.source import Source
from engine.distributed import DistState

# Absolute tolerances, checked on every val image (stated in the sidecar and docs/export.md).
TOLERANCE = {
    "classification": {"logits": 1e-3},     # and Acc@1 equal
    "segmentation": {"logits": 1e-3},       # and mIoU equal
    "int8": {"acc1_points": 1.0, "mcnemar_p": 0.05},  # |Acc@1 difference| <= 1 point, or p >= 0.05 (above)
    "detection": {"boxes_px": 0.05, "scores": 1e-4},  # and the same number of detections and labels
}


class CheckFailed(Exception):
    """The export does not reproduce PyTorch within the stated tolerance."""


# ============================================================================ validation inputs


def classification_batches(src: Source, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalized images (N, 3, crop, crop), labels) over the val set, as the scripts evaluate them."""
    from data.classification import BatchTransform, build_loaders

    d = dataclasses.replace(src.cfg.data, workers=0, batch_size=batch_size or src.cfg.data.batch_size)
    _, _, _, loader = build_loaders(d, src.cfg.model.num_classes, src.cfg.run.seed, DistState(), train=False,
                                    check_val=False)
    tf = BatchTransform(d.mean, d.std, False)
    for images, labels, *_ in loader:
        yield tf(images), labels


def calibration_batches(src: Source) -> Iterator[torch.Tensor]:
    """The images eager PTQ calibrates on (train_qat.py): the first qat.calibration_batches x data.batch_size
    training images in folder order, with the training transform of epoch 0."""
    from torch.utils.data import BatchSampler

    from data.classification import BatchTransform, build_loaders, make_loader

    d = dataclasses.replace(src.cfg.data, workers=0)
    train_set, _, _, _ = build_loaders(d, src.cfg.model.num_classes, src.cfg.run.seed, DistState(), train=True,
                                       check_val=False)
    n = min(len(train_set), d.batch_size * src.cfg.qat.calibration_batches)
    loader = make_loader(train_set, BatchSampler([(0, i) for i in range(n)], d.batch_size, False), 0, False)
    tf = BatchTransform(d.mean, d.std, False)
    for images, _, erase in loader:
        yield tf(images, erase)


def segmentation_batches(src: Source) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(normalized images (1, 3, h, w) at short side data.eval_size, masks (1, h, w)), one image at a time."""
    from data.classification import BatchTransform
    from data.segmentation import CocoVoc, EvalTransform

    d = src.cfg.data
    val_set = CocoVoc(d.root, "val", EvalTransform(d.eval_size), src.cfg.run.seed, d.cache_dir())
    tf = BatchTransform(d.mean, d.std, False)
    for i in range(len(val_set)):
        image, mask = val_set[(0, i)]
        yield tf(image[None]), mask[None]


def detection_images(src: Source) -> Iterator[torch.Tensor]:
    """The val images, float (3, H, W) in [0, 1], each at its own size."""
    from data.detection import CocoDetection

    val_set = CocoDetection(src.cfg.data.root, "val", train=False, hflip=0.0, seed=src.cfg.run.seed,
                            box_margin=src.cfg.data.box_margin)
    for i in range(len(val_set)):
        yield val_set.load(i).float().div_(255)


# ============================================================================ comparisons


def mcnemar_p(b: int, c: int) -> float:
    """The exact two-sided McNemar (sign) test of b against c discordant pairs: the probability, if each of
    the b + c were equally likely to go either way, of a split at least as uneven."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def _acc1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """As the scripts count it (engine.metrics: topk, whose tie-break int8 logits often need)."""
    from engine.metrics import topk_correct

    return 100.0 * topk_correct(logits, labels, (1,)).item() / len(labels)


@torch.no_grad()
def check_classification(reference: Callable, exported: Callable, batches, int8: bool) -> dict:
    """reference/exported: (N, 3, H, W) -> logits (N, C). Float: logits within the tolerance and Acc@1
    equal; int8: Acc@1 within 1 point of the reference (the eager int8 model), or the difference not
    significant by the paired test (module docstring)."""
    ref, out, labels = [], [], []
    for x, y in batches:
        ref.append(reference(x).float())
        out.append(exported(x).float())
        labels.append(y)
    ref, out, labels = torch.cat(ref), torch.cat(out), torch.cat(labels)
    result = {"images": len(labels), "max_abs_diff": (ref - out).abs().max().item(),
              "top1_agreement": 100.0 * (ref.argmax(1) == out.argmax(1)).double().mean().item(),
              "acc1_pytorch": _acc1(ref, labels), "acc1_export": _acc1(out, labels)}
    if int8:
        tol = TOLERANCE["int8"]
        # per image, counted as _acc1 counts (topk's tie-break)
        right_ref, right_out = (x.topk(1, dim=1).indices[:, 0] == labels for x in (ref, out))
        b, c = int((right_out & ~right_ref).sum()), int((right_ref & ~right_out).sum())
        result.update(tolerance=tol, only_export_right=b, only_pytorch_right=c, mcnemar_p=mcnemar_p(b, c))
        apart = abs(result["acc1_export"] - result["acc1_pytorch"])
        if apart > tol["acc1_points"] and result["mcnemar_p"] < tol["mcnemar_p"]:
            raise CheckFailed(f"int8 Acc@1 {result['acc1_export']:.2f} vs the eager int8 model's "
                              f"{result['acc1_pytorch']:.2f} on {len(labels)} images: more than "
                              f"{tol['acc1_points']} point apart, and more than rounding flips explain ({b} "
                              f"image(s) only the export gets right, {c} only the eager model: McNemar p = "
                              f"{result['mcnemar_p']:.2g} < {tol['mcnemar_p']})")
    else:
        tol = TOLERANCE["classification"]
        result["tolerance"] = tol
        if not result["max_abs_diff"] <= tol["logits"] or result["acc1_export"] != result["acc1_pytorch"]:
            raise CheckFailed(f"logits differ by up to {result['max_abs_diff']:.3g} (tolerance {tol['logits']}), "
                              f"Acc@1 {result['acc1_export']:.2f} vs PyTorch's {result['acc1_pytorch']:.2f}")
    return result


@torch.no_grad()
def check_segmentation(reference: Callable, exported: Callable, batches) -> dict:
    """reference/exported: (N, 3, h, w) -> "out" logits (N, 21, h, w); logits within the tolerance and mIoU
    (confusion matrix over the val set, engine.confusion) equal."""
    from data.segmentation import NUM_CLASSES
    from engine.confusion import confusion_matrix, segmentation_scores

    mats = [torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64) for _ in range(2)]
    worst, n = 0.0, 0
    for x, mask in batches:
        ref, out = reference(x).float(), exported(x).float()
        worst = max(worst, (ref - out).abs().max().item())
        for mat, logits in zip(mats, (ref, out)):
            mat += confusion_matrix(mask, logits.argmax(1), NUM_CLASSES)
        n += x.shape[0]
    ref_s, out_s = (segmentation_scores(m) for m in mats)
    tol = TOLERANCE["segmentation"]
    result = {"images": n, "max_abs_diff": worst, "miou_pytorch": ref_s["miou"], "miou_export": out_s["miou"],
              "pixels_differing": int((mats[0] != mats[1]).sum().item()), "tolerance": tol}
    if not worst <= tol["logits"] or ref_s["miou"] != out_s["miou"]:
        raise CheckFailed(f"segmentation logits differ by up to {worst:.3g} (tolerance {tol['logits']}), mIoU "
                          f"{out_s['miou']:.3f} vs PyTorch's {ref_s['miou']:.3f}")
    return result


def match_detections(ref: dict, out: dict, image: str) -> dict:
    """One image's detections, PyTorch's and the export's. Both sort by score, but two detections whose
    scores differ by less than the score tolerance may come in either order (the runtimes' float sums
    differ in the last bits): each of PyTorch's, in order, is matched to the export's detection of the same
    label, with a score within the tolerance, whose box is nearest; then boxes and scores are compared."""
    tol = TOLERANCE["detection"]
    n_ref, n_out = len(ref["boxes"]), len(out["boxes"])
    if n_ref != n_out:
        raise CheckFailed(f"{image}: {n_out} detections from the export, {n_ref} from PyTorch")
    free, order = list(range(n_out)), []
    for i in range(n_ref):
        near = [j for j in free if int(out["labels"][j]) == int(ref["labels"][i])
                and abs(float(out["scores"][j]) - float(ref["scores"][i])) <= tol["scores"]]
        if not near:
            raise CheckFailed(f"{image}: PyTorch's detection {i} (label {int(ref['labels'][i])}, score "
                              f"{float(ref['scores'][i]):.4g}) has no counterpart in the export (labels "
                              f"{out['labels'].tolist()} vs PyTorch's {ref['labels'].tolist()})")
        j = min(near, key=lambda j: (ref["boxes"][i] - out["boxes"][j]).abs().max().item())
        free.remove(j)
        order.append(j)
    boxes, scores = out["boxes"][order], out["scores"][order]
    box = (ref["boxes"] - boxes).abs().max().item() if n_ref else 0.0
    score = (ref["scores"] - scores).abs().max().item() if n_ref else 0.0
    if box > tol["boxes_px"] or score > tol["scores"]:
        raise CheckFailed(f"{image}: boxes differ by up to {box:.3g} px (tolerance {tol['boxes_px']}), scores by "
                          f"{score:.3g} (tolerance {tol['scores']})")
    return {"detections": n_ref, "boxes_px": box, "scores": score}


@torch.no_grad()
def check_detection(reference: Callable, exported: Callable, images) -> dict:
    """reference/exported: float image (3, H, W) -> {boxes, labels, scores}; every image matched."""
    worst_box = worst_score = 0.0
    counts = []
    for i, image in enumerate(images):
        m = match_detections(reference(image), exported(image), f"val image {i} ({image.shape[1]}x{image.shape[2]})")
        worst_box, worst_score = max(worst_box, m["boxes_px"]), max(worst_score, m["scores"])
        counts.append(m["detections"])
    return {"images": len(counts), "detections": sum(counts), "images_with_0": counts.count(0),
            "images_with_1": counts.count(1), "max_abs_diff": {"boxes_px": worst_box, "scores": worst_score},
            "tolerance": TOLERANCE["detection"]}
