"""Semantic-segmentation metrics from a confusion matrix of pixel counts (exact across ranks).

torchvision's segmentation reference (references/segmentation/utils.py ConfusionMatrix): rows are
the ground-truth class, columns the predicted class, pixels whose target is the ignore index
(255) or otherwise outside [0, n) are not counted. From the matrix:
    pixel accuracy  = trace / sum
    IoU of class c  = diag[c] / (row[c] + col[c] - diag[c])
    mIoU            = mean IoU over the classes that occur in the ground truth or the predictions
The reference averages all n classes; a class absent from both gives 0/0 there (NaN). On COCO val
every one of the 21 classes occurs, so both definitions give the published number; ours stays
defined on small sets (toy data, a shard) where a class may be absent.
"""

from __future__ import annotations

import torch


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: [t, p] = pixels of target class t predicted as p.

    target: integer tensor of any shape (uint8 masks are fine); values outside [0, num_classes),
    such as the ignore index 255, are skipped. pred: same shape, values in [0, num_classes).
    """
    if target.shape != pred.shape:
        raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(pred.shape)} differ in shape")
    t = target.reshape(-1).long()
    keep = (t >= 0) & (t < num_classes)
    idx = num_classes * t[keep] + pred.reshape(-1)[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(mat: torch.Tensor) -> dict:
    """miou and pixel_acc in percent, and iou: one value per class in percent (None where the class
    occurs in neither the ground truth nor the predictions)."""
    h = mat.detach().to("cpu", torch.float64)
    diag, rows, cols = h.diag(), h.sum(1), h.sum(0)
    union = rows + cols - diag
    present = union > 0
    iou = torch.where(present, diag / union.clamp(min=1), torch.nan)
    total = h.sum()
    return {
        "miou": 100.0 * iou[present].mean().item() if present.any() else float("nan"),
        "pixel_acc": 100.0 * (diag.sum() / total).item(),  # 0 / 0: nan, as for an empty matrix's mIoU
        "iou": [100.0 * v if p else None for v, p in zip(iou.tolist(), present.tolist())],
    }
