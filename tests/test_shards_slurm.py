"""Staging in a SLURM job: slurm/launch.sh with STAGE_DATA runs tools/stage_shards.py as one task per node
(a fake srun starts it on two "nodes" that share this machine's disk, so the lock decides which copies)
and hands the training command the staged data.root; tools/reproduce.py --stage passes STAGE_DATA on."""

import os
import subprocess
import sys

from tests.conftest import ROOT
from tests.test_multinode import LAUNCH_VARS
from tests.test_recipe_keys import _tiny_imagefolder
from tools import make_shards

FAKE_SRUN = """#!/usr/bin/env bash
echo "srun $*" >> srun.log
if [ "$1" = --ntasks-per-node=1 ]; then  # the staging step: one task on each of the job's 2 nodes
  shift 3
  for n in 0 1; do SLURM_NODEID=$n "$@" > "stage$n.out" 2> "stage$n.err" & done
  wait && cat stage0.out
else
  shift
  "$@"
fi
"""


def test_launch_stages_once_per_node_and_the_run_reads_the_copy(toy_data, tmp_path):
    folder = _tiny_imagefolder(toy_data / "imagenet", tmp_path / "tiny", train=1, val=1)
    assert make_shards.main([str(folder), str(tmp_path / "set"), "--shard-size", "64KB"]) == 0
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARS, "SLURM_TMPDIR")}
    env.update({"PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": sys.executable, "SLURM_JOB_ID": "77",
                "SLURM_JOB_NODELIST": "node01", "MASTER_ADDR": "node01", "SLURM_JOB_NUM_NODES": "2",
                "STAGE_DATA": str(tmp_path / "local")})
    probe = "import sys; print('args', *sys.argv[1:])"
    proc = subprocess.run(["bash", str(ROOT / "slurm/launch.sh"), "-c", probe, f"data.root={tmp_path / 'set'}",
                           "data.format=shards"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    staged = tmp_path / "local/set"
    lines = proc.stdout.splitlines()
    assert lines[-2:] == [f"launch: staged {tmp_path / 'set'} on each of 2 node(s): data.root={staged}",
                          f"args data.root={tmp_path / 'set'} data.format=shards data.root={staged}"]
    srun = (tmp_path / "srun.log").read_text().splitlines()
    assert srun[0].startswith("srun --ntasks-per-node=1 --ntasks=2 --kill-on-bad-exit=1 ")
    assert len(srun) == 2 and srun[1].startswith("srun --kill-on-bad-exit=1 ")
    logs = [(tmp_path / f"stage{n}.err").read_text() for n in (0, 1)]
    assert sum("stage: copied" in t for t in logs) == 1 and sum("already holds" in t for t in logs) == 1
    assert (staged / ".staged.json").is_file()


def test_reproduce_stage_exports_stage_data_to_the_jobs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools/reproduce.py"), "released", "--on", "slurm",
                           "--data", str(tmp_path), "--out", str(tmp_path / "runs"), "--stage", "auto",
                           "--set", "data.format=shards", "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "export STAGE_DATA=auto"
    assert any("data.format=shards" in line and f"data.root={tmp_path}/imagenet" in line for line in lines)


def test_reproduce_stage_on_local_stages_each_set_once_and_the_steps_read_the_copies(toy_data, tmp_path, monkeypatch):
    from reproduce import launch
    from tools import reproduce

    data = tmp_path / "sets"
    for name in ("imagenet", "coco"):
        assert make_shards.main([str(toy_data / name), str(data / name), "--shard-size", "1MB"]) == 0
    seen = {}
    monkeypatch.setattr(launch, "run_local", lambda steps, *a, **k: seen.setdefault("steps", steps) and 0)
    assert reproduce.main(["released", "--data", str(data), "--out", str(tmp_path / "runs"), "--stage",
                           str(tmp_path / "local"), "--set", "data.format=shards", "--gpus-per-node", "0"]) == 0
    for name in ("imagenet", "coco"):
        assert (tmp_path / "local" / name / ".staged.json").is_file()
    roots = {a for s in seen["steps"] for a in s.command if a.startswith("data.root=")}
    assert roots == {f"data.root={tmp_path / 'local/imagenet'}"}  # the released table: classification only
