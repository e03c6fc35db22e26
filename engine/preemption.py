"""Preemption: SIGTERM, SIGUSR1 (SLURM's `--signal=USR1@120`) and SIGINT stop a run at the next
optimizer-step boundary, after every process has agreed on it, with a mid-epoch checkpoint; a
signal that arrives while the model is evaluated stops the run right after that epoch's checkpoint.

Handlers only record the signal; `Preemption.agreed()` is called by the training loop once per
optimizer step and returns the same answer on every rank (a MAX all-reduce of the signal number
over a gloo group, so an NCCL run pays no GPU synchronisation for it). Loader workers ignore the
signals: SLURM signals every process of a step, and a worker that died on SIGTERM would end the
epoch (or its evaluation) with a DataLoader error before the checkpoint could be written. Every
DataLoader of the project is built by `data_loader`, which gives its workers that policy.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import signal
import subprocess
import sys

import torch
import torch.distributed as tdist
from torch.utils.data import DataLoader

SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


def ignore_in_worker(worker_id: int) -> None:
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)  # a signal pending since the fork is discarded here
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class _Loader(DataLoader):
    """Workers are started with the signals blocked, so that one arriving before `ignore_in_worker` runs
    (torch's worker first installs a SIGTERM handler that exits) waits, and is then ignored; the main
    process gets it as soon as the workers exist."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            return super()._get_iterator()  # forks or spawns the workers; they inherit the mask
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def data_loader(dataset, **kwargs) -> DataLoader:
    """torch's DataLoader whose workers ignore the preemption signals (the main process handles them).
    The one way the engine, data/ and the scripts build a loader, training and evaluation alike."""
    if kwargs.get("worker_init_fn") is not None:
        raise TypeError("data_loader sets worker_init_fn itself (the workers' signal policy)")
    return _Loader(dataset, worker_init_fn=ignore_in_worker, **kwargs)


def covers(loader: DataLoader) -> bool:
    """Whether `loader` was built by data_loader (or has no workers to protect)."""
    return loader.num_workers == 0 or isinstance(loader, _Loader)


def _kill_children_at_exit() -> None:
    """At interpreter exit multiprocessing stops daemonic children with SIGTERM and waits for them; loader
    workers ignore it (above), so a process leaving on an error or a preemption would wait forever. This
    runs first (atexit is last-in, first-out) and ends them with SIGKILL: they hold no state of their own."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the kill as a worker failure
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


atexit.register(_kill_children_at_exit)


class Preemption:
    def __init__(self, distributed: bool):
        self.signum = 0
        self._previous = {}
        self._group = None
        if distributed:
            self._group = tdist.new_group(backend="gloo") if tdist.get_backend() != "gloo" else tdist.group.WORLD
        for s in SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: stopping at the next optimizer step (or after the "
              "evaluation under way) with a checkpoint",
              file=sys.stderr, flush=True)

    def agreed(self) -> int:
        """The signal every rank stops for (0: none), identical on all ranks."""
        if self._group is None:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._group)
        return int(flag.item())

    def restore(self) -> None:
        """The previous handlers, except that a default SIGUSR1 becomes ignored: the run is over, and SLURM's
        time-limit warning arriving while the process exits would otherwise kill it (a finished job FAILED)."""
        for s, handler in self._previous.items():
            usr1 = s == getattr(signal, "SIGUSR1", None)
            signal.signal(s, signal.SIG_IGN if usr1 and handler == signal.SIG_DFL else handler)
        self._previous = {}


def requeue_if_slurm(signum: int) -> str | None:
    """Inside a SLURM batch job stopped by SIGUSR1 (the time-limit warning asked for with
    `#SBATCH --signal=USR1@120`), requeue the job so the next allocation resumes it. SIGTERM is not
    requeued here: it is also what `scancel` sends, and a preempting partition requeues by itself."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or signum != getattr(signal, "SIGUSR1", None):
        return None
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:  # its reason (stderr was once empty in a failed requeue: stdout too)
        said = (proc.stderr.strip() or proc.stdout.strip() or "no message")
        return f"scontrol requeue {job} failed (exit {proc.returncode}): {said}"
    return f"requeued SLURM job {job}"
