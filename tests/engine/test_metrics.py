import torch

from engine.metrics import topk_correct


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


def test_k_larger_than_the_number_of_classes_counts_every_sample():
    logits = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 0.5], [0.0, 0.2, 1.0], [5.0, 4.0, 3.0]])
    target = torch.tensor([0, 0, 1, 2])  # ranks 3, 1, 2, 3
    assert topk_correct(logits, target, ks=(1, 5)).tolist() == [1.0, 4.0]
    assert topk_correct(logits, target, ks=(2, 3, 10)).tolist() == [2.0, 4.0, 4.0]
