import math

import torch

from engine.distributed import DistState
from engine.metrics import evaluate_classifier, topk_correct


def test_top1_and_top5_counts_from_hand_built_logits():
    """8 classes; each row puts the target at a chosen rank (1 = highest logit). Oracle: the ranks."""
    ranks = [1, 2, 5, 6, 1, 3, 8, 5]  # top-1 hits: 2; top-5 hits: ranks <= 5 -> 6
    logits, target = [], []
    for i, rank in enumerate(ranks):
        row = torch.arange(8, 0, -1, dtype=torch.float32) + 0.1 * i  # class j has the (j+1)-th largest logit
        perm = torch.roll(torch.arange(8), i)  # move classes around so the target is not always class 0
        logits.append(row[perm.argsort()])    # class perm[j] gets row[j]
        target.append(int(perm[rank - 1]))
    logits, target = torch.stack(logits), torch.tensor(target)
    for row, t, rank in zip(logits, target, ranks):  # the construction does what it claims
        assert int((row > row[t]).sum()) + 1 == rank
    counts = topk_correct(logits, target, ks=(1, 5))
    assert counts.dtype == torch.float64
    assert counts.tolist() == [2.0, 6.0]
    assert topk_correct(logits, target, ks=(1, 2, 3, 8)).tolist() == [2.0, 3.0, 4.0, 8.0]
    assert topk_correct(logits, target).tolist() == [2.0, 6.0]  # the default ks are Acc@1 and Acc@5


def test_k_larger_than_the_number_of_classes_counts_every_sample():
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 0.5], [0.0, 0.2, 1.0], [5.0, 4.0, 3.0]])
    target = torch.tensor([0, 0, 1, 2])  # ranks 3, 1, 2, 3
    assert topk_correct(logits, target, ks=(1, 5)).tolist() == [1.0, 4.0]
    assert topk_correct(logits, target, ks=(2, 3, 10)).tolist() == [2.0, 4.0, 4.0]


def test_evaluation_loop_reports_acc1_acc5_and_loss_over_every_image():
    """The loop every classification and QAT run reports from: 10 images in batches of 4, 4, 2 whose
    logits are the inputs (an identity model), targets at known ranks. Oracles: the ranks, and the
    cross-entropy written out as logsumexp(row) - row[target]."""
    g = torch.Generator().manual_seed(0)
    ranks = [1, 2, 5, 6, 1, 3, 8, 7, 1, 4]  # top-1 hits 3, top-5 hits 7 (of 10)
    logits, target = [], []
    for rank in ranks:
        row = torch.randn(8, generator=g) * 3
        order = row.argsort(descending=True)
        logits.append(row)
        target.append(int(order[rank - 1]))
    logits, target = torch.stack(logits), torch.tensor(target)
    loader = [(logits[:4], target[:4]), (logits[4:8], target[4:8]), (logits[8:], target[8:])]
    out = evaluate_classifier(torch.nn.Identity(), loader, lambda x: x, torch.device("cpu"), DistState())
    loss = sum(math.log(sum(math.exp(v) for v in row.tolist())) - row[t].item()
               for row, t in zip(logits, target))
    assert out["acc1"] == 30.0 and out["acc5"] == 70.0 and out["val_images"] == 10
    assert math.isclose(out["val_loss"], loss / 10, rel_tol=1e-6) and out["val_loss"] > 1.0


def test_evaluation_runs_the_model_in_eval_mode():
    """A model left in training mode (dropout on) is evaluated as in eval mode: the same numbers as without
    the dropout layer."""
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.1, 0.3, 0.2], [1.0, 3.0, 0.0], [0.0, 0.2, 0.1]])
    target = torch.tensor([0, 2, 1, 0])
    loader = [(logits[:2], target[:2]), (logits[2:], target[2:])]
    plain = evaluate_classifier(torch.nn.Identity(), loader, lambda x: x, torch.device("cpu"), DistState())
    torch.manual_seed(0)
    dropout = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    assert evaluate_classifier(dropout, loader, lambda x: x, torch.device("cpu"), DistState()) == plain
    assert not dropout.training and plain["acc1"] == 50.0


def test_evaluation_under_bfloat16_autocast_scores_the_bfloat16_logits():
    """run.amp=bf16 evaluates under autocast: a Linear model's logits are those of its bfloat16 inputs,
    weights and bias (autocast's rule for linear), not the float32 ones. Oracle: the linear written out
    in bfloat16 and torch's cross-entropy of it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 5)
    x, target = torch.randn(6, 16) * 4, torch.tensor([0, 1, 2, 3, 4, 0])
    loader = [(x[:4], target[:4]), (x[4:], target[4:])]
    bf16 = evaluate_classifier(model, loader, lambda v: v, torch.device("cpu"), DistState(), torch.bfloat16)
    fp32 = evaluate_classifier(model, loader, lambda v: v, torch.device("cpu"), DistState())
    with torch.no_grad():
        w, b = model.weight.bfloat16(), model.bias.bfloat16()
        low = torch.nn.functional.linear(x.bfloat16(), w, b).float()
        high = x @ model.weight.T + model.bias
    ce = torch.nn.functional.cross_entropy
    assert math.isclose(bf16["val_loss"], ce(low, target).item(), rel_tol=1e-6)
    assert math.isclose(fp32["val_loss"], ce(high, target).item(), rel_tol=1e-6)
    assert abs(bf16["val_loss"] - fp32["val_loss"]) > 1e-3  # the two precisions are told apart
