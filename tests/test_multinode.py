"""Across nodes: `torchrun --nnodes=2` on one machine (two launches, node ranks 0 and 1, one process each,
a static rendezvous on 127.0.0.1) trains to the same weights as `--nproc_per_node=2` on one node, for
classification and segmentation. The second node runs in a directory of its own: the run directory
(shared, as on a cluster's file system) is written by rank 0 alone, and node 1's launch writes nothing
and logs nothing. A probe under the same two-node launch shows what engine/distributed.py makes of it:
global ranks 0 and 1, local rank 0 on each node (the GPU index on a real cluster), one main process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.test_train_classification import fast as fast_classification
from tests.test_train_segmentation import fast as fast_segmentation

LAUNCH_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by each launch
ENV = {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}, "OMP_NUM_THREADS": "1"}
PROBE = ("import json, torch.distributed as td; from engine import distributed; s = distributed.init('cpu'); "
         "ranks = [None, None]; td.all_gather_object(ranks, s.rank); "
         "print(json.dumps([s.rank, s.world_size, s.local_rank, str(s.device), s.is_main, ranks])); "
         "distributed.shutdown()")  # as every script does: a gloo group alive at exit can abort the process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_node(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
              f"--master_port={free_port()}", *argv]
    proc = subprocess.run(launch, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def two_nodes(argv: list[str], tmp: Path) -> list[subprocess.CompletedProcess]:
    """Node 0 and node 1 as two torchrun launches, each from its own (empty) directory."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cwd = tmp / f"node{node}"
        cwd.mkdir()
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                  "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}", *argv]
        procs.append(subprocess.Popen(launch, cwd=cwd, env={**ENV, "PYTHONPATH": str(ROOT)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    for p in done:
        assert p.returncode == 0, p.stderr[-3000:]
    return done


def same_run(one: Path, two: Path, epochs: int, nodes: list[subprocess.CompletedProcess], tmp: Path) -> None:
    a, b = (torch.load(d / "checkpoints/last.pt", weights_only=True)["model"] for d in (one, two))
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, first {differ[:3]}"
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["epoch"] for r in rows[1]] == list(range(epochs))  # one writer: each row once
    timing = {"images_per_s", "data_wait"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows[0]] == \
        [{k: v for k, v in r.items() if k not in timing} for r in rows[1]]
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in one.rglob("*") if "tensorboard" not in p.parts) == \
        sorted(p.name for p in two.rglob("*") if "tensorboard" not in p.parts)
    assert list((tmp / "node1").iterdir()) == []  # node 1 wrote nothing where it ran
    assert "epoch 0:" in nodes[0].stdout and "epoch 0:" not in nodes[1].stdout  # and logged nothing


@pytest.mark.slow
def test_two_node_launch_gives_each_process_its_ranks(tmp_path):
    nodes = two_nodes(["--no-python", sys.executable, "-c", PROBE], tmp_path)
    got = [json.loads(p.stdout.strip().splitlines()[-1]) for p in nodes]
    # [rank, world size, local rank, device, main process, every rank as gathered over the process group]
    assert got == [[0, 2, 0, "cpu", True, [0, 1]], [1, 2, 0, "cpu", False, [0, 1]]]


@pytest.mark.slow
def test_two_nodes_train_classification_like_one(toy_data, tmp_path):
    def args(out):
        return [str(ROOT / "train_classification.py"),
                *fast_classification(toy_data / "imagenet", out, "schedule.epochs=2", "data.workers=1")]

    one_node(args(tmp_path / "one"), tmp_path)
    nodes = two_nodes(args(tmp_path / "two"), tmp_path)
    same_run(tmp_path / "one", tmp_path / "two", 2, nodes, tmp_path)


@pytest.mark.slow
def test_two_nodes_train_segmentation_like_one(toy_data, tmp_path):
    def args(out):
        return [str(ROOT / "train_segmentation.py"), *fast_segmentation(toy_data, out, "schedule.epochs=1")]

    one_node(args(tmp_path / "one"), tmp_path)
    nodes = two_nodes(args(tmp_path / "two"), tmp_path)
    same_run(tmp_path / "one", tmp_path / "two", 1, nodes, tmp_path)
