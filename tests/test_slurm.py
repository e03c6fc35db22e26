"""What the one-node SLURM of tests/test_slurm_real.py cannot show: slurm/launch.sh (what both sbatch
templates run) in an allocation of several hosts. A fake `scontrol show hostnames` expands the node list
and a fake `srun` records each task's environment as srun would set it on node 2 of 2 (SLURM_PROCID,
SLURM_LOCALID, SLURM_NODEID): the rendezvous is the first host, the port comes from the job id, and each
task's rank, world size and local rank, read by engine/distributed.py, are SLURM's."""

import os
import re
import subprocess
import sys

from tests.conftest import ROOT
from tests.test_multinode import LAUNCH_VARS

FAKE_SRUN = """#!/usr/bin/env bash
# fake srun: the tasks of node 2 of 2 (global ranks 2 and 3 of 4), each running the command with srun's
# variables; the command here prints the ranks engine/distributed.py reads
[ "$1" = --kill-on-bad-exit=1 ] && shift
for ((i = 0; i < SLURM_NTASKS_PER_NODE; i++)); do
  SLURM_PROCID=$((SLURM_NTASKS_PER_NODE + i)) SLURM_LOCALID=$i SLURM_NODEID=1 "$@" > "task$i" &
done
wait && cat task*
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# fake scontrol: `show hostnames node[07-08]` as SLURM expands it
[ "$1 $2" = "show hostnames" ] && [ "$3" = "node[07-08]" ] && printf 'node07\\nnode08\\n' && exit 0
exit 1
"""
PROBE = ("from engine.distributed import _env_ranks; import os; "
         "print('task', *_env_ranks(), os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'], "
         "os.environ['OMP_NUM_THREADS'])")


def test_sbatch_templates_ask_for_the_signal_and_requeue():
    for name, nodes in (("1node.sbatch", 1), ("multinode.sbatch", 2)):
        text = (ROOT / "slurm" / name).read_text()
        assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
        assert re.search(r"^exec bash slurm/launch.sh \"\$@\"$", text, re.M)
        assert "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gpus-per-node=8" in text
        assert f"#SBATCH --nodes={nodes}\n" in text


def test_launch_logic_on_two_hosts(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in (*LAUNCH_VARS, "OMP_NUM_THREADS")}
    env.update({"PATH": f"{bin_dir}:{env['PATH']}", "PYTHON": sys.executable, "PYTHONPATH": str(ROOT),
                "SLURM_JOB_ID": "123457", "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_NUM_NODES": "2",
                "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "12",
                "SLURM_RESTART_COUNT": "3"})
    proc = subprocess.run(["bash", str(ROOT / "slurm/launch.sh"), "-c", PROBE], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    port = 20000 + 123457 % 20000
    assert lines[0] == f"launch: job 123457, 4 tasks on 2 node(s), rendezvous node07:{port}, restart 3"
    # (rank, world size, local rank) per task, then the rendezvous and threads every task sees
    assert lines[1:] == [f"task {2 + i} 4 {i} node07 {port} 12" for i in range(2)]


def test_time_limit_warning_after_the_run_does_not_kill_the_finished_process():
    # SLURM's --signal=USR1 may arrive while a finished run exits (its handlers are restored by then)
    code = ("import os, signal, time; from engine.preemption import Preemption; p = Preemption(False); "
            "p.restore(); os.kill(os.getpid(), signal.SIGUSR1); time.sleep(0.1); "
            "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL; print('alive')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "alive\n"), (proc.returncode, proc.stderr)
