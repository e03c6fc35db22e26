"""data/detection.py's small parts in isolation: detections as COCO results rows."""

import numpy as np

from data.detection import to_results


def test_results_rows_are_coco_results_format():
    """A row is (image_id, x, y, w, h, score, category_id); COCO's results format names them."""
    rows = np.array([[42, 10.5, 20.0, 30.0, 40.25, 0.875, 18], [7, 0.0, 1.0, 2.0, 3.0, 0.5, 1]])
    assert to_results(rows) == [
        {"image_id": 42, "category_id": 18, "bbox": [10.5, 20.0, 30.0, 40.25], "score": 0.875},
        {"image_id": 7, "category_id": 1, "bbox": [0.0, 1.0, 2.0, 3.0], "score": 0.5}]
    assert to_results(np.empty((0, 7))) == []


def test_data_section_bounds():
    from data.detection import DetectionDataConfig

    def problems(**kw):
        base = dict(root="r", batch_size=1, workers=0, hflip=0.0, aspect_ratio_group_factor=-1, box_margin=0.0)
        return [k for k, _ in DetectionDataConfig(**{**base, **kw}).validate()]

    assert problems() == [] and problems(hflip=1.0, aspect_ratio_group_factor=0) == []
    assert problems(batch_size=0) == ["batch_size"] and problems(workers=-1) == ["workers"]
    assert problems(hflip=1.5) == ["hflip"] and problems(hflip=-0.1) == ["hflip"]
    assert problems(aspect_ratio_group_factor=-2) == ["aspect_ratio_group_factor"]
    assert problems(box_margin=-0.5) == ["box_margin"]
    import dataclasses

    import pytest

    cfg = DetectionDataConfig(root="r", batch_size=1, workers=0, hflip=0.0, aspect_ratio_group_factor=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):  # nothing writes back into the config
        cfg.batch_size = 2


def test_model_output_becomes_xywh_rows_in_the_model_s_order():
    import torch

    from data.detection import detection_rows

    out = {"boxes": torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.5, 1.5, 2.5, 4.5]]),
           "scores": torch.tensor([0.75, 0.25]), "labels": torch.tensor([3, 18])}
    assert detection_rows(5, out).tolist() == [[5, 10.0, 20.0, 30.0, 40.0, 0.75, 3],
                                              [5, 0.5, 1.5, 2.0, 3.0, 0.25, 18]]
    # another image of as many boxes (its rows may reuse the memory of the first's): its own scores
    out = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, 3.0, 4.0, 5.0]]),
           "scores": torch.tensor([0.5, 0.125]), "labels": torch.tensor([1, 90])}
    assert detection_rows(6, out).tolist() == [[6, 1.0, 2.0, 3.0, 6.0, 0.5, 1], [6, 3.0, 3.0, 1.0, 2.0, 0.125, 90]]


def test_rows_of_every_rank_are_gathered_on_rank_0_sorted_stably_by_image(monkeypatch):
    import torch

    from data.detection import gather_rows

    mine = [np.array([[3, 0, 0, 1, 1, 0.9, 1], [1, 0, 0, 1, 1, 0.8, 1]]), np.array([[1, 5, 5, 1, 1, 0.7, 2]])]
    assert gather_rows(mine, 1)[:, [0, 1, 5]].tolist() == [[1, 0, 0.8], [1, 5, 0.7], [3, 0, 0.9]]
    assert gather_rows([], 1).shape == (0, 7)
    other = np.array([[2, 9, 9, 1, 1, 0.6, 4], [1, 7, 7, 1, 1, 0.5, 4]])
    sent = []

    def gather_object(obj, parts, dst):  # what torch.distributed does with two ranks, this one and another
        sent.append((obj, dst))
        if parts is not None:
            parts[:] = [obj, other]

    monkeypatch.setattr(torch.distributed, "gather_object", gather_object)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    rows = gather_rows(mine, 2)
    assert rows[:, [0, 1]].tolist() == [[1, 0], [1, 5], [1, 7], [2, 9], [3, 0]] and sent[-1][1] == 0
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert gather_rows(mine, 2) is None and sent[-1][0].shape == (3, 7)


def test_bbox_metrics_in_percent_with_no_data_as_null():
    from data.detection import bbox_metrics

    stats = [0.5, 0.75, 0.0, -1.0, 0.25, 0.125, 0.3, 0.4, 0.5, -1.0, 0.2, 0.1]
    m = bbox_metrics(stats)
    assert m == {"bbox_map": 50.0, "bbox_AP50": 75.0, "bbox_AP75": 0.0, "bbox_APs": None, "bbox_APm": 25.0,
                 "bbox_APl": 12.5, "bbox_stats": [0.5, 0.75, 0.0, None, 0.25, 0.125, 0.3, 0.4, 0.5, None, 0.2, 0.1]}


def _coco(tmp_path, boxes, w=100, h=80):
    import json

    doc = {"images": [{"id": 7, "file_name": "a.jpg", "height": h, "width": w}],
           "categories": [{"id": 1, "name": "person"}],
           "annotations": [{"id": i, "image_id": 7, "category_id": 1, "bbox": b} for i, b in enumerate(boxes, 1)]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def test_boxes_within_the_margin_are_clamped_and_one_past_any_edge_is_named(tmp_path):
    import pytest

    from data.detection import read_annotations
    from engine.errors import DataError

    # a 100 x 80 image, margin 2 px: each box reaches 2 px past one edge (accepted, clamped to the image)
    inside = [[-2, 10, 20, 20], [10, -2, 20, 20], [82, 10, 20, 20], [10, 62, 20, 20]]
    ann = read_annotations(_coco(tmp_path, inside), box_margin=2.0)
    assert ann.boxes[0].tolist() == [[0, 10, 18, 30], [10, 0, 30, 18], [82, 10, 100, 30], [10, 62, 30, 80]]
    for i, box in enumerate([[-2.5, 10, 20, 20], [10, -2.5, 20, 20], [82.5, 10, 20, 20], [10, 62.5, 20, 20]]):
        with pytest.raises(DataError) as err:
            read_annotations(_coco(tmp_path, [[0, 0, 5, 5], box]), box_margin=2.0)
        assert str(err.value) == (f"{tmp_path / 'instances.json'}: 1 bad annotation:\n  annotation 2: bbox [x, y, w, h] "
                                  f"= {[float(v) for v in box]} lies outside its image 7 (100 x 80 px) by more than "
                                  "data.box_margin 2 px"), i


def test_degenerate_boxes_are_accepted_negative_sizes_and_repeated_images_are_named(tmp_path):
    import json

    import pytest

    from data.detection import read_annotations
    from engine.errors import DataError

    ann = read_annotations(_coco(tmp_path, [[10, 10, 5, 0], [10, 10, 0, 5], [1, 1, 3, 2]]))  # zero width/height
    assert ann.boxes[0].tolist() == [[1, 1, 4, 3]]  # the degenerate ones are dropped, not an error
    with pytest.raises(DataError, match=r"annotation 1: bbox \[10.0, 10.0, 5.0, -1.0\] is not \[x, y, width >= 0"):
        read_annotations(_coco(tmp_path, [[10, 10, 5, -1]]))
    path = _coco(tmp_path, [])
    doc = json.loads(path.read_text())
    image = doc["images"][0]
    for ids, message in [([7, 7], "lists image id 7 more than once"), ([7, 8, 7, 8], "lists image ids 7, 8 more")]:
        doc["images"] = [{**image, "id": i} for i in ids]
        path.write_text(json.dumps(doc))
        with pytest.raises(DataError, match=f"'images' {message}"):
            read_annotations(path)


def test_a_flip_probability_of_1_always_flips_and_0_never(tmp_path):
    import torch
    from PIL import Image

    from data.detection import CocoDetection

    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    pixels = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    Image.fromarray(pixels).save(tmp_path / "train2017" / "a.png")
    _coco(tmp_path, [[1, 1, 3, 2]], w=8, h=6).rename(tmp_path / "annotations" / "instances_train2017.json")
    doc = (tmp_path / "annotations" / "instances_train2017.json").read_text().replace("a.jpg", "a.png")
    (tmp_path / "annotations" / "instances_train2017.json").write_text(doc)
    for epoch in range(3):
        image, target = CocoDetection(tmp_path, "train", train=True, hflip=1.0, seed=epoch)[(epoch, 0)]
        assert torch.equal(image, torch.from_numpy(pixels[:, ::-1].copy()).permute(2, 0, 1))
        assert target["boxes"].tolist() == [[4.0, 1.0, 7.0, 3.0]]  # x -> 8 - x, xyxy
        image, target = CocoDetection(tmp_path, "train", train=True, hflip=0.0, seed=epoch)[(epoch, 0)]
        assert torch.equal(image, torch.from_numpy(pixels).permute(2, 0, 1))
        assert target["boxes"].tolist() == [[1.0, 1.0, 4.0, 3.0]]


def test_the_train_filter_keeps_images_with_a_box_over_1_px_each_way_as_the_reference_does(tmp_path):
    """torchvision's references/detection/coco_utils.py drops a training image when every box has a width or
    a height <= 1 px (`_has_only_empty_bbox`)."""
    from data.detection import read_annotations

    cases = {(2, 2): True, (1.5, 1.5): True, (1, 5): False, (5, 1): False, (1, 1): False}
    for (w, h), usable in cases.items():
        assert read_annotations(_coco(tmp_path, [[10, 10, w, h]])).usable == [usable], (w, h)
    assert read_annotations(_coco(tmp_path, [[10, 10, 1, 5], [20, 20, 3, 3]])).usable == [True]


def test_the_default_box_margin_is_one_pixel(tmp_path):
    """COCO's boxes are floats that overshoot the image by rounding; 1 px past an edge is clamped by default
    (a recipe that does not state data.box_margin, and read_annotations without one), more is named with the
    key that allows it."""
    import pytest

    from data.detection import DetectionDataConfig, read_annotations
    from engine.errors import DataError

    recipe = DetectionDataConfig(root="r", batch_size=1, workers=0, hflip=0.0, aspect_ratio_group_factor=-1)
    for margin in ({}, {"box_margin": recipe.box_margin}):
        assert read_annotations(_coco(tmp_path, [[-1, 10, 20, 20]]), **margin).boxes[0].tolist() == [[0, 10, 19, 30]]
        with pytest.raises(DataError, match="by more than data.box_margin 1 px"):
            read_annotations(_coco(tmp_path, [[-1.25, 10, 20, 20]]), **margin)


def test_seven_bad_annotations_show_five_and_count_the_rest(tmp_path):
    import pytest

    from data.detection import read_annotations
    from engine.errors import DataError

    with pytest.raises(DataError) as err:
        read_annotations(_coco(tmp_path, [[10, 10, 5, -1]] * 7))
    lines = str(err.value).splitlines()
    assert lines[0] == f"{tmp_path / 'instances.json'}: 7 bad annotations:"
    assert len(lines) == 1 + 5 + 1 and lines[-1] == "  ... and 2 more"


def test_a_box_of_other_than_4_numbers_or_with_a_non_finite_one_is_named(tmp_path):
    import pytest

    from data.detection import read_annotations
    from engine.errors import DataError

    for box in ([1.0, 2.0, float("nan"), 3.0], [1.0, 2.0, 3.0], [1.0, float("inf"), 3.0, 4.0]):
        with pytest.raises(DataError, match=r"annotation 1: bbox .* is not \[x, y, width >= 0"):
            read_annotations(_coco(tmp_path, [box]))


def test_annotations_of_categories_the_file_does_not_list_are_each_named(tmp_path):
    """Every annotation whose category_id 'categories' lacks is one problem (the file's later annotations
    are still checked; such an annotation is not checked further, so its bad box adds nothing)."""
    import json

    import pytest

    from data.detection import read_annotations
    from engine.errors import DataError

    doc = {"images": [{"id": 7, "file_name": "a.jpg", "height": 80, "width": 100}],
           "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]},
                           {"id": 2, "image_id": 7, "category_id": 3, "bbox": [1, 1, 5, 5]},
                           {"id": 3, "image_id": 7, "category_id": 18, "bbox": [2, 2, 5, 5]},
                           {"id": 4, "image_id": 7, "category_id": 90, "bbox": [1, 1, -5, 5]}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        read_annotations(path)
    assert str(err.value) == (f"{path}: 2 bad annotations:\n"
                              "  annotation 2 has category_id 3, which 'categories' does not list\n"
                              "  annotation 4 has category_id 90, which 'categories' does not list")
    doc["annotations"] = doc["annotations"][:2]
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        read_annotations(path)
    assert str(err.value) == (f"{path}: 1 bad annotation:\n"
                              "  annotation 2 has category_id 3, which 'categories' does not list")


def _coco_tree(root, split="train"):
    """data.root with one split: images listed out of id order; image 5 (a.jpg) has only a 1-px-wide box,
    which the train filter drops. The image files are empty: nothing here decodes them."""
    import json

    images = [(9, "z.jpg"), (2, "b.jpg"), (5, "a.jpg"), (7, "c.jpg")]
    boxes = {9: [1, 1, 4, 4], 2: [2, 2, 3, 3], 5: [1, 1, 1, 6], 7: [0, 0, 5, 2]}
    (root / "annotations").mkdir(parents=True)
    (root / f"{split}2017").mkdir()
    for _, name in images:
        (root / f"{split}2017" / name).write_bytes(b"")
    doc = {"images": [{"id": i, "file_name": f, "height": 8, "width": 8} for i, f in images],
           "categories": [{"id": 1, "name": "person"}],
           "annotations": [{"id": n, "image_id": i, "category_id": 1, "bbox": boxes[i]}
                           for n, (i, _) in enumerate(images, 1)]}
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return root


def test_paths_are_the_kept_images_files_in_item_order_from_a_folder_and_from_shards(tmp_path):
    """Item i's path is that of the i-th kept image (sorted image ids; train drops image 5), not the i-th
    entry of the annotation file; from shards, the shard member that holds it."""
    from data.detection import CocoDetection
    from tools import make_shards

    root = _coco_tree(tmp_path / "coco")
    train = CocoDetection(root, "train", train=True, hflip=0.0, seed=0)
    assert train.paths() == [str(root / "train2017" / f) for f in ("b.jpg", "c.jpg", "z.jpg")]
    assert [train.image_id(i) for i in range(len(train))] == [2, 7, 9]
    every = CocoDetection(root, "train", train=False, hflip=0.0, seed=0)  # no filter: all four, by id
    assert every.paths() == [str(root / "train2017" / f) for f in ("b.jpg", "a.jpg", "c.jpg", "z.jpg")]

    out = tmp_path / "shards"
    assert make_shards.main([str(root), str(out)]) == 0
    sharded = CocoDetection(out, "train", train=True, hflip=0.0, seed=0, data_format="shards")
    shard = out / "train2017" / "shard-00000.tar"  # one shard: SHARD[member], the member the file's name
    assert sharded.paths() == [f"{shard}[{f}]" for f in ("b.jpg", "c.jpg", "z.jpg")]


def test_the_eval_loader_gives_each_image_once_across_ranks_one_per_batch(tmp_path):
    """Batch 1; rank r of w takes items r, r + w, ...: two ranks together yield every image once. Persistent
    workers only where there are workers (torch refuses them without)."""
    import json

    from PIL import Image

    from data.detection import CocoDetection, make_eval_loader

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    ids = [4, 11, 6, 2, 9]
    for i in ids:
        Image.new("RGB", (6, 5), (i, 0, 0)).save(root / "val2017" / f"{i}.png")
    doc = {"images": [{"id": i, "file_name": f"{i}.png", "height": 5, "width": 6} for i in ids],
           "categories": [{"id": 1, "name": "person"}],
           "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 2, 2]} for i in ids]}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    ds = CocoDetection(root, "val", train=False, hflip=0.0, seed=0)  # items: ids 2, 4, 6, 9, 11

    seen = {}
    for rank in (0, 1):
        loader = make_eval_loader(ds, rank, 2, workers=0, pin_memory=False)
        assert loader.batch_size == 1 and loader.persistent_workers is False and loader.num_workers == 0
        batches = list(loader)
        assert all(len(images) == 1 and len(targets) == 1 for images, targets in batches)
        seen[rank] = [targets[0]["image_id"] for _, targets in batches]
        assert [images[0][0, 0, 0].item() for images, _ in batches] == seen[rank]  # the image of that id
    assert seen == {0: [2, 6, 11], 1: [4, 9]}
    assert [t["image_id"] for _, (t,) in make_eval_loader(ds, 0, 1, 0, False)] == [2, 4, 6, 9, 11]
    loader = make_eval_loader(ds, 0, 1, workers=1, pin_memory=True)  # built, not iterated: no worker starts
    assert loader.persistent_workers is True and loader.num_workers == 1 and loader.pin_memory is True


def _instances(tmp_path, images, annotations):
    """An instances file with category 1; images: [(id, w, h)], annotations: [(id, image_id, bbox)]."""
    import json

    doc = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": w, "height": h} for i, w, h in images],
           "categories": [{"id": 1, "name": "person"}],
           "annotations": [{"id": n, "image_id": i, "category_id": 1, "bbox": b} for n, i, b in annotations]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def _refusal(path, **kw):
    import pytest

    from data.detection import read_annotations
    from engine.errors import DataError

    with pytest.raises(DataError) as err:
        read_annotations(path, **kw)
    return str(err.value)


def test_every_bad_annotation_is_named_up_to_five_and_the_rest_counted(tmp_path):
    """Annotations on unlisted images and boxes outside their image are each one problem, and the check goes
    on after each (a file with two of a kind names both). Five problems are shown whole; from six on, the
    first five and "... and N more"."""
    box = [1, 1, 5, 5]
    path = _instances(tmp_path, [(7, 100, 80)], [(1, 7, box), (2, 3, box), (3, 4, box)])
    assert _refusal(path) == (f"{path}: 2 bad annotations:\n"
                              "  annotation 2 refers to image 3, which 'images' does not list\n"
                              "  annotation 3 refers to image 4, which 'images' does not list")
    outside = [(n, 7, [90.0 + n, 1.0, 20.0, 5.0]) for n in range(1, 8)]  # 11 px past the right edge and more
    lines = [f"  annotation {n}: bbox [x, y, w, h] = {b} lies outside its image 7 (100 x 80 px) by more than "
             "data.box_margin 1 px" for n, _, b in outside]
    path = _instances(tmp_path, [(7, 100, 80)], [(0, 7, [1, 1, 5, 5])] + outside[:2])
    assert _refusal(path) == f"{path}: 2 bad annotations:\n" + "\n".join(lines[:2])
    path = _instances(tmp_path, [(7, 100, 80)], outside[:5])
    assert _refusal(path) == f"{path}: 5 bad annotations:\n" + "\n".join(lines[:5])
    path = _instances(tmp_path, [(7, 100, 80)], outside[:6])
    assert _refusal(path) == f"{path}: 6 bad annotations:\n" + "\n".join(lines[:5]) + "\n  ... and 1 more"
    path = _instances(tmp_path, [(7, 100, 80)], outside)
    assert _refusal(path) == f"{path}: 7 bad annotations:\n" + "\n".join(lines[:5]) + "\n  ... and 2 more"


def test_images_listed_twice_are_named_the_first_ten_of_them(tmp_path):
    ids = list(range(1, 13))  # twelve ids, each listed twice: the message names 1 to 10
    path = _instances(tmp_path, [(i, 10, 10) for i in ids + ids], [])
    assert _refusal(path) == (f"{path}: 'images' lists image ids 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 more than "
                              "once (each image must be listed once)")
    path = _instances(tmp_path, [(4, 10, 10), (2, 10, 10), (4, 10, 10)], [])
    assert _refusal(path) == (f"{path}: 'images' lists image id 4 more than once (each image must be listed "
                              "once)")


def _tree(root, boxes, split="train", crowd=0, files=("a.jpg",)):
    """data.root with one 100 x 80 image a.jpg (an empty file: nothing here decodes it) whose annotations
    have the given boxes (all crowd, or none), and the image files `files` in the folder."""
    import json

    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / f"{split}2017").mkdir(exist_ok=True)
    for name in files:
        (root / f"{split}2017" / name).write_bytes(b"")
    doc = {"images": [{"id": 7, "file_name": "a.jpg", "height": 80, "width": 100},
                      {"id": 8, "file_name": "b.jpg", "height": 80, "width": 100},
                      {"id": 9, "file_name": "c.jpg", "height": 80, "width": 100}][:max(len(files), 1)],
           "categories": [{"id": 1, "name": "person"}],
           "annotations": [{"id": n, "image_id": 7, "category_id": 1, "bbox": b, "iscrowd": crowd}
                           for n, b in enumerate(boxes, 1)]}
    path = root / "annotations" / f"instances_{split}2017.json"
    path.write_text(json.dumps(doc))
    return path


def test_the_dataset_clamps_boxes_1_px_out_by_default_and_refuses_more(tmp_path):
    """CocoDetection without a box_margin allows what data.box_margin's default does: 1 px."""
    import pytest

    from data.detection import CocoDetection
    from engine.errors import DataError

    _tree(tmp_path / "a", [[-1, 10, 20, 20]])
    ds = CocoDetection(tmp_path / "a", "train", train=True, hflip=0.0, seed=0)
    assert ds.ann.boxes[0].tolist() == [[0, 10, 19, 30]]
    path = _tree(tmp_path / "b", [[10, 10, 20, 71.25]])  # 1.25 px past the bottom edge
    with pytest.raises(DataError) as err:
        CocoDetection(tmp_path / "b", "train", train=True, hflip=0.0, seed=0)
    assert str(err.value) == (f"{path}: 1 bad annotation:\n  annotation 1: bbox [x, y, w, h] = [10.0, 10.0, "
                              "20.0, 71.25] lies outside its image 7 (100 x 80 px) by more than "
                              "data.box_margin 1 px")


def test_images_the_folder_lacks_are_counted_in_words_naming_the_first(tmp_path):
    import pytest

    from data.detection import CocoDetection
    from engine.errors import DataError

    path = _tree(tmp_path, [[1, 1, 5, 5]], files=("a.jpg", "b.jpg", "c.jpg"))
    for name in ("b.jpg", "c.jpg"):
        (tmp_path / "train2017" / name).unlink()
    with pytest.raises(DataError) as err:
        CocoDetection(tmp_path, "train", train=True, hflip=0.0, seed=0)
    assert str(err.value) == (f"{path}: lists 2 images that {tmp_path / 'train2017'} does not have, "
                              f"e.g. {tmp_path / 'train2017' / 'b.jpg'}")


def test_a_validation_set_of_crowd_boxes_only_is_refused_a_training_set_is_not(tmp_path):
    """COCOeval has nothing to score without a non-crowd box (its -1, "no data"): validation refuses such a
    file. Training keeps an image whose only annotation is a crowd region (the reference's filter counts
    it) and trains on its empty target."""
    import pytest

    from data.detection import CocoDetection
    from engine.errors import DataError

    path = _tree(tmp_path, [[1, 1, 5, 5], [10, 10, 20, 20]], split="val", crowd=1)
    with pytest.raises(DataError) as err:
        CocoDetection(tmp_path, "val", train=False, hflip=0.0, seed=0)
    assert str(err.value) == (f"{path}: the validation set has no annotations (no box that is not iscrowd), "
                              "so its box mAP is undefined; expected the instances file of the validation "
                              "images with their ground-truth boxes")
    _tree(tmp_path, [[1, 1, 5, 5], [10, 10, 20, 20]], split="train", crowd=1)
    train = CocoDetection(tmp_path, "train", train=True, hflip=0.0, seed=0)
    assert len(train) == 1 and train.ann.boxes[0].shape == (0, 4)


def test_a_plain_index_is_epoch_0_validation_never_flips_and_the_coin_flips_below_p(tmp_path):
    """Item i is item (0, i); the flip is a training augmentation only; and, as torchvision's
    RandomHorizontalFlip (`torch.rand(1) < p`), a coin equal to p does not flip."""
    import torch
    from PIL import Image

    from data.detection import CocoDetection
    from engine.seeding import sample_seed

    _tree(tmp_path, [[1, 1, 3, 2]], split="train")
    _tree(tmp_path, [[1, 1, 3, 2]], split="val")
    pixels = np.arange(80 * 100 * 3, dtype=np.uint8).reshape(80, 100, 3)
    for split in ("train", "val"):
        Image.fromarray(pixels).save(tmp_path / f"{split}2017" / "a.jpg", format="PNG")  # lossless
    plain = torch.from_numpy(pixels).permute(2, 0, 1)

    def flipped(ds, key):
        image, target = ds[key]
        if torch.equal(image, plain):
            assert target["boxes"].tolist() == [[1, 1, 4, 3]]
            return False
        assert torch.equal(image, plain.flip(-1)) and target["boxes"].tolist() == [[96, 1, 99, 3]]
        return True

    def coin(seed, epoch):  # the documented draw: a generator seeded by sample_seed(seed, epoch, index)
        return torch.rand(1, generator=torch.Generator().manual_seed(sample_seed(seed, epoch, 0))).item()

    seed = next(s for s in range(100) if (coin(s, 0) < 0.5) != (coin(s, 1) < 0.5))
    train = CocoDetection(tmp_path, "train", train=True, hflip=0.5, seed=seed)
    assert flipped(train, 0) == flipped(train, (0, 0)) == (coin(seed, 0) < 0.5) != flipped(train, (1, 0))
    val = CocoDetection(tmp_path, "val", train=False, hflip=1.0, seed=seed)
    assert not flipped(val, 0) and not flipped(val, (1, 0))
    at_p = CocoDetection(tmp_path, "train", train=True, hflip=coin(seed, 0), seed=seed)
    assert not flipped(at_p, (0, 0))
    above = CocoDetection(tmp_path, "train", train=True, hflip=coin(seed, 0) + 1e-6, seed=seed)
    assert flipped(above, (0, 0))
