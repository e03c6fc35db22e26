"""Write an ImageFolder tree (ImageNet) or a COCO tree as indexed tar shards (data/shards.py), or verify a set.

    python tools/make_shards.py /data/imagenet /lustre/$USER/imagenet-shards [--shard-size 1GB]
    python tools/make_shards.py /data/coco /lustre/$USER/coco-shards
    python tools/make_shards.py --verify /lustre/$USER/imagenet-shards

SRC is recognised by its layout: annotations/instances_{train,val}2017.json with train2017/, val2017/ (COCO:
images in the annotation file's order, the annotation files copied beside the shards), else train/ and val/
of class folders (ImageFolder: classes and files sorted as data.classification.scan_image_folder sorts
them, so sample i is the folder's sample i). Each split present is written. The images' bytes are stored
as they are (no re-encoding). Every shard is read back and checked (size, SHA-256, tar member table) before
it gets its final name; each split's index.json and then OUT/manifest.json are written last, atomically.

Killed half-way, the same command resumes: finished shards are checked and kept, a half-written one is
redone. A complete OUT (manifest.json present) is never overwritten. --verify re-reads every file of a
set and compares sizes and SHA-256 with the manifest and the indexes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import shards  # noqa: E402
from engine.checkpoint import file_sha256  # noqa: E402
from engine.errors import DataError, UserError  # noqa: E402

COCO_SPLITS = {"train": "train2017", "val": "val2017"}


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "M": 1 << 20, "MB": 1 << 20, "G": 1 << 30, "GB": 1 << 30}
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 1GB, 512MB or 1000000") from None
    if value < 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: expected at least 1KB")
    return int(value)


def imagefolder_splits(src: Path) -> dict[str, tuple[list[str], list[str], list[int], list[str]]]:
    from data.classification import scan_image_folder

    out = {}
    for split in ("train", "val"):
        if (src / split).is_dir():
            classes, samples = scan_image_folder(src / split)
            names = [os.path.relpath(p, src / split) for p, _ in samples]
            out[split] = (names, [p for p, _ in samples], [label for _, label in samples], classes, None)
    return out


def coco_splits(src: Path) -> dict[str, tuple[list[str], list[str], None, None, list[int]]]:
    out = {}
    for split, folder in COCO_SPLITS.items():
        ann = src / "annotations" / f"instances_{folder}.json"
        if not ann.is_file():
            continue
        try:
            doc = json.loads(ann.read_bytes())
            names = [str(im["file_name"]) for im in doc["images"]]
            ids = [int(im["id"]) for im in doc["images"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{ann}: not a COCO instances file ({exc}; expected 'images' with 'file_name')") from None
        if len(set(names)) != len(names):
            raise DataError(f"{ann}: some file_name is listed twice in 'images'")
        missing = [n for n in names if not (src / folder / n).is_file()]
        if missing:
            raise DataError(f"{ann}: lists {len(missing)} image(s) that {src / folder} does not have, e.g. "
                            f"{src / folder / missing[0]}")
        out[folder] = (names, [str(src / folder / n) for n in names], None, None, ids)
    return out


def write(src: Path, out: Path, shard_bytes: int) -> dict:
    if (out / shards.MANIFEST).exists():
        raise DataError(f"{out}: a complete shard set is already there ({shards.MANIFEST}); refusing to overwrite "
                        "it: choose another output folder, or delete this one first")
    if not src.is_dir():
        raise DataError(f"{src}: source folder not found")
    is_coco = (src / "annotations").is_dir()
    splits = coco_splits(src) if is_coco else imagefolder_splits(src)
    if not splits:
        raise DataError(f"{src}: neither a COCO tree (annotations/instances_{{train,val}}2017.json) nor an "
                        "ImageFolder tree (train/ and val/ of class folders)")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    indexes = {}
    for split, (names, files, labels, classes, ids) in splits.items():
        indexes[split] = shards.write_set(out / split, names, files, labels, classes, shard_bytes, image_ids=ids)
    extra = []
    if is_coco:
        (out / "annotations").mkdir(exist_ok=True)
        for folder in splits:
            rel = f"annotations/instances_{folder}.json"
            tmp = out / (rel + shards.PARTIAL)
            shutil.copyfile(src / rel, tmp)
            os.replace(tmp, out / rel)
            extra.append(rel)
    manifest = shards.write_manifest(out, indexes, extra)
    total = sum(f["bytes"] for f in manifest["files"])
    n = sum(len(i["samples"]["name"]) for i in indexes.values())
    print(f"make_shards: {out}: {n} images in {sum(len(i['shards']) for i in indexes.values())} shards, "
          f"{total / 1e9:.3f} GB, {time.perf_counter() - start:.1f} s; verified (sizes, SHA-256, tar members)")
    return manifest


def verify(root: Path) -> None:
    manifest = shards.read_manifest(root)
    for rel, size, sha in manifest["_files"]:
        path = root / rel
        if not path.is_file():
            raise DataError(f"{path}: missing (listed in {root / shards.MANIFEST})")
        if path.stat().st_size != size:
            raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says {size} "
                            f"({'truncated' if path.stat().st_size < size else 'resized'})")
        if file_sha256(path) != sha:
            raise DataError(f"{path}: corrupted: its SHA-256 differs from the manifest's (same size)")
    for split in manifest["splits"]:
        shards.verify_set(root / split, log=lambda msg: print(f"make_shards --verify: {msg}"))
    print(f"make_shards --verify: {root}: all {len(manifest['_files'])} files match the manifest")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, nargs="?", help="ImageFolder or COCO tree")
    ap.add_argument("out", type=Path, nargs="?", help="output folder (the shard root: data.root)")
    ap.add_argument("--shard-size", type=parse_size, default=shards.SHARD_BYTES, help="target shard size (1GB)")
    ap.add_argument("--verify", type=Path, metavar="ROOT", help="verify a written set and exit")
    args = ap.parse_args(argv)
    if args.verify is None and (args.src is None or args.out is None):
        ap.error("expected SRC OUT, or --verify ROOT")
    try:
        if args.verify is not None:
            verify(args.verify)
        else:
            write(args.src, args.out, args.shard_size)
    except UserError as exc:
        print(f"make_shards.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
