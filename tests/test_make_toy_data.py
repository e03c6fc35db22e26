import filecmp
import json

from pycocotools.coco import COCO

from tools.make_toy_data import CLASSES, main


def _tree(root):
    """The files make_toy_data writes. Not the segmentation mask cache: a toy table run by tools/reproduce.py
    keeps it beside the data it was computed from (DATA/voc_mask_cache), and other tests share this data."""
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and p.relative_to(root).parts[0] != "voc_mask_cache")


def test_byte_identical_across_runs(tmp_path, toy_data):
    main(["--out", str(tmp_path / "again"), "--seed", "0"])
    a, b = _tree(toy_data), _tree(tmp_path / "again")
    assert a == b
    match, mismatch, errors = filecmp.cmpfiles(toy_data, tmp_path / "again", [str(p) for p in a], shallow=False)
    assert not mismatch and not errors


def test_imagenet_layout(toy_data):
    for split, lo in (("train", 300), ("val", 100)):
        classes = sorted(p.name for p in (toy_data / "imagenet" / split).iterdir())
        assert len(classes) == len(CLASSES) >= 10
        n = sum(1 for _ in (toy_data / "imagenet" / split).rglob("*.jpg"))
        assert n >= lo


def test_coco_loads_in_pycocotools(toy_data):
    for split in ("train", "val"):
        path = toy_data / "coco" / "annotations" / f"instances_{split}2017.json"
        coco = COCO(str(path))
        anns = list(coco.anns.values())
        assert anns and all(len(a["bbox"]) == 4 and a["area"] > 0 for a in anns)
        ids = {c["id"] for c in coco.loadCats(coco.getCatIds())}
        voc = {5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72}
        assert len(ids & voc) >= len(ids) - 1 and ids - voc
        assert any(not coco.getAnnIds(imgIds=i) for i in coco.getImgIds())  # images without annotations
        for a in anns:  # every mask decodes, polygon and RLE alike
            assert coco.annToMask(a).sum() > 0
        for img in coco.dataset["images"]:
            assert (toy_data / "coco" / f"{split}2017" / img["file_name"]).is_file()
    train = json.loads((toy_data / "coco/annotations/instances_train2017.json").read_text())
    crowd = [a for a in train["annotations"] if a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"], dict) for a in crowd)
    assert any(isinstance(a["segmentation"], list) for a in train["annotations"])
