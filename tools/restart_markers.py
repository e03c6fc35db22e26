"""Rewrite an ImageFolder split's JPEGs losslessly with a restart marker after every MCU, so that training
entropy-decodes only the MCUs around each crop (docs/data.md: 1.3x less decode per image on ImageNet-sized
photographs).

    python tools/restart_markers.py /data/imagenet/train /data/imagenet-rst/train
    python tools/make_shards.py ...            # then, if wanted, shard the rewritten tree as any other

The DCT coefficients, quantization tables and sampling are kept (libjpeg's jpeg_read_coefficients ->
jpeg_write_coefficients, data/_jpeg.c `restart`): every file decodes to the same pixels as before
(tested), about 1% larger (Huffman tables optimized; a progressive file becomes baseline). Files the
partial decoder does not take (PNG, WebP, CMYK, a JPEG libjpeg warns about) are copied as they are.
Only the training split needs it: the evaluation decodes whole images (PIL), and its files are best kept
as published.

Each file is written under a temporary name and renamed, and DST/.restart_markers.json (counts, sizes) is
written last: killed half-way, the same command skips the files already there and redoes the rest; a
complete DST is left alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.classification import scan_image_folder  # noqa: E402
from engine.errors import DataError, UserError  # noqa: E402

DONE = ".restart_markers.json"


def rewrite(src: Path, dst: Path, log=print) -> dict:
    try:
        from data import _jpeg
    except ImportError:
        raise UserError("data/_jpeg is not built (libjpeg's headers were missing at install): install them "
                        "(apt-get install libjpeg-dev) and reinstall (pip install -e .)") from None
    if (dst / DONE).exists():
        log(f"{dst}: complete ({DONE} present), nothing to do")
        return json.loads((dst / DONE).read_text())
    if src.resolve() == dst.resolve():
        raise UserError(f"{dst}: the same folder as the source; give another one")
    classes, samples = scan_image_folder(src)
    counts = {"rewritten": 0, "copied": 0, "kept": 0, "bytes_before": 0, "bytes_after": 0}
    start = time.perf_counter()
    for n, (path, label) in enumerate(samples, 1):
        rel = Path(path).relative_to(src)
        out = dst / rel
        if out.exists():  # written by an earlier (killed) run: renamed into place only when complete
            counts["kept"] += 1
            continue
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror})") from None
        new = _jpeg.restart(data)
        counts["rewritten" if new is not None else "copied"] += 1
        counts["bytes_before"] += len(data)
        counts["bytes_after"] += len(new if new is not None else data)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            tmp.write_bytes(new if new is not None else data)
            if new is None:
                shutil.copystat(path, tmp)
            os.replace(tmp, out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"{out}: cannot write ({exc.strerror}); the files written so far are kept, the same "
                            "command continues") from None
        if n % 10000 == 0:
            log(f"{dst}: {n}/{len(samples)} files, {time.perf_counter() - start:.0f} s")
    for stale in dst.rglob(".*.tmp"):  # a file half-written by a killed run whose name was then redone
        stale.unlink()
    counts["seconds"] = round(time.perf_counter() - start, 1)
    (dst / DONE).write_text(json.dumps(counts, indent=1) + "\n")
    grow = counts["bytes_after"] / max(counts["bytes_before"], 1)
    log(f"{dst}: {counts['rewritten']} JPEGs rewritten with restart markers ({grow:.3f}x the bytes), "
        f"{counts['copied']} files copied as they are, {counts['kept']} kept from an earlier run, "
        f"{counts['seconds']:.0f} s")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="an ImageFolder split: SRC/<class>/<image>")
    ap.add_argument("dst", type=Path, help="where the rewritten split goes (the same class folders and names)")
    args = ap.parse_args(argv)
    try:
        rewrite(args.src, args.dst)
    except UserError as exc:
        print(f"restart_markers.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
