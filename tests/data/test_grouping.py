"""Aspect-ratio grouping of detection batches against torchvision's reference
(references/detection/group_by_aspect_ratio.py; its sampler copied in tests/data/test_detection.py):
the COCO path's width / height ratio, and the GroupedBatchSampler's leftover order (its defaultdict
re-creates an emptied buffer at the end) and refill (_repeat_to_at_least)."""

import bisect
import copy

import numpy as np
import pytest
from torch.utils.data import DistributedSampler

from data.detection import CocoDetection, GroupedBatchSampler, aspect_ratio_groups
from tests.data.test_detection import ref_grouped_batches, write_coco


# ----------------------------------------------------------------------------- the reference's COCO ratio


def ref_coco_aspect_ratios(images):  # _compute_aspect_ratios_coco_dataset
    return [float(img_info["width"]) / float(img_info["height"]) for img_info in images]


def ref_quantize(x, bins):  # _quantize, with create_aspect_ratio_groups' bins
    bins = sorted(copy.deepcopy(bins))
    return [bisect.bisect_right(bins, y) for y in x]


def ref_groups(images, k):
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return ref_quantize(ref_coco_aspect_ratios(images), bins)


# ----------------------------------------------------------------------------- tests


def test_coco_groups_use_width_over_height(tmp_path):
    """Square, 1:2 and 2:1 images sit on bin edges: width / height puts a square with the landscape
    images (w/h in [1, 1.26)), height / width would put it with the portrait ones."""
    sizes = [(1, 40, 40), (2, 40, 20), (3, 20, 40), (4, 44, 40), (5, 40, 44), (6, 60, 20), (7, 20, 60)]
    write_coco(tmp_path, sizes, [(i, 1, [1, 1, 10, 10], 0) for i, _, _ in sizes])
    ds = CocoDetection(tmp_path, "train", train=True, hflip=0.0, seed=0)
    images = [{"id": i, "width": w, "height": h} for i, w, h in sizes]
    order = [ds.image_id(i) for i in range(len(ds))]
    want = dict(zip([im["id"] for im in images], ref_groups(images, 3)))
    got = aspect_ratio_groups(ds.aspect_ratios(), 3)
    assert got == [want[i] for i in order]
    by_id = dict(zip(order, got))
    assert by_id[1] == by_id[4] != by_id[5]  # 1:1 joins 11:10 (landscape), not 10:11


def _batches(group_ids, order, batch_size):
    """Our sampler's batches for a given shard order."""
    sampler = GroupedBatchSampler(group_ids, len(order), batch_size, 0, 1, seed=0)
    sampler._shard = order
    return list(sampler.index_batches())


def test_leftover_tie_order_and_refill_are_the_references():
    # Tie: group 0 emits [0, 1], group 1 starts with 2, group 0 gets 3. Leftovers [3] and [2] tie; the
    # reference re-created group 0's emptied buffer before group 1 appeared, so group 0's comes first.
    group_ids, order = [0, 0, 1, 0, 2, 2], [0, 1, 2, 3, 4, 5]
    want = list(ref_grouped_batches(order, group_ids, 2))
    assert want == [[0, 1], [4, 5], [3, 0]]
    assert _batches(group_ids, order, 2) == want
    # Refill: four groups of one image, batch 4: the first group's image repeated to a full batch.
    group_ids, order = [0, 1, 2, 3], [0, 1, 2, 3]
    want = list(ref_grouped_batches(order, group_ids, 4))
    assert want == [[0, 0, 0, 0]]
    assert _batches(group_ids, order, 4) == want


@pytest.mark.parametrize("world,batch", [(1, 2), (2, 4), (3, 8)])
def test_seeded_shards_match_the_reference_with_few_images_per_group(world, batch):
    """Many small groups (k=3 bins, skewed ratios) so that leftovers tie and need repeating."""
    rng = np.random.default_rng(world)
    ratios = np.exp(rng.normal(0, 0.25, 61)).tolist() + [1.0, 0.5, 2.0, 1 / 3, 3.0]
    groups = aspect_ratio_groups(ratios, 3)
    n, short = len(ratios), 0
    for epoch in range(4):
        for rank in range(world):
            ours = GroupedBatchSampler(groups, n, batch, rank, world, seed=3)
            ours.set_epoch(epoch)
            shard = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=3)
            shard.set_epoch(epoch)
            want = list(ref_grouped_batches(list(shard), groups, batch))
            assert list(ours.index_batches()) == want
            assert all(len(b) == batch for b in want)
            short += sum(len(set(b)) < batch for b in want)
    assert short > 0, "no batch needed repeated samples: the case does not exercise the refill"


def test_a_group_factor_of_0_still_groups_portrait_and_landscape_and_minus_1_does_not(tmp_path):
    """The reference groups whenever aspect_ratio_group_factor >= 0; with 0 its bins are [1.0] (portrait
    against landscape). Only a negative factor gives ungrouped batches."""
    from data.detection import make_train_loader

    sizes = [(1, 40, 40), (2, 40, 20), (3, 20, 40), (4, 44, 40), (5, 40, 44), (6, 60, 20), (7, 20, 60)]
    write_coco(tmp_path, sizes, [(i, 1, [1, 1, 10, 10], 0) for i, _, _ in sizes])
    ds = CocoDetection(tmp_path, "train", train=True, hflip=0.0, seed=0)
    images = {i: {"id": i, "width": w, "height": h} for i, w, h in sizes}
    want = ref_groups([images[ds.image_id(i)] for i in range(len(ds))], 0)
    assert sorted(set(want)) == [0, 1]
    grouped = make_train_loader(ds, 2, 0, 0, 1, 0, 0, False).batch_sampler.inner
    assert grouped.group_ids == want
    assert make_train_loader(ds, 2, -1, 0, 1, 0, 0, False).batch_sampler.inner.group_ids is None


def test_training_workers_persist_across_epochs_from_one_worker_on(tmp_path):
    """Re-forking the workers every epoch costs seconds per epoch (the dataset is pickled to each); with any
    worker at all they are kept. Without workers there is nothing to keep."""
    from data.detection import make_train_loader

    sizes = [(1, 40, 40), (2, 40, 20), (3, 20, 40), (4, 44, 40)]
    write_coco(tmp_path, sizes, [(i, 1, [1, 1, 10, 10], 0) for i, _, _ in sizes])
    ds = CocoDetection(tmp_path, "train", train=True, hflip=0.0, seed=0)
    assert make_train_loader(ds, 2, -1, 0, 1, 0, 1, False).persistent_workers is True
    assert make_train_loader(ds, 2, -1, 0, 1, 0, 0, False).persistent_workers is False


def test_a_sampler_never_given_an_epoch_yields_epoch_0_keys_in_epoch_0_order():
    """Before any set_epoch the batches are epoch 0's: keys (0, i) over DistributedSampler's epoch-0 shard, so
    item i is augmented as in epoch 0 (the flip's seed takes the key's epoch)."""
    groups = [0, 1] * 6
    fresh = GroupedBatchSampler(groups, 12, 2, 0, 1, seed=5)
    shard = DistributedSampler(range(12), num_replicas=1, rank=0, shuffle=True, seed=5)
    shard.set_epoch(0)
    want = ref_grouped_batches(list(shard), groups, 2)
    assert list(fresh) == [[(0, i) for i in b] for b in want]
