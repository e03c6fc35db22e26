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
