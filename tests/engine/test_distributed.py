"""engine/distributed.py and engine.loop.launch_world_size in-process: which launcher a process was started
by (torchrun, srun or none), read from the environment as torchrun and SLURM document it, and the process
group each asks for. No process group is created: init_process_group is replaced by a recorder."""

import os

import pytest
import torch

from engine import distributed
from engine.distributed import DistState
from engine.loop import launch_world_size

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
               "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for name in LAUNCH_VARS:  # set, then delete: monkeypatch restores each as it was, even one the code sets
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)

    def set_(**values):
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))

    return set_


@pytest.fixture
def groups(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    return calls


def test_a_plain_process_is_one_rank_on_the_device_asked_for(env, groups, monkeypatch):
    assert distributed.init("cpu") == DistState(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert launch_world_size() == 1 and groups == []
    env(RANK=0)  # RANK alone (no WORLD_SIZE) is not torchrun
    assert distributed.init("cpu").world_size == 1
    monkeypatch.delenv("RANK")
    env(WORLD_SIZE=2)  # nor is WORLD_SIZE alone
    assert distributed.init("cpu").world_size == 1
    monkeypatch.delenv("WORLD_SIZE")
    env(SLURM_NTASKS=4)  # a SLURM allocation of 4 tasks, but this process was not started by srun
    assert distributed.init("cpu").world_size == 1 and launch_world_size() == 1 and groups == []


def test_torchrun_ranks_and_a_gloo_group_on_cpu(env, groups):
    env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, SLURM_PROCID=0, SLURM_NTASKS=8, SLURM_LOCALID=0)  # torchrun wins
    state = distributed.init("cpu")
    assert (state.rank, state.world_size, state.local_rank, state.is_main, state.distributed) == (3, 4, 1, False, True)
    assert launch_world_size() == 4
    [(args, kw)] = groups
    assert args == ("gloo",) and kw["rank"] == 3 and kw["world_size"] == 4 and kw["device_id"] is None


def test_torchrun_with_one_process_makes_no_group(env, groups):
    env(RANK=0, WORLD_SIZE=1)  # no LOCAL_RANK: local rank 0
    state = distributed.init("cpu")
    assert (state.rank, state.world_size, state.local_rank, state.is_main, state.distributed) == (0, 1, 0, True, False)
    assert groups == []


def test_srun_with_two_tasks_is_a_group_of_two(env, groups):
    """The smallest multi-task step (SLURM_NTASKS=2): a process group, not a plain process."""
    env(SLURM_PROCID=1, SLURM_NTASKS=2, SLURM_LOCALID=1, MASTER_ADDR="node1")
    state = distributed.init("cpu")
    assert (state.rank, state.world_size, state.local_rank, state.is_main, state.distributed) == (1, 2, 1, False, True)
    [(args, kw)] = groups
    assert args == ("gloo",) and (kw["rank"], kw["world_size"]) == (1, 2) and launch_world_size() == 2


def test_a_dist_state_cannot_be_changed_once_made():
    """Every module shares the DistState it was given (lock_dir's default is one instance for every call):
    none can change another's rank or world size."""
    import dataclasses

    state = DistState()
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.world_size = 2
    assert (state.world_size, state.distributed, state.is_main) == (1, False, True)  # still one process
    assert {state, DistState()} == {DistState()}  # frozen and compared by value: hashable, one element


def test_srun_tasks_need_a_master_address_and_get_a_default_port(env, groups, monkeypatch):
    env(SLURM_PROCID=2, SLURM_NTASKS=4, SLURM_LOCALID=1)
    with pytest.raises(RuntimeError, match="SLURM multi-task run: set MASTER_ADDR"):
        distributed.init("cpu")
    assert groups == []
    env(MASTER_ADDR="node1")
    state = distributed.init("cpu")
    assert (state.rank, state.world_size, state.local_rank) == (2, 4, 1)
    assert os.environ["MASTER_PORT"] == "29500" and launch_world_size() == 4
    env(MASTER_PORT=1234)
    distributed.init("cpu")
    assert os.environ["MASTER_PORT"] == "1234" and len(groups) == 2 and groups[0][0] == ("gloo",)


def test_srun_with_one_task_is_a_plain_process(env, groups):
    env(SLURM_PROCID=0, SLURM_LOCALID=0)  # no SLURM_NTASKS: one task
    assert distributed.init("cpu").world_size == 1 and launch_world_size() == 1 and groups == []
    env(SLURM_NTASKS=1)
    assert distributed.init("cpu").world_size == 1 and launch_world_size() == 1 and groups == []


def test_collectives_without_a_group_are_the_local_values():
    t = torch.tensor([1.0, -2.0])
    assert distributed.all_reduce_sum(t, DistState()) is t and t.tolist() == [1.0, -2.0]
    assert distributed.all_reduce_max(t, DistState()).tolist() == [1.0, -2.0]
    assert distributed.all_gather_object({"a": 1}, DistState()) == [{"a": 1}]


def test_device_names(monkeypatch):
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="run.device='cuda:1' but CUDA is not available"):
        distributed.resolve_device("cuda:1")


def test_each_process_takes_the_gpu_of_its_local_rank_unless_the_recipe_names_one(monkeypatch, env, groups):
    """torchrun and srun start one process per GPU: `cuda` (or `auto` on a GPU machine) is the GPU numbered
    by the local rank, made the current device; `cuda:N` is GPU N whatever the rank. A CUDA machine is
    stood in for (no GPU here): only which device is chosen and set is checked."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert distributed.resolve_device("cuda") == torch.device("cuda", 0)
    assert distributed.resolve_device("auto", 2) == torch.device("cuda", 2)
    assert distributed.resolve_device("cuda:1", 3) == torch.device("cuda", 1)
    assert distributed.resolve_device("cpu", 3) == torch.device("cpu")
    assert current == [torch.device("cuda", 0), torch.device("cuda", 2), torch.device("cuda", 1)]
    env(RANK=5, WORLD_SIZE=8, LOCAL_RANK=1)  # torchrun on a GPU node: nccl, bound to the process's GPU
    state = distributed.init("cuda")
    assert state.device == torch.device("cuda", 1) and current[-1] == torch.device("cuda", 1)
    [(args, kw)] = groups
    assert args == ("nccl",) and kw["device_id"] == torch.device("cuda", 1)


_RANK_1 = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from engine import distributed
from engine.distributed import DistState
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=1, world_size=2)
state = DistState(rank=1, world_size=2)
total = distributed.all_reduce_sum(torch.tensor([2.0, 10.0]), state).tolist()
top = distributed.all_reduce_max(torch.tensor([4.0, 1.0]), state).tolist()
every = distributed.all_gather_object({"rank": 1}, state)
from pathlib import Path
from engine import preemption, rundir
try:
    rundir.lock_dir(Path(sys.argv[3]), state)
except Exception as exc:
    refused = f"{type(exc).__name__}: {exc}"
import os, signal
stop = preemption.Preemption(distributed=True)
os.kill(os.getpid(), signal.SIGUSR1)
agreed = stop.agreed()
stop.restore()
distributed.shutdown()
print(total, top, every)
print(refused)
print(agreed)
"""


def test_collectives_over_two_real_gloo_ranks(tmp_path):
    """A real 2-rank gloo group: this process is rank 0 (so the collectives run here), a subprocess rank 1.
    Sums and maxima across ranks, and every rank's object in rank order, on both. Then the two agreements
    the engine builds on them: rank 0's refusal of a locked run directory stops rank 1 too (docs/cluster.md),
    and a preemption signal that only rank 1 received stops rank 0 as well (the MAX of the signal numbers)."""
    import fcntl
    import signal
    import struct
    import subprocess
    import sys

    import torch.distributed as dist

    from engine import preemption, rundir
    from engine.errors import RunDirError
    from tests.conftest import ROOT

    store, run_dir = tmp_path / "store", tmp_path / "run"
    run_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", _RANK_1, str(store), str(ROOT), str(run_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    refused, stop = None, None
    handlers = {s: signal.getsignal(s) for s in preemption.SIGNALS}
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=2)
        state = DistState(rank=0, world_size=2)
        total = distributed.all_reduce_sum(torch.tensor([1.0, 0.0]), state).tolist()
        top = distributed.all_reduce_max(torch.tensor([5.0, 0.0]), state).tolist()
        every = distributed.all_gather_object({"rank": 0}, state)
        with open(run_dir / "run.lock", "a+") as holder:  # another run holds the directory (an OFD lock, which
            # conflicts with lockf's even within this process: fcntl(2))
            holder.write("host elsewhere, pid 4242\n")
            holder.flush()
            fcntl.fcntl(holder, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
            with pytest.raises(RunDirError) as err:
                rundir.lock_dir(run_dir, state)
            refused = str(err.value)
        stop = preemption.Preemption(distributed=True)
        agreed = stop.agreed()
    finally:
        if stop is not None:
            stop.restore()
        for s, h in handlers.items():
            signal.signal(s, h)
        distributed.shutdown()
        out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err[-2000:]
    assert (total, top, every) == ([3.0, 10.0], [5.0, 1.0], [{"rank": 0}, {"rank": 1}])
    assert refused == (f"{run_dir} is in use by another run (host elsewhere, pid 4242; {run_dir / 'run.lock'} is "
                       "locked); wait for it to end or give this run another run.output_dir")
    assert (agreed, stop.signum) == (signal.SIGUSR1, 0)  # rank 1's signal; none arrived here
    assert out.splitlines() == ["[3.0, 10.0] [5.0, 1.0] [{'rank': 0}, {'rank': 1}]", f"RunDirError: {refused}",
                                str(int(signal.SIGUSR1))]
    assert not dist.is_initialized()


def test_a_group_waits_30_minutes_for_a_slow_rank(env, groups):
    """The collective timeout (docs/cluster.md): long enough for rank 0's checkpoint save and a full
    evaluation, short enough that a dead rank ends the job within the hour."""
    import datetime

    env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0)
    distributed.init("cpu")
    [(_, kw)] = groups
    assert kw["timeout"] == datetime.timedelta(minutes=30)
