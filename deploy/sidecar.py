"""The JSON written beside every export (`<file>.json`): what inference needs besides the weights (input
size, resize, mean/std, class names or COCO category ids, score threshold), where the weights came from
(file and sha256), and the check it passed (tolerance, measured difference, runtime versions)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from deploy.source import Source

FORMAT = "mbv3-recipes-export"
VERSION = 1


def _versions(fmt: str) -> dict:
    names = ["torch", "torchvision"] + (["onnx", "onnxruntime", "onnxscript"] if fmt == "onnx"
                                        else ["executorch", "torchao"])
    return {n: importlib.metadata.version(n) for n in names}


def preprocessing(src: Source) -> dict:
    d, task = src.cfg.data, src.task
    if task == "detection":
        m = src.cfg.model
        return {"input": "one RGB image, float32 (3, H, W) in [0, 1], any size",
                "in_graph": {"resize": {"min_size": m.min_size, "max_size": m.max_size},
                             "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
                "boxes": "xyxy in the input image's pixels"}
    if task == "segmentation":
        return {"input": "RGB, float32 (N, 3, H, W)", "resize": {"short_side": d.eval_size, "interpolation": "bilinear, antialiased"},
                "scale": "1/255", "mean": list(d.mean), "std": list(d.std),
                "output": "logits at the input size; argmax over classes = label map"}
    return {"input": "RGB, float32 (N, 3, H, W)", "size": [d.val_crop, d.val_crop],
            "resize": {"short_side": d.val_resize, "interpolation": d.interpolation}, "center_crop": d.val_crop,
            "scale": "1/255", "mean": list(d.mean), "std": list(d.std)}


def labels(src: Source) -> dict:
    task = src.task
    if task == "detection":
        from data.detection import read_annotations, split_paths

        ann_file, _ = split_paths(src.cfg.data.root, "val")
        cats = read_annotations(ann_file).categories
        return {"category_ids": {str(k): v for k, v in sorted(cats.items())},
                "label_is": "COCO category id (0 = background, never output)",
                "score_threshold": src.cfg.model.box_score_thresh,
                "detections_per_image": src.cfg.model.box_detections_per_img}
    if task == "segmentation":
        from data.segmentation import VOC_CLASSES

        return {"classes": list(VOC_CLASSES)}
    from data.classification import scan_image_folder

    classes, _ = scan_image_folder(Path(src.cfg.data.root) / "val")
    return {"classes": list(classes)}


def build(src: Source, fmt: str, out: Path, graph: dict, result: dict, extra: dict) -> dict:
    return {
        "format": FORMAT, "version": VERSION, "file": out.name, "runtime": fmt,
        "task": src.task, "model": src.model_name,
        "precision": "int8" if src.task in ("qat", "ptq") else "float32",
        "preprocessing": preprocessing(src), **labels(src),
        "graph": graph, **extra,
        "source": {"weights": str(src.weights), "sha256": src.sha256, "recipe": str(src.recipe),
                   "run_dir": str(src.run_dir) if src.run_dir else None},
        "check": {"data": f"{src.cfg.data.root} (val)", **result},
        "versions": _versions(fmt),
    }
