"""deploy/check.py: the detection matching (near-tied scores in either order), and the int8 rule: within
1 point of the eager int8 model's Acc@1, or a difference the exact McNemar test does not tell from rounding
flips. The logits are built so that chosen images are right for
one model, the other or both; the p-values are computed by hand from the binomial distribution."""

from __future__ import annotations

import pytest
import torch

from deploy.check import CheckFailed, check_classification, match_detections, mcnemar_p


def models(n: int, both: int, only_export: int, only_eager: int):
    """(reference, exported, batches) over n images of 10 classes: `both` images right for both models,
    `only_export` right for the export only, `only_eager` for the eager model only, the rest wrong for both.
    Each model's logits put 1.0 on the class it predicts."""
    labels = torch.arange(n) % 10
    wrong = (labels + 1) % 10
    ref_pred, out_pred = wrong.clone(), wrong.clone()
    a, b, c = both, both + only_export, both + only_export + only_eager
    ref_pred[:a], out_pred[:a] = labels[:a], labels[:a]
    out_pred[a:b] = labels[a:b]
    ref_pred[b:c] = labels[b:c]
    ref = torch.nn.functional.one_hot(ref_pred, 10).float()
    out = torch.nn.functional.one_hot(out_pred, 10).float()
    index = torch.arange(n)
    batches = [(index[i:i + 32], labels[i:i + 32]) for i in range(0, n, 32)]
    return (lambda x: ref[x]), (lambda x: out[x]), batches


def test_mcnemar_p_is_the_exact_two_sided_sign_test():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(2, 0) == 0.5                      # 2 x (1/4)
    assert mcnemar_p(0, 6) == 2 / 64                   # 2 x (1/64)
    assert mcnemar_p(1, 7) == pytest.approx(2 * (1 + 8) / 256)
    assert mcnemar_p(7, 1) == mcnemar_p(1, 7)
    assert mcnemar_p(5, 5) == 1.0                      # capped: both tails overlap


def test_a_small_val_set_passes_flips_in_both_directions_beyond_one_point():
    """make demo's PTQ run: the eager int8 model 84 of 100, ONNX Runtime running that same model 86 (2 flips,
    both its way): 2 points apart, p = 0.5."""
    result = check_classification(*models(100, 84, 2, 0), int8=True)
    assert (result["acc1_pytorch"], result["acc1_export"]) == (84.0, 86.0)
    assert (result["only_export_right"], result["only_pytorch_right"], result["mcnemar_p"]) == (2, 0, 0.5)
    result = check_classification(*models(100, 80, 1, 7), int8=True)  # 6 points apart, p = 0.07: 100 images' limit
    assert result["mcnemar_p"] == pytest.approx(0.0703125)


def test_a_difference_the_flips_do_not_explain_is_refused_naming_both_accuracies():
    with pytest.raises(CheckFailed) as err:
        check_classification(*models(100, 78, 0, 6), int8=True)  # 84 vs 78, every flip the eager model's way
    message = str(err.value)
    assert "78.00 vs the eager int8 model's 84.00 on 100 images" in message
    assert "0 image(s) only the export gets right, 6 only the eager model" in message and "p = 0.031" in message


def test_on_a_large_val_set_it_is_the_one_point_rule():
    with pytest.raises(CheckFailed):  # 1.5 points on 2,000 images, p = 2.4e-5
        check_classification(*models(2000, 1500, 10, 40), int8=True)
    result = check_classification(*models(2000, 1500, 0, 20), int8=True)  # 1 point apart, every flip one way
    assert result["acc1_export"] == result["acc1_pytorch"] - 1.0 and result["mcnemar_p"] < 1e-5
    result = check_classification(*models(100, 84, 0, 1), int8=True)  # 1 point on 100 images
    assert result["mcnemar_p"] == 1.0


def test_float_exports_are_held_to_the_logits_not_to_the_paired_test():
    with pytest.raises(CheckFailed, match="logits differ by up to 1"):
        check_classification(*models(100, 84, 2, 0), int8=False)


def test_near_tied_detections_are_matched_by_label_and_box_not_by_position():
    ref = {"boxes": torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [5, 5, 9, 9]]),
           "labels": torch.tensor([1, 1, 2]), "scores": torch.tensor([0.50005, 0.5, 0.3])}
    swapped = {"boxes": ref["boxes"][[1, 0, 2]], "labels": ref["labels"][[1, 0, 2]],
               "scores": torch.tensor([0.50002, 0.50001, 0.3])}  # scores within 1e-4: either order is right
    assert match_detections(ref, swapped, "img")["boxes_px"] == 0.0
    moved = {**swapped, "boxes": swapped["boxes"] + torch.tensor([0.0, 0.0, 1.0, 0.0])}
    with pytest.raises(CheckFailed, match="boxes differ by up to 1 px"):
        match_detections(ref, moved, "img")
    far = {**swapped, "scores": torch.tensor([0.6, 0.50001, 0.3])}  # not a tie: a real difference
    with pytest.raises(CheckFailed, match=r"detection 1 \(label 1, score 0.5\) has no counterpart"):
        match_detections(ref, far, "img")
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    assert match_detections(empty, empty, "img") == {"detections": 0, "boxes_px": 0.0, "scores": 0.0}
    with pytest.raises(CheckFailed, match="img: 3 detections from the export, 0 from PyTorch"):
        match_detections(empty, ref, "img")
