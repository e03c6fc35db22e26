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
