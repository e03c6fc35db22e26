"""slurm/1node.sbatch against a real SLURM (`bash slurm/local_cluster.sh start`: slurmctld, slurmd and
munge on this machine; CI starts it in .ci/run): the scheduler's own signal delivery, requeue and
environment. Skipped where there is no `sbatch` or no idle node.

The template asks for 8 GPU tasks; the jobs here override that to 2 CPU tasks, the process count of
the uninterrupted runs they are compared with.

Time limits: slurmctld checks them every 30 s (its fixed PERIODIC_TIMEOUT) and sends the `--signal`
at the first check that falls within 30 s of the signal time, so `--time=1 --signal=USR1@8` reaches a
job at the first check after 22 s of its allocation: anywhere from 22 to 52 s in. Rather than a run long
enough to be signalled whatever the phase of the checks (a minute of training twice: the job and its
reference), a probe job (a shell that sleeps) measures when the checks happen, and the job is submitted
4 s after one: it is signalled at 26 s, well after its handlers are installed (a signal before them
kills a process; startup takes 4 s on 2 idle cores, 17 s on an overloaded machine), with about 22 s
trained on idle cores. The requeued job waits out cred_expire (10 s in local_cluster.sh), so it is
under 20 s old at the next check (not signalled) and has about 45 s until the one after.
"""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.test_multinode import LAUNCH_VARS, free_port


def _no_cluster() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH: start a local SLURM with `bash slurm/local_cluster.sh start` (root)"
    try:
        # a busy node counts (the jobs wait their turn); a down or drained one does not
        up = subprocess.run(["sinfo", "-h", "-r", "-t", "idle,mixed,allocated,completing", "-o", "%n"],
                            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed ({exc}): is slurmctld running? (`bash slurm/local_cluster.sh start`)"
    return None if up else "sbatch is here but no SLURM node is up (`bash slurm/local_cluster.sh status`)"


NO_CLUSTER = _no_cluster()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NO_CLUSTER is not None, reason=str(NO_CLUSTER))]

TEMPLATE = "slurm/1node.sbatch"
CPU = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
# The toy recipe made smaller (MobileNetV3-Small x0.5 at 32 px: 400 images, 7 optimizer steps an epoch),
# with one loader worker per process as real runs have; one progress line per epoch in the job log.
SMALL = ["model.name=mobilenet_v3_small", "model.width_mult=0.5", "data.crop_size=32", "data.val_resize=36",
         "data.val_crop=32", "data.workers=1", "run.print_freq=1000"]
STEPS = 7  # optimizer steps per epoch: 400 images / (2 processes x 32)
# 0.37-0.8 s an epoch on 2 idle cores (measured on different days), so 30-64 s of training: still running
# at the signal (26 s in) on the fastest machine seen, where 35 and 60 epochs finished just before it
LONG = ["schedule.epochs=80"]
# Validation at 112 px (about a second), so that a test can cancel the job inside it
SHORT = ["schedule.epochs=2", "data.val_resize=128", "data.val_crop=112"]
SIGNAL_AFTER = 22  # --time=1 --signal=USR1@8: signalled at the first check after 60 - 8 - 30 = 22 s
SUBMIT_AFTER_CHECK = 4
# mid-epoch (epoch, step) or, when the signal came during validation, after the epoch's checkpoint (epoch)
STOPPED = (rf"stopped by SIGUSR1 (?:at epoch (\d+), optimizer step (\d+)/{STEPS}"
           rf"|at the end of epoch (\d+) \(after its evaluation\))")


def _resumed_line(out, match: re.Match) -> str:
    """The line the next allocation must print after the stop `match` (of STOPPED)."""
    epoch, step, evaluated = match.groups()
    if evaluated is not None:
        return f"resumed from {out / 'checkpoints/last.pt'} (epoch {evaluated} done); continuing at epoch " \
               f"{int(evaluated) + 1}\n"
    # one micro-batch per optimizer step here: the run continues at the micro-batch it stopped before
    return (f"resumed from {out / 'checkpoints/last.pt'} (epoch {int(epoch) - 1} done); continuing at "
            f"epoch {epoch}, micro-batch {step}\n")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_")) and k not in LAUNCH_VARS}
    return {**env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def _args(toy_data: Path, out: Path, *extra) -> list[str]:
    return ["train_classification.py", "--recipe", "recipes/toy/classification.yaml",
            f"data.root={toy_data / 'imagenet'}", f"run.output_dir={out}", *SMALL, *extra]


def sbatch(log: Path, *argv: str) -> str:
    """`sbatch argv` from the repository root (as the README says), output to `log`; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}", *argv],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=20).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def wait(job: str, log: Path, timeout: float) -> dict[str, str]:
    """Wait until the job has left the queue for good (a requeued job comes back PENDING); its record."""
    deadline = time.time() + timeout
    while True:
        info = job_info(job)
        if info.get("JobState") in FINAL:
            return info
        if time.time() > deadline:
            subprocess.run(["scancel", job], timeout=20)
            text = log.read_text() if log.exists() else "(no log)"
            pytest.fail(f"job {job} still {info.get('JobState')} after {timeout:.0f} s; log:\n{text[-4000:]}")
        time.sleep(0.5)


def _weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def differing(a: Path, b: Path) -> tuple[int, int]:
    """(tensors that differ, tensors compared) between two checkpoints' model weights."""
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return sum(not torch.equal(wa[k], wb[k]) for k in wa), len(wa)


def check_time(tmp: Path) -> float:
    """When slurmctld checked time limits (epoch seconds, up to a second late): a probe job that asks for
    a signal 59 s before its 1-minute limit gets it at the first check after it starts."""
    log = tmp / "probe.out"
    job = sbatch(log, "--ntasks=1", "--cpus-per-task=1", "--time=1", "--signal=B:USR1@59",
                 "--job-name=mbv3-probe", "--wrap",
                 "trap 'date +%s.%N; exit 0' USR1; for i in $(seq 2000); do sleep 0.05; done")
    info = wait(job, log, timeout=120)
    assert info["JobState"] == "COMPLETED", f"the probe job was not signalled: {info}"
    return float(log.read_text().split()[-1])


@pytest.fixture(scope="module")
def short_run(toy_data, tmp_path_factory):
    """SHORT, uninterrupted, through the template."""
    tmp = tmp_path_factory.mktemp("slurm_short")
    log, out = tmp / "job.out", tmp / "run"
    job = sbatch(log, *CPU, "--time=10", TEMPLATE, *_args(toy_data, out, *SHORT))
    info = wait(job, log, timeout=300)
    return job, out, log.read_text(), info


@pytest.fixture(scope="module")
def requeued(toy_data, tmp_path_factory):
    """LONG in a job that reaches its time limit: SIGUSR1 near it, the run checkpoints and requeues
    the job (scontrol requeue), each new allocation resumes from the checkpoint, until done. Beside it,
    LONG uninterrupted under torchrun, 2 processes (run while the probe job waits for its signal)."""
    tmp = tmp_path_factory.mktemp("slurm_requeued")
    ref = tmp / "reference"
    reference = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                  f"--master_port={free_port()}", *_args(toy_data, ref, *LONG)],
                                 cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True)
    try:
        t_check = check_time(tmp)
        _, err = reference.communicate(timeout=600)
    finally:
        reference.kill()
    assert reference.returncode == 0, err[-3000:]
    for attempt in range(3):
        log, out = tmp / f"job{attempt}.out", tmp / f"run{attempt}"
        # the job is 26 s old at the check after the one it follows
        at = t_check + 30 * math.ceil((time.time() - t_check - SUBMIT_AFTER_CHECK) / 30) + SUBMIT_AFTER_CHECK
        time.sleep(max(0.0, at - time.time()))
        start = time.time()
        job = sbatch(log, *CPU, "--time=1", f"--signal=USR1@{60 - 30 - SIGNAL_AFTER}", TEMPLATE,
                     *_args(toy_data, out, *LONG))
        while job_info(job).get("JobState") == "PENDING" and time.time() - start < 5:
            time.sleep(0.1)
        if time.time() - start < 30 - SIGNAL_AFTER - SUBMIT_AFTER_CHECK:  # in time for the planned check
            break
        subprocess.run(["scancel", job], timeout=20)  # the node was busy: try at the next check
        wait(job, log, timeout=120)
    info = wait(job, log, timeout=600)
    return job, out, log.read_text(), info, time.time() - start, ref


def test_sbatch_template_trains_to_the_end(short_run):
    job, out, text, info = short_run
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text[-3000:]
    port = 20000 + int(job) % 20000  # slurm/launch.sh: the rendezvous port comes from the job id
    assert re.search(rf"^launch: job {job}, 2 tasks on 1 node\(s\), rendezvous \S+:{port}, restart 0$", text,
                     re.M)
    env = json.loads((out / "env.json").read_text())
    assert (env["world_size"], env["slurm_job_id"], env["cpu_threads"]) == (2, job, 1)
    assert [(r["epoch"], r["val_images"], r["optimizer_steps"]) for r in _rows(out)] == [(0, 100, STEPS),
                                                                                        (1, 100, STEPS)]
    assert torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert "Traceback" not in text and "stopped by" not in text


def test_time_limit_signal_requeues_and_resumes_to_the_uninterrupted_weights(requeued):
    job, out, text, info, seconds, ref = requeued
    early = "User defined signal 1" in text and "received SIGUSR1" not in text
    why = "the signal came before the run had installed its handlers (startup too slow)\n" if early else ""
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), why + text[-4000:]
    restarts = int(info["Restarts"])
    assert restarts >= 1, f"the job was never signalled before it finished:\n{text[-3000:]}"
    stops = re.findall(rf"{STOPPED}: .* \(requeued SLURM job {job}\)", text)
    assert len(stops) == restarts, text[-4000:]
    assert [r["epoch"] for r in _rows(out)] == list(range(80))  # each epoch once, across the allocations
    diff, n = differing(ref / "checkpoints/last.pt", out / "checkpoints/last.pt")
    assert diff == 0, f"{diff} of {n} tensors differ from the uninterrupted run"
    print(f"\nrequeue test: job {job}, {restarts} restart(s), stopped at (epoch, step) {stops}, "
          f"{seconds:.0f} s from submission to the end; {n} tensors compared, {diff} differ")


def test_requeued_job_log_says_which_restart_and_where_it_resumed(requeued):
    job, out, text, info, _, _ = requeued
    # one section per allocation, each opened by slurm/launch.sh's line with SLURM_RESTART_COUNT
    parts = re.split(rf"^launch: job {job}, 2 tasks on 1 node\(s\), rendezvous \S+, restart (\d+)$", text,
                     flags=re.M)
    counts, sections = [int(c) for c in parts[1::2]], parts[2::2]
    assert counts == list(range(int(info["Restarts"]) + 1)), text[-4000:]
    for before, after in zip(sections, sections[1:]):
        stop = re.search(STOPPED, before)
        assert stop is not None, before[-3000:]
        assert _resumed_line(out, stop) in after, after[:3000]
    assert "stopped by" not in sections[-1] and "resumed from" in sections[-1]


def test_scancel_during_validation_leaves_a_checkpoint_that_resumes_exactly(short_run, toy_data, tmp_path):
    # scancel sends SIGTERM to every process of the job (the ranks, their loader workers, srun), SIGKILL 30 s
    # (KillWait) later
    log, out = tmp_path / "job.out", tmp_path / "run"
    job = sbatch(log, *CPU, "--time=10", TEMPLATE, *_args(toy_data, out, *SHORT))
    end_of_training = f"epoch 0 {STEPS}/{STEPS} "  # the progress line of epoch 0's last step
    deadline = time.time() + 300
    while not (log.exists() and end_of_training in log.read_text()):
        assert time.time() < deadline and job_info(job).get("JobState") in ("PENDING", "RUNNING"), \
            log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.02)
    subprocess.run(["scancel", job], check=True, timeout=20)
    info = wait(job, log, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED", text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "stopped by SIGTERM" in text, text[-3000:]
    # the signal came during validation, which still counted every image once
    assert text.index(end_of_training) < text.index("received SIGTERM") < text.index("epoch 0: Acc@1"), text
    assert _rows(out)[0]["val_images"] == 100

    again = sbatch(log, *CPU, "--time=10", TEMPLATE, *_args(toy_data, out, *SHORT))  # the same command again
    info = wait(again, log, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-3000:]
    assert f"resumed from {out / 'checkpoints/last.pt'} (epoch 0 done); continuing at epoch 1" in text
    assert differing(short_run[1] / "checkpoints/last.pt", out / "checkpoints/last.pt")[0] == 0
    assert [r["epoch"] for r in _rows(out)] == [0, 1]
