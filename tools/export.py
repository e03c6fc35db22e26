"""Export a trained model for deployment (ONNX or ExecuTorch), checked in its runtime before it is kept.

    python tools/export.py RUN_DIR --format onnx|executorch [--out PATH] [--data ROOT]
    python tools/export.py WEIGHTS.pt --recipe RECIPE.yaml --format onnx|executorch [--out PATH]

RUN_DIR is a run directory of any training script (its config.yaml says the task and recipe):
classification (averaged.pt if average_checkpoints.py wrote one, else checkpoints/last.pt), QAT
(checkpoints/last.pt), PTQ (export/model_int8.pt), detection, segmentation. A bare weights file needs the
recipe it was trained with. The file goes to RUN_DIR/export/<model>[_int8].onnx|.pte by default, with
<file>.json beside it (docs/export.md: preprocessing, classes or category ids, score threshold, source
checkpoint and sha256, the check's tolerance and measured difference).

Before the file is kept it runs in its runtime (ONNX Runtime, ExecuTorch's Python runtime) on the recipe's
val set (--data replaces the recipe's data.root) and is compared with PyTorch: float within the stated
tolerance with equal Acc@1 / mIoU, int8 within 1 point of the eager int8 model's Acc@1, detections matched
box for box. A failed check removes the file.

Exit status: 0 exported and checked; 1 the check failed (nothing written); 2 bad input (no weights, a
checkpoint of another recipe, unknown format, output exists or is not writable) or a model the runtime
cannot take (one line saying so; nothing written).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.errors import UserError  # noqa: E402

PROG = "tools/export.py"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a run directory, or a weights file (with --recipe)")
    ap.add_argument("--format", required=True, help="onnx or executorch")
    ap.add_argument("--recipe", help="the recipe the weights were trained with (a weights file needs it; for a "
                                     "run directory it replaces config.yaml)")
    ap.add_argument("--out", type=Path, help="the exported file (default: RUN_DIR/export/<model>.onnx|.pte)")
    ap.add_argument("--data", help="data.root for the check (default: the recipe's)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from deploy.export import FORMATS, Unsupported, check_out, default_out, export, source_for

    try:
        if args.format not in FORMATS:
            raise UserError(f"--format {args.format!r}: unknown format; expected one of {', '.join(FORMATS)}")
        src = source_for(args.source, args.recipe, args.data)
        out = args.out or default_out(src, args.format)
        check_out(out, args.format, default=args.out is None)
        start = time.perf_counter()
        info = export(src, args.format, out)
    except Unsupported as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except UserError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001
        from deploy.check import CheckFailed

        if isinstance(exc, CheckFailed):
            print(f"{PROG}: check failed, nothing written: {exc}", file=sys.stderr)
            return 1
        raise
    c = info["check"]
    diff = c["max_abs_diff"]
    diff = ", ".join(f"{k} {v:.3g}" for k, v in diff.items()) if isinstance(diff, dict) else f"{diff:.3g}"
    metric = ""
    if "acc1_export" in c:
        metric = f"; Acc@1 {c['acc1_export']:.2f} (PyTorch{' int8' if info['precision'] == 'int8' else ''} {c['acc1_pytorch']:.2f})"
    elif "miou_export" in c:
        metric = f"; mIoU {c['miou_export']:.3f} (PyTorch {c['miou_pytorch']:.3f})"
    elif "detections" in c:
        metric = f"; {c['detections']} detections matched ({c['images_with_0']} images with 0, {c['images_with_1']} with 1)"
    print(f"exported {out} ({info['precision']}, {args.format}) + {out.name}.json in {time.perf_counter() - start:.0f} s; "
          f"checked on {c['images']} val images: max difference {diff}{metric}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
