"""The run directory and cluster behaviour of every script (engine/rundir.py, engine/loop.py,
engine/preemption.py), exercised through train_classification.py on the toy ImageNet:
preemption signals with exact resume (1 process, and 2 gloo processes under torchrun), SLURM requeue,
refusals that leave the directory untouched, accepted recipe changes that take effect, a truncated
last.pt, divergence, bad values and paths."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_in_process
from tests.test_train_classification import _weights, fast, run_script


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _wait_for_epoch_1(proc: subprocess.Popen) -> str:
    """Read the run's stdout until epoch 1's first optimizer step is printed (the runs below print every
    step: run.print_freq=1), and return what was read. A signal from then on lands mid-epoch: after epoch
    0's end-of-epoch check (a signal before it stops the run after epoch 0's evaluation) and with steps of
    epoch 1 left. Waiting a fixed time instead raced both ways on a loaded machine."""
    seen = []
    while True:
        line = proc.stdout.readline()
        assert line, f"the run ended before epoch 1's first step: {''.join(seen)[-2000:]}{proc.stderr.read()[-2000:]}"
        seen.append(line)
        if line.startswith("epoch 1 1/"):
            return "".join(seen)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ from the uninterrupted run"


def _fake_scontrol(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n"
                      "[ \"$1\" = show ] && echo localhost\nexit 0\n")
    script.chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_sigusr1_mid_epoch_checkpoints_requeues_and_resumes_bit_identical(toy_data, tmp_path):
    # run.global_batch=128 at 32 per step on one process: 4 micro-batches per optimizer step
    extra = ("schedule.epochs=3", "model.stochastic_depth=0.1", "data.workers=1", "run.global_batch=128",
             "run.print_freq=1")
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    assert run_script(fast(toy_data / "imagenet", ref, *extra), tmp_path).returncode == 0
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PATH": f"{_fake_scontrol(tmp_path)}:{os.environ['PATH']}"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_classification.py"),
                             *fast(toy_data / "imagenet", out, *extra)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = _wait_for_epoch_1(proc)
    proc.send_signal(signal.SIGUSR1)
    stdout, stderr = proc.communicate(timeout=240)
    stdout = before + stdout
    assert proc.returncode == 128 + signal.SIGUSR1, stderr
    assert "stopped by SIGUSR1 at epoch" in stdout and "requeued SLURM job 4242" in stdout
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["position"]["micro"] > 0, "expected a mid-epoch checkpoint"
    assert state["batch_plan"]["accumulate"] == 4 and state["batch_plan"]["global_batch"] == 128
    epoch_files = sorted(p.name for p in (out / "checkpoints").glob("epoch_*.pt"))
    (out / "checkpoints" / ".last.pt.orphan.tmp").write_bytes(b"half a file")  # an interrupted save
    resumed = run_script(fast(toy_data / "imagenet", out, *extra), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"micro-batch {state['position']['micro']}" in resumed.stdout
    assert not (out / "checkpoints" / ".last.pt.orphan.tmp").exists()
    _same_weights(ref / "checkpoints/last.pt", out / "checkpoints/last.pt")
    a, b = _rows(ref), _rows(out)
    assert [r["epoch"] for r in b] == [0, 1, 2] and epoch_files
    for ra, rb in zip(a, b):  # the interrupted epoch's mean loss and LR are the uninterrupted run's
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-12) and ra["lr"] == rb["lr"]
        assert ra["acc1"] == rb["acc1"] and ra["optimizer_steps"] == rb["optimizer_steps"] == 4


@pytest.mark.slow
def test_sigterm_to_torchrun_two_gloo_processes_resumes_bit_identical(toy_data, tmp_path):
    # 2 processes x 32 x accumulate 2 = the same global batch of 128 as 1 process x 32 x 4 above
    extra = ("schedule.epochs=3", "model.stochastic_depth=0.1", "data.workers=0", "run.global_batch=128",
             "run.print_freq=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, port):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                str(ROOT / "train_classification.py"), *fast(toy_data / "imagenet", out, *extra)]

    ref, out = tmp_path / "ref", tmp_path / "stopped"
    proc = subprocess.run(torchrun(ref, 29621), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    derived = json.loads((ref / "env.json").read_text())["derived"]
    assert (derived["processes"], derived["accumulate"], derived["global_batch"]) == (2, 2, 128)
    proc = subprocess.Popen(torchrun(out, 29622), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    before = _wait_for_epoch_1(proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    stdout = before + stdout
    assert proc.returncode != 0 and "stopped by SIGTERM at epoch" in stdout, stderr[-3000:]
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["position"]["micro"] > 0 and len(state["rng"]) == 2
    proc = subprocess.run(torchrun(out, 29623), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_weights(ref / "checkpoints/last.pt", out / "checkpoints/last.pt")
    assert [r["epoch"] for r in _rows(out)] == [0, 1, 2]


def test_changed_recipe_is_refused_untouched_then_accepted_and_effective(toy_data, tmp_path):
    out = tmp_path / "run"
    assert run_script(fast(toy_data / "imagenet", out, "schedule.epochs=1"), tmp_path).returncode == 0
    before = {p: (out / p).read_bytes() for p in ("config.yaml", "env.json", "metrics.jsonl")}
    changed = fast(toy_data / "imagenet", out, "schedule.epochs=2", "optimizer.weight_decay=0.5",
                   "optimizer.momentum=0", "data.workers=1", "run.print_freq=7")
    proc = run_script(changed, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    for line in ("holds a run of another recipe", "  optimizer.weight_decay: 1e-05 -> 0.5",
                 "  optimizer.momentum: 0.9 -> 0.0", "  schedule.epochs: 1 -> 2", "run.allow_changes=true"):
        assert line in proc.stderr, proc.stderr
    assert "data.workers" not in proc.stderr and "print_freq" not in proc.stderr  # operational keys are free
    assert {p: (out / p).read_bytes() for p in before} == before  # nothing was written
    assert not (out / "checkpoints/epoch_001.pt").exists()

    proc = run_script([*changed, "run.allow_changes=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "optimizer.weight_decay: 1e-05 -> 0.5" in proc.stdout
    groups = torch.load(out / "checkpoints/last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], g["momentum"]) for g in groups] == [(0.5, 0.0)]
    rows = _rows(out)
    change = [r for r in rows if r.get("row") == "recipe change"]
    assert change and change[0]["changes"]["optimizer.weight_decay"] == {"old": 1e-05, "new": 0.5}


def test_another_recipe_or_no_resume_in_a_used_directory_is_refused(toy_data, tmp_path):
    out = tmp_path / "run"
    assert run_script(fast(toy_data / "imagenet", out, "schedule.epochs=1"), tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "run.lock"}
    proc = run_script(fast(toy_data / "imagenet", out, "schedule.epochs=1", "model.width_mult=0.75"), tmp_path)
    assert proc.returncode == 1 and "  model.width_mult: 0.5 -> 0.75" in proc.stderr, proc.stderr
    proc = run_script(fast(toy_data / "imagenet", out, "schedule.epochs=1", "run.resume=null"), tmp_path)
    assert proc.returncode == 1
    assert f"{out} already holds a run (epoch_000.pt); continue it with run.resume=auto" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "run.lock"} == before


def test_truncated_last_pt_falls_back_to_the_newest_intact_epoch(toy_data, tmp_path):
    out = tmp_path / "run"
    assert run_script(fast(toy_data / "imagenet", out, "schedule.epochs=2"), tmp_path).returncode == 0
    last = out / "checkpoints/last.pt"
    last.write_bytes(last.read_bytes()[:5000])  # a hard link: epoch_001.pt is truncated with it
    proc = run_script(fast(toy_data / "imagenet", out, "schedule.epochs=3", "run.allow_changes=true"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: resuming from {out / 'checkpoints/epoch_000.pt'}" in proc.stdout
    assert "continuing at epoch 1" in proc.stdout
    assert [r["epoch"] for r in _rows(out) if "row" not in r] == [0, 1, 2]  # epoch 1 redone, not repeated


def test_exploding_but_finite_loss_stops_the_run(toy_data, tmp_path):
    out = tmp_path / "run"
    proc = run_script(fast(toy_data / "imagenet", out, "schedule.epochs=3", "optimizer.lr=3.0",
                           "optimizer.momentum=0.0"), tmp_path)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "x the starting loss" in proc.stderr and "(run.divergence_factor)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,message,status", [
    ("data.crop_size=0", "command line: data.crop_size: expected a positive size in pixels, got 0", 2),
    ("data.hflip=1.5", "command line: data.hflip: expected a probability in [0, 1], got 1.5", 2),
    ("data.scale=[0.5,0.1]", "command line: data.scale: expected [min, max] with 0 < min <= max <= 1.0", 2),
    ("run.divergence_factor=0.5", "command line: run.divergence_factor: expected a factor > 1", 2),
    ("trian.label_smoothing=0.1", "command line: trian: unknown key (did you mean 'train'?)", 2),
    ("train.accumulate=0", "train.accumulate: expected 'auto' or a count >= 1, got 0", 2),
])
def test_bad_values_are_reported_before_anything_runs(toy_data, tmp_path, override, message, status):
    proc = run_in_process("train_classification.py", fast(toy_data / "imagenet", tmp_path / "run", override),
                          tmp_path)
    assert proc.returncode == status and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_output_directory_that_cannot_be_created(toy_data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_in_process("train_classification.py", fast(toy_data / "imagenet", blocker / "run"), tmp_path)
    assert proc.returncode == 1 and f"run.output_dir: cannot create {blocker / 'run'}" in proc.stderr, proc.stderr


def test_check_data_lists_every_bad_image_and_16_bit_png_is_read(toy_data, tmp_path):
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path / "data"
    shutil.copytree(toy_data / "imagenet", root)
    bad = [root / "val/n00000000_circle/circle_val_0000.jpg", root / "train/n00000001_square/square_train_0003.jpg"]
    bad[0].write_bytes(b"\x00" * 100)
    bad[1].write_bytes(bad[1].read_bytes()[:1000])
    wide = np.random.default_rng(0).integers(0, 65535, (48, 40), dtype=np.uint16)
    Image.fromarray(wide).save(root / "train/n00000001_square/sixteen_bit.png")
    proc = run_in_process("train_classification.py", ["--check-data", *fast(root, tmp_path / "run", "schedule.epochs=1")],
                          tmp_path)
    assert proc.returncode == 1
    assert f"--check-data: 2 of {500 + 1} images cannot be used" in proc.stderr, proc.stderr
    assert f"{bad[0]}: not an image" in proc.stderr and f"{bad[1]}: unreadable or truncated JPEG" in proc.stderr
    assert not (tmp_path / "run/checkpoints").exists()
    from data.classification import decode

    img = decode(str(root / "train/n00000001_square/sixteen_bit.png"))
    assert img.dtype == torch.uint8 and torch.equal(img[0], torch.from_numpy((wide >> 8).astype(np.uint8)))


def test_average_checkpoints_refuses_to_overwrite_an_input_or_a_training_checkpoint(tmp_path):
    import average_checkpoints as avg

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    inputs = [ckpts / "epoch_001.pt", ckpts / "epoch_002.pt"]
    for p in inputs:
        p.write_bytes(b"a training checkpoint")
    before = [p.read_bytes() for p in inputs]
    with pytest.raises(avg.SelectionError, match="is one of the checkpoints being averaged"):
        avg.main(["--inputs", *map(str, inputs), "--out", str(inputs[1])])
    with pytest.raises(avg.SelectionError, match="would overwrite a training checkpoint"):
        avg.main(["--inputs", *map(str, inputs), "--out", str(ckpts / "last.pt")])
    with pytest.raises(avg.SelectionError, match="would overwrite a training checkpoint"):
        avg.main(["--inputs", *map(str, inputs), "--out", str(ckpts / "epoch_007.pt")])
    assert [p.read_bytes() for p in inputs] == before and not (ckpts / "last.pt").exists()
