"""Folder vs shard set (data/shards.py): files opened per epoch and images/s read with a cold page cache.

    python bench/shards.py --data toy_data [--images 20000] [--reps 2]

The toy ImageNet scaled up: --images small JPEGs under /tmp (deterministic: 200 variants of the toy
training JPEGs, 64-95 px, each copied with its own JPEG comment segment so every file's bytes differ),
in ImageFolder layout; then tools/make_shards.py's writer turns them into a shard set (timed: time and
disk space per 100k images are extrapolated from this run, linearly, and printed as such).

One epoch = every image's encoded bytes read once, in a DistributedSampler order (shuffled, as training
reads), folder: open + read + close per file (data.classification.read_bytes), shards: ShardSource.read
(one pread on a descriptor kept open). Files opened are counted with an audit hook on "open" (Python's
open and os.open). Before each timed epoch the page cache is dropped (as root: /proc/sys/vm/drop_caches;
else posix_fadvise DONTNEED on every file of both layouts). The two layouts alternate, --reps each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine  # noqa: E402
from data import shards  # noqa: E402
from data.classification import read_bytes, scan_image_folder  # noqa: E402

WORK = Path("/tmp/mbv3-bench-shards")


def make_folder(toy: Path, out: Path, n: int) -> Path:
    """n small JPEGs in 10 class folders, the same bytes for the same n on every run."""
    stamp = out / f".done-{n}"
    if stamp.exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    sources = sorted((toy / "imagenet" / "train").rglob("*.jpg"))
    base = []
    for k in range(200):
        im = Image.open(sources[(k * 7) % len(sources)]).convert("RGB")
        side = 64 + k % 32
        im = im.resize((side, side), Image.Resampling.BILINEAR)
        path = out / "base.jpg"
        out.mkdir(parents=True, exist_ok=True)
        im.save(path, quality=85)
        base.append(path.read_bytes())
    (out / "base.jpg").unlink()
    classes = [f"n{c:08d}" for c in range(10)]
    for c in classes:
        (out / "train" / c).mkdir(parents=True)
    for i in range(n):
        data = base[i % len(base)]
        text = f"mbv3 bench image {i}".encode()
        com = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text  # a JPEG comment segment after SOI
        (out / "train" / classes[i % 10] / f"img_{i:07d}.jpg").write_bytes(data[:2] + com + data[2:])
    stamp.touch()
    return out


def drop_cache(paths: list[Path], how: str = "drop") -> str:
    try:
        if how != "drop":
            raise PermissionError
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "posix_fadvise DONTNEED"


def du(path: Path) -> int:
    """Bytes allocated on disk (blocks, as du counts them)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("toy_data"), help="folder made by tools/make_toy_data.py")
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=WORK, help="scratch folder (kept for the next run)")
    ap.add_argument("--per-shard", type=int, default=9000,
                    help="images per shard (9000: ImageNet's at the default 1 GiB shards of ~110 kB JPEGs)")
    ap.add_argument("--cache", choices=("drop", "fadvise"), default="drop",
                    help="how the page cache is emptied: drop (root: /proc/sys/vm/drop_caches, falls back to "
                         "fadvise) or fadvise (posix_fadvise DONTNEED on this benchmark's files only)")
    args = ap.parse_args(argv)
    folder = make_folder(args.data, args.work / "folder", args.images)
    classes, samples = scan_image_folder(folder / "train")
    n = len(samples)
    out = args.work / f"shards-{n}"
    shutil.rmtree(out, ignore_errors=True)
    names = [os.path.relpath(p, folder / "train") for p, _ in samples]
    drop_cache([Path(p) for p, _ in samples], args.cache)
    mean = sum(os.stat(p).st_size for p, _ in samples) / n
    start = time.perf_counter()
    index = shards.write_set(out / "train", names, [p for p, _ in samples], [c for _, c in samples], classes,
                             shard_bytes=int(args.per_shard * (mean + 1024)), log=lambda m: None)
    write_s = time.perf_counter() - start
    src = shards.ShardSource(out / "train", "imagefolder")
    order = np.random.default_rng(0).permutation(n).tolist()  # a shuffled epoch, as the sampler reads it
    files = [Path(p) for p, _ in samples] + src.files

    opened: list = []
    recording = [False]
    sys.addaudithook(lambda ev, a: opened.append(a[0]) if recording[0] and ev == "open" else None)

    def epoch(kind: str) -> tuple[float, int]:
        reader = (lambda i: read_bytes(samples[i][0])) if kind == "folder" else \
            shards.ShardSource(out / "train", "imagefolder").read  # a fresh reader: no descriptor open yet
        opened.clear()
        recording[0] = True
        t = time.perf_counter()
        for i in order:
            reader(i)
        t = time.perf_counter() - t
        recording[0] = False
        return t, len(opened)

    times: dict[str, list[float]] = {"folder": [], "shards": []}
    opens: dict[str, int] = {}
    how = ""
    for _ in range(args.reps):
        for kind in ("folder", "shards"):
            how = drop_cache(files, args.cache)
            t, k = epoch(kind)
            times[kind].append(t)
            opens[kind] = k
    med = {k: statistics.median(v) for k, v in times.items()}
    folder_bytes, shard_bytes = du(folder / "train"), du(out / "train")
    per_100k = 100_000 / n
    size = sum(s["bytes"] for s in index["shards"]) / n
    print(f"bench/shards.py: {n} images ({size / 1e3:.1f} kB each), {len(index['shards'])} shards of "
          f"~{args.per_shard} images (ImageNet's at 1 GiB); cold page cache ({how}) before each epoch; "
          f"median of {args.reps}; load {os.getloadavg()[0]:.2f}")
    print(f"{'':8}{'files opened/epoch':>20}{'images/s (cold)':>18}{'disk (du)':>12}")
    for kind, b in (("folder", folder_bytes), ("shards", shard_bytes)):
        print(f"{kind:8}{opens[kind]:>20}{n / med[kind]:>18.0f}{b / 1e6:>10.1f} MB")
    print(f"shards / folder: {med['folder'] / med['shards']:.2f}x images/s, "
          f"{opens['folder'] / max(opens['shards'], 1):.0f}x fewer opens")
    print(f"writing the shards (cold source, SHA-256 + read-back check): {write_s:.1f} s for {n} images = "
          f"{n / write_s:.0f} images/s; extrapolated linearly per 100k images of this size: "
          f"{write_s * per_100k:.0f} s, {shard_bytes * per_100k / 1e9:.2f} GB of shards "
          f"(the folder: {folder_bytes * per_100k / 1e9:.2f} GB on disk)")
    print(f"machine: {machine()}")
    shutil.rmtree(out, ignore_errors=True)
    return {"images": n, "shards": len(index["shards"]), "opens": opens, "write_s": write_s,
            "images_per_s": {k: n / v for k, v in med.items()}, "bytes": {"folder": folder_bytes, "shards": shard_bytes}}


if __name__ == "__main__":
    main()
