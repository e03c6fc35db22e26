"""slurm/launch.sh (what both sbatch templates run) with a fake SLURM: `scontrol show hostnames`
answers localhost and `srun` starts SLURM_NTASKS local processes with SLURM_PROCID/SLURM_LOCALID, as
srun does on a node. Two CPU processes train one toy epoch through the real launch logic."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_train_classification import fast

FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: one local task per SLURM_NTASKS, each with its rank variables; waits for all
[ "$1" = --kill-on-bad-exit=1 ] && shift
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" > "$FAKE_LOG.$i" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""


def _fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo localhost\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_sbatch_templates_ask_for_the_signal_and_requeue():
    for name in ("1node.sbatch", "multinode.sbatch"):
        text = (ROOT / "slurm" / name).read_text()
        assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
        assert re.search(r"^exec bash slurm/launch.sh \"\$@\"$", text, re.M)
        assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text


@pytest.mark.slow
def test_launch_logic_with_fake_slurm_runs_two_ranks(toy_data, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PATH": f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", "SLURM_JOB_ID": "31337",
           "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "1",
           "PYTHON": sys.executable, "FAKE_LOG": str(tmp_path / "task"), "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None), env.pop("MASTER_PORT", None), env.pop("WORLD_SIZE", None), env.pop("RANK", None)
    proc = subprocess.run(["bash", str(ROOT / "slurm/launch.sh"), str(ROOT / "train_classification.py"),
                           *fast(toy_data / "imagenet", out, "schedule.epochs=1")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    logs = "".join((tmp_path / f"task.{i}").read_text() for i in range(2) if (tmp_path / f"task.{i}").exists())
    assert proc.returncode == 0, proc.stdout + proc.stderr + logs[-3000:]
    assert "rendezvous localhost:" + str(20000 + 31337 % 20000) in proc.stdout
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    assert json.loads((out / "env.json").read_text())["slurm_job_id"] == "31337"
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["val_images"] == 100  # the two ranks shared the validation set, each image once
