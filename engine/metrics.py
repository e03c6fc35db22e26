"""Classification metrics as counts, so they reduce exactly across ranks, and the evaluation loop that
classification and QAT share."""

from __future__ import annotations

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Number of samples whose target is among the top-k logits, for each k (a float64 tensor)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return torch.stack([hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]).to(torch.float64)


@torch.no_grad()
def evaluate_classifier(model, loader, batch_tf, device: torch.device, dist, amp_dtype: torch.dtype | None = None
                        ) -> dict:
    """Acc@1, Acc@5 and mean cross-entropy over every validation image exactly once (the loader shards
    without padding), reduced across ranks. `device` is where the model runs; the counts are reduced on
    the process group's device, so an int8 model evaluated on the CPU works under NCCL too. `model` may
    be a TorchScript module (an int8 export)."""
    from engine import distributed

    if isinstance(model, torch.nn.Module):
        model.eval()
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # top1, top5, loss sum, images
    for images, targets in loader:
        images = batch_tf(images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        counts[:2] += topk_correct(logits.float(), targets, (1, 5))
        counts[2] += torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum").double()
        counts[3] += targets.numel()
    top1, top5, loss, n = distributed.all_reduce_sum(counts.to(dist.device), dist).tolist()
    return {"acc1": 100.0 * top1 / n, "acc5": 100.0 * top5 / n, "val_loss": loss / n, "val_images": int(n)}
