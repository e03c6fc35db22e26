"""engine/preemption.py's requeue: `scontrol requeue JOB` run as SLURM's own command would be, here a stand-in
`scontrol` executable on PATH that records its arguments and answers as told (the real one is exercised
against a real SLURM in tests/test_slurm_real.py); the signal policy of loader workers, the handlers, the
agreement over a process group and the exit-time kill of daemonic children, in-process."""

import os
import signal
import sys
import time

import pytest
import torch

from engine.preemption import requeue_if_slurm


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv"

    def answer(code: int, stdout: str = "", stderr: str = ""):
        script = bin_dir / "scontrol"
        script.write_text(f"#!/bin/sh\necho \"$@\" > {log}\nprintf '{stdout}'\nprintf '{stderr}' >&2\nexit {code}\n")
        script.chmod(0o755)
        return log

    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    return answer


def test_usr1_in_a_batch_job_requeues_it(scontrol):
    log = scontrol(0)
    assert requeue_if_slurm(signal.SIGUSR1) == "requeued SLURM job 4242"
    assert log.read_text().split() == ["requeue", "4242"]


def test_a_failed_requeue_says_why_from_stderr_or_stdout_or_that_it_said_nothing(scontrol):
    scontrol(1, stderr="Requested operation is presently disabled")
    assert requeue_if_slurm(signal.SIGUSR1) == ("scontrol requeue 4242 failed (exit 1): Requested operation is "
                                                "presently disabled")
    scontrol(2, stdout="Job is no longer requeueable")
    assert requeue_if_slurm(signal.SIGUSR1) == "scontrol requeue 4242 failed (exit 2): Job is no longer requeueable"
    scontrol(1)
    assert requeue_if_slurm(signal.SIGUSR1) == "scontrol requeue 4242 failed (exit 1): no message"


def test_sigterm_and_processes_outside_a_job_are_not_requeued(scontrol, monkeypatch):
    log = scontrol(0)
    assert requeue_if_slurm(signal.SIGTERM) is None  # scancel's signal; a preempting partition requeues itself
    monkeypatch.delenv("SLURM_JOB_ID")
    assert requeue_if_slurm(signal.SIGUSR1) is None
    assert not log.exists()


class _Dispositions(torch.utils.data.Dataset):
    """What a loader worker sees: each preemption signal's handler and whether it is blocked."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        from engine.preemption import SIGNALS

        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return torch.tensor([[signal.getsignal(s) == signal.SIG_IGN, s in blocked] for s in SIGNALS])


def test_loader_workers_ignore_the_preemption_signals_and_the_main_process_keeps_its_mask():
    from engine.preemption import SIGNALS, covers, data_loader

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    loader = data_loader(_Dispositions(), num_workers=1, batch_size=None)
    [seen] = list(loader)
    assert seen.tolist() == [[True, False]] * len(SIGNALS)  # ignored, and no longer blocked
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before  # blocked only while the workers start
    assert covers(loader) and covers(torch.utils.data.DataLoader([1], num_workers=0))
    assert not covers(torch.utils.data.DataLoader([1], num_workers=1))
    with pytest.raises(TypeError, match="sets worker_init_fn itself"):
        data_loader(_Dispositions(), num_workers=1, worker_init_fn=print)


def test_a_signal_is_recorded_and_a_second_ctrl_c_stops_at_once(capsys):
    from engine.preemption import Preemption

    p = Preemption(distributed=False)
    try:
        assert p.agreed() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.agreed() == signal.SIGTERM
        assert "received SIGTERM: stopping at the next optimizer step" in capsys.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)  # a first Ctrl-C after a SIGTERM: recorded like it
        assert p.agreed() == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        p.restore()


def test_ranks_agree_through_the_process_group(tmp_path):
    """With a process group, agreed() is a MAX over ranks (a 1-rank gloo group here; 2 ranks run in
    tests/test_run_safety.py)."""
    import torch.distributed as dist

    from engine.preemption import Preemption

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    p = Preemption(distributed=True)
    try:
        assert p._group is dist.group.WORLD and p.agreed() == 0
        p.signum = signal.SIGUSR1
        assert p.agreed() == signal.SIGUSR1
    finally:
        p.restore()
        dist.destroy_process_group()


def _stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)


def test_daemonic_children_are_killed_at_exit_even_if_they_ignore_sigterm():
    import multiprocessing

    from engine.preemption import _kill_children_at_exit

    child = multiprocessing.get_context("fork").Process(target=_stubborn, daemon=True)
    child.start()
    time.sleep(0.5)
    previous = signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # as torch's worker-failure handler
    try:
        started = time.monotonic()
        _kill_children_at_exit()
        assert not os.path.exists(f"/proc/{child.pid}")  # reaped (joined) before returning: not even a zombie
        assert not child.is_alive() and child.exitcode == -signal.SIGKILL
        assert time.monotonic() - started < 5
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL  # no handler left to report the kill
    finally:
        signal.signal(signal.SIGCHLD, previous)


def test_the_worker_init_ignores_and_unblocks_the_signals_in_the_process_it_runs_in():
    """What each loader worker runs first, here in this process (the test above sees it in a real worker):
    a signal pending since the fork is discarded, none stays blocked."""
    from engine.preemption import SIGNALS, ignore_in_worker

    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        ignore_in_worker(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in SIGNALS)
        assert not set(SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


_EXITS = """
import multiprocessing, signal, sys, time
sys.path.insert(0, sys.argv[1])
import engine.preemption  # registers the exit-time kill on import


def stubborn():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


if __name__ == "__main__":
    multiprocessing.get_context("fork").Process(target=stubborn, daemon=True).start()
    time.sleep(0.5)
    print("leaving", flush=True)
"""


def test_a_process_with_a_worker_that_ignores_sigterm_still_exits():
    """Importing engine.preemption registers the kill at exit: without it, multiprocessing's own exit handler
    would SIGTERM the daemonic child (which ignores it, as loader workers do) and wait for it forever."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _EXITS, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "leaving\n", proc.stderr[-2000:]
    assert time.monotonic() - started < 30


def test_loader_workers_are_started_with_the_signals_blocked_and_only_workers(monkeypatch):
    """docs/cluster.md: a loader's workers start with the preemption signals blocked (so one arriving as they
    start waits, and is then ignored by ignore_in_worker); a loader without workers starts none and blocks
    nothing. What torch's worker start sees is recorded in place of starting them."""
    from engine.preemption import SIGNALS, data_loader

    seen = []

    def start(self):
        seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return iter(())

    monkeypatch.setattr(torch.utils.data.DataLoader, "_get_iterator", start)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert not set(SIGNALS) & before
    for workers in (0, 1, 2):
        assert list(data_loader([1, 2], num_workers=workers)) == []
    assert [set(SIGNALS) <= mask for mask in seen] == [False, True, True]
    assert seen[0] == before and signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_restore_puts_back_the_previous_handlers_and_ignores_a_default_sigusr1():
    """After the run, SLURM's time-limit SIGUSR1 must not kill a finishing process: a SIGUSR1 that had the
    default action (which terminates) becomes ignored; every other handler, SIGUSR1's own included, comes back
    as it was."""
    from engine.preemption import Preemption

    def mine(signum, frame):
        pass

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        for before, after in (
                ({signal.SIGTERM: signal.SIG_DFL, signal.SIGUSR1: signal.SIG_DFL, signal.SIGINT: mine},
                 {signal.SIGTERM: signal.SIG_DFL, signal.SIGUSR1: signal.SIG_IGN, signal.SIGINT: mine}),
                ({signal.SIGTERM: mine, signal.SIGUSR1: mine, signal.SIGINT: signal.default_int_handler},
                 {signal.SIGTERM: mine, signal.SIGUSR1: mine, signal.SIGINT: signal.default_int_handler})):
            for s, h in before.items():
                signal.signal(s, h)
            p = Preemption(distributed=False)
            assert all(signal.getsignal(s) == p._handle for s in before)
            p.restore()
            assert {s: signal.getsignal(s) for s in before} == after
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def test_the_stop_message_reaches_a_redirected_stderr_at_once(tmp_path, monkeypatch):
    """Under SLURM stderr is a file (block-buffered): the line saying why the run stops is flushed when the
    signal arrives, not when the process exits (a process killed after the grace period would lose it)."""
    from engine.preemption import Preemption

    err = tmp_path / "stderr"
    usr1 = signal.getsignal(signal.SIGUSR1)
    with open(err, "w") as fh, monkeypatch.context() as patch:
        patch.setattr(sys, "stderr", fh)
        p = Preemption(distributed=False)
        try:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs before the next line of this frame
            assert err.read_text() == ("received SIGUSR1: stopping at the next optimizer step (or after the "
                                       "evaluation under way) with a checkpoint\n")
            assert p.agreed() == signal.SIGUSR1
        finally:
            p.restore()
            signal.signal(signal.SIGUSR1, usr1)
