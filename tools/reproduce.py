"""Reproduce a whole table: train, average, evaluate every row, then the table's combined report and plot.

    python tools/reproduce.py toy                                   # every task on the toy data, here
    python tools/reproduce.py released --data /data --out runs --on slurm --nodes 1 --gpus-per-node 8
    python tools/reproduce.py released --data /data --out runs --status          # where it stands

TABLE is one of the published tables the report knows (tuning, released, quantization, detection, rpn,
segmentation, segmentation-lowres) or `toy`. Each row expands into its steps (reproduce/plan.py): its
training run, the averaging of the checkpoints its published number is of, the evaluations of a variant
(the 23.0 row evaluates the low-res detector's epoch-23 checkpoint with test-time RPN top-n 1000, the
low-res segmentation rows the 520-px runs at 320 px), and last the combined report
(OUT/reports/TABLE.md and .png, tools/report.py). Rows that share a training run share it.

--on local runs the steps here in dependency order, --jobs at a time; --on slurm submits one batch job
per step through slurm/1node.sbatch (slurm/multinode.sbatch with --nodes > 1), each after the jobs it
needs (--dependency=afterok); a failed job's dependents are cancelled. The same command again runs or
submits only what is neither finished (read from the run directories) nor queued or running (squeue),
and continues an interrupted step from its run directory. --dry-run prints the commands (for slurm, a
bash script of sbatch calls); --status prints the status table and runs nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reproduce import launch, plan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=list(plan.TABLES))
    ap.add_argument("--on", choices=("local", "slurm"), default="local", help="where the steps run")
    ap.add_argument("--data", type=Path, help="the folder of imagenet/ and coco/ (default: /data; toy: toy_data)")
    ap.add_argument("--out", type=Path, default=Path("runs"), help="run directories, logs/, reports/ (runs)")
    ap.add_argument("--set", action="append", default=[], metavar="[TASK:]KEY=VALUE", dest="overrides",
                    help=f"an override for every step of TASK ({', '.join(plan.TASKS)}; all when omitted)")
    ap.add_argument("--float-weights", help="QAT/PTQ: the float weights they start from (default: the recipe's)")
    ap.add_argument("--backbone-weights", help="detection/segmentation backbone weights (default: the recipe's)")
    ap.add_argument("--jobs", type=int, default=1, help="local: steps at a time")
    ap.add_argument("--nodes", type=int, default=1, help="slurm: nodes per training/evaluation step")
    ap.add_argument("--gpus-per-node", type=int,
                    help="processes (GPUs) per node of a training/evaluation step (default: slurm 8, local the "
                         "visible GPUs); 0 runs on CPU")
    ap.add_argument("--cpus-per-task", type=int, help="slurm: CPUs per process (default: the template's)")
    ap.add_argument("--time", help="slurm: time limit per job (default: the template's)")
    ap.add_argument("--partition", help="slurm: partition")
    ap.add_argument("--account", help="slurm: account")
    ap.add_argument("--sbatch-args", default="",
                    help='slurm: more sbatch arguments, one string (--sbatch-args="--qos=high --mem=0")')
    ap.add_argument("--stage", metavar="auto|DIR",
                    help="shard sets (--set data.format=shards; DATA/imagenet and DATA/coco written by "
                         "tools/make_shards.py): copy them to node-local disk first (auto: $SLURM_TMPDIR or /tmp); "
                         "slurm: once per node in every job (slurm/launch.sh, STAGE_DATA); local: once, here")
    ap.add_argument("--dry-run", action="store_true", help="print the commands (or sbatch script) only")
    ap.add_argument("--status", action="store_true", help="print the status table only")
    args = ap.parse_args(argv)
    for o in args.overrides:
        key = o.split("=", 1)[0]
        if "=" not in o or (":" in key and key.split(":", 1)[0] not in plan.TASKS):
            ap.error(f"--set {o}: expected [TASK:]KEY=VALUE with TASK one of {', '.join(plan.TASKS)}")
    if args.jobs < 1 or args.nodes < 1 or (args.gpus_per_node is not None and args.gpus_per_node < 0):
        ap.error("--jobs and --nodes are at least 1, --gpus-per-node at least 0")
    data = args.data or (ROOT / "toy_data" if args.table == "toy" else Path("/data"))
    out = args.out if args.out.is_absolute() else ROOT / args.out  # the steps run from the repository root
    data = data if data.is_absolute() else Path.cwd() / data
    if args.stage and args.on == "local" and not (args.dry_run or args.status):
        from data import shards
        from engine.errors import UserError

        dest = None if args.stage == "auto" else Path(args.stage)
        try:  # each set lands in DEST/<its name>, so DEST takes DATA's place
            staged = [shards.stage(data / name, dest) for name in ("imagenet", "coco")
                      if (data / name / shards.MANIFEST).is_file()]
        except UserError as exc:
            ap.exit(1, f"reproduce.py: error: {exc}\n")
        if not staged:
            ap.error(f"--stage: no shard set (manifest.json) in {data}/imagenet or {data}/coco")
        data = staged[0].parent
    if args.stage and args.on == "slurm":
        os.environ["STAGE_DATA"] = args.stage  # sbatch passes the environment on to slurm/launch.sh
        if args.dry_run:
            print(f"export STAGE_DATA={shlex.quote(args.stage)}")
    opts = plan.Options(data.resolve(), out.resolve(), tuple(args.overrides), args.float_weights,
                        args.backbone_weights)
    steps = plan.steps(args.table, opts)
    if args.on == "slurm" and not args.dry_run and not (shutil.which("sbatch") and shutil.which("squeue")):
        ap.error("--on slurm: sbatch and squeue are not on PATH (run on a SLURM login node, or --on local)")
    if args.status:
        queue = launch.squeue(opts.out) if args.on == "slurm" else None
        print(launch.table_text(steps, launch.states(steps, opts.out, queue)))
        return 0
    if args.on == "slurm":
        res = launch.Resources(args.nodes, 8 if args.gpus_per_node is None else args.gpus_per_node,
                               args.cpus_per_task, args.time, args.partition, args.account,
                               tuple(shlex.split(args.sbatch_args)))
        return launch.submit_slurm(steps, opts.out, res, args.table, args.dry_run)
    gpus = args.gpus_per_node
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    return launch.run_local(steps, opts.out, args.jobs, gpus, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
