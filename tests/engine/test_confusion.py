"""engine/confusion.py against torchvision's segmentation reference (references/segmentation/utils.py
ConfusionMatrix), worked by hand on small masks: rows are the ground truth, columns the prediction,
targets outside [0, n) are not counted; pixel accuracy = trace / sum, IoU = diag / (row + col - diag)."""

import math

import pytest
import torch

from engine.confusion import confusion_matrix, segmentation_scores


def test_hand_counted_matrix_skips_targets_outside_the_classes_and_scores_it():
    """3 classes. The target 3 (= num_classes, just past the last class) and 255 (the ignore index)
    are not counted; class 2 is one pixel predicted right: its union is 1, its IoU 100%."""
    target = torch.tensor([[0, 0, 1, 3], [2, 255, 1, 0]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]])
    mat = confusion_matrix(target, pred, 3)
    assert mat.dtype == torch.int64
    assert mat.tolist() == [[2, 1, 0],   # class 0: 2 right, 1 taken for class 1
                            [0, 2, 0],   # class 1: 2 right
                            [0, 0, 1]]   # class 2: 1 right
    s = segmentation_scores(mat)
    # unions: class 0: 3 + 2 - 2 = 3, class 1: 2 + 3 - 2 = 3, class 2: 1 + 1 - 1 = 1
    assert s["iou"] == pytest.approx([200 / 3, 200 / 3, 100.0])
    assert s["miou"] == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 5 / 6)


def test_a_single_pixel_and_no_pixel_at_all():
    """One counted pixel is a pixel accuracy of 100% (right) or 0% (wrong), not undefined; a shard
    whose every pixel is ignored has no accuracy and no IoU (NaN and None, as the reference's 0/0)."""
    right = segmentation_scores(confusion_matrix(torch.tensor([[1]]), torch.tensor([[1]]), 2))
    assert right["pixel_acc"] == 100.0 and right["miou"] == 100.0 and right["iou"] == [None, 100.0]
    wrong = segmentation_scores(confusion_matrix(torch.tensor([[1]]), torch.tensor([[0]]), 2))
    assert wrong["pixel_acc"] == 0.0 and wrong["miou"] == 0.0 and wrong["iou"] == [0.0, 0.0]
    empty = segmentation_scores(confusion_matrix(torch.full((2, 2), 255), torch.zeros(2, 2, dtype=torch.long), 2))
    assert math.isnan(empty["pixel_acc"]) and math.isnan(empty["miou"]) and empty["iou"] == [None, None]


def test_target_and_prediction_of_different_shapes_are_refused():
    """Same number of pixels, other layout: flattening would pair the wrong pixels silently."""
    with pytest.raises(ValueError) as err:
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 4)
    assert str(err.value) == "target (2, 3) and prediction (3, 2) differ in shape"
