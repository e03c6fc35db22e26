"""Copy a shard set (tools/make_shards.py) to node-local disk once per node, and print where it is.

    python tools/stage_shards.py /lustre/$USER/imagenet-shards [--dest DIR]
    # -> /tmp/mbv3-shards-$USER/imagenet-shards  (stdout: the staged data.root; progress on stderr)

DEST defaults to $SLURM_TMPDIR (the per-job node-local folder, where the cluster provides one), else /tmp,
in a folder mbv3-shards-$USER; the set lands in DEST/<name of the set>. Every process that calls this on a
node takes a lock file: the first copies, the others wait and then find the copy complete. In a SLURM job,
slurm/launch.sh runs it once per node (srun --ntasks-per-node=1) when STAGE_DATA is set.

Each file is copied under a temporary name, its SHA-256 compared with the manifest, and renamed; the
manifest and a `.staged.json` stamp come last. A second call finds the stamp and every file at its size
and copies nothing; a killed copy resumes with the files it finished. A disk without room for the set
is refused before copying (and a disk that fills up anyway stops with one message and no stamp).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import shards  # noqa: E402
from engine.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a shard root written by tools/make_shards.py (its manifest.json)")
    ap.add_argument("--dest", type=Path, help="node-local folder (default: $SLURM_TMPDIR or /tmp, "
                                              "in mbv3-shards-$USER)")
    args = ap.parse_args(argv)
    try:
        dest = shards.stage(args.src, args.dest, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    except UserError as exc:
        print(f"stage_shards.py: error: {exc}", file=sys.stderr)
        return 1
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
