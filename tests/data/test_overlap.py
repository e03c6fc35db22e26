"""The segmentation label map marks pixels covered by two or more kept instances as ignored, for any
number of instances (a uint8 counter wrapped to 0 at 256 and let the class through)."""

import numpy as np
import torch
from pycocotools import mask as coco_mask

from data.segmentation import IGNORE_INDEX, rasterise


def _square(x0, y0, x1, y1, category):
    return {"segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], "category_id": category}


def _reference(anns, h, w):
    """coco_utils.ConvertCocoPolysToMask: per-instance uint8 masks x class, max over instances, and 255
    where masks.sum(0) > 1 (torch sums uint8 into int64: no wrap)."""
    masks = torch.stack([torch.from_numpy(coco_mask.decode(coco_mask.frPyObjects(a["segmentation"], h, w)))
                         .any(dim=2).to(torch.uint8) for a in anns])
    cats = torch.tensor([a["category_id"] for a in anns], dtype=torch.uint8)[:, None, None]
    target, _ = (masks * cats).max(dim=0)
    target[masks.sum(0) > 1] = IGNORE_INDEX
    return target.numpy(), masks.sum(0)


def test_overlaps_of_256_and_more_instances_are_ignored():
    anns = ([_square(1, 1, 6, 6, 3)] * 256 + [_square(9, 9, 14, 14, 5)] + [_square(1, 9, 6, 14, 7)] * 257
            + [_square(9, 1, 14, 6, 9)] * 2)
    target = rasterise(anns, 16, 16)
    want, count = _reference(anns, 16, 16)
    assert {int(count[3, 3]), int(count[11, 3]), int(count[3, 11])} == {256, 257, 2}
    assert np.array_equal(target, want)
    assert target[3, 3] == target[11, 3] == target[3, 11] == IGNORE_INDEX and target[11, 11] == 5
