"""Faults a cluster and a shared file system bring (issue 21), through train_classification.py on the toy
ImageNet: a process-group SIGTERM during validation, two starts on one run directory, a torn metrics.jsonl
line, a disk that fills up during a checkpoint save, the umask, an epoch without an optimizer step, an
eval-only run beside a training run and a dataset that changed size under a mid-epoch checkpoint.
Real processes and signals where the case is about them; refusals run in-process."""

import fcntl
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_in_process, small_disk
from tests.test_run_safety import _rows, _same_weights
from tests.test_train_classification import fast

# Validation at 160 px takes about a second on one thread: long enough to signal it while it runs.
SLOW_VAL = ("data.val_resize=160", "data.val_crop=160", "data.workers=1", "schedule.epochs=2")


def _popen(args, cwd):
    """A script in its own session (its own process group), as srun starts a step."""
    return subprocess.Popen([sys.executable, str(ROOT / "train_classification.py"), *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _until(proc: subprocess.Popen, marker: str, timeout: float = 240) -> list[str]:
    """stdout lines up to the first one containing marker."""
    lines, deadline = [], time.time() + timeout
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return lines
        assert time.time() < deadline, f"no {marker!r} line in time"
    raise AssertionError(f"the run ended before {marker!r}: {''.join(lines)[-2000:]} {proc.stderr.read()[-3000:]}")


def _wait_group(pgid: int, n: int, timeout: float = 60) -> None:
    """Until the process group has n processes (the main process and its loader workers)."""
    deadline = time.time() + timeout
    while True:
        members = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            members += int(fields[2]) == pgid and fields[0] != "Z"
        if members >= n:
            return
        assert time.time() < deadline, f"the process group never had {n} processes"
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[str, str]:
    try:  # the pipes' rest (read after the lines _until took: communicate() would skip what is buffered)
        proc.wait(timeout=timeout)
        return proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def finished_run(toy_data, tmp_path_factory) -> Path:
    """A finished 2-epoch run (in-process); tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    proc = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, "schedule.epochs=2"), out.parent)
    assert proc.returncode == 0, proc.stderr
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, copy_function=shutil.copy)  # no hard links shared with the fixture
    return dst


# ============================================================================ signals during validation


def test_sigterm_to_the_process_group_during_validation_keeps_the_epoch(toy_data, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "stopped"
    proc = _popen(fast(toy_data / "imagenet", out, *SLOW_VAL), tmp_path)
    _until(proc, "epoch 0: 13 optimizer steps done; evaluating")
    _wait_group(proc.pid, 3)  # the validation loader's worker has started, beside the training loader's
    os.killpg(proc.pid, signal.SIGTERM)  # scancel / preemption: the main process and its loader workers
    stdout, stderr = _finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM at the end of epoch 0 (after its evaluation)" in stdout and "Traceback" not in stderr, stderr
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["position"] == {"epoch": 1, "micro": 0}
    assert (out / "checkpoints/epoch_000.pt").samefile(out / "checkpoints/last.pt")
    assert [r["epoch"] for r in _rows(out)] == [0]  # the epoch's row, after its checkpoint

    resumed = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, *SLOW_VAL), tmp_path)
    assert resumed.returncode == 0 and "continuing at epoch 1" in resumed.stdout, resumed.stderr
    uninterrupted = run_in_process("train_classification.py", fast(toy_data / "imagenet", ref, *SLOW_VAL), tmp_path)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    _same_weights(ref / "checkpoints/last.pt", out / "checkpoints/last.pt")
    assert [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait")} for r in _rows(out)] == \
        [{k: v for k, v in r.items() if k not in ("images_per_s", "data_wait")} for r in _rows(ref)]


def test_detection_sigterm_to_the_process_group_during_validation_keeps_the_epoch(toy_data, tmp_path):
    out = tmp_path / "run"
    args = ["--recipe", ROOT / "recipes/toy/detection.yaml", f"data.root={toy_data / 'coco'}",
            f"run.output_dir={out}", "model.backbone_weights=null", "model.min_size=128", "model.max_size=160",
            "model.box_batch_size_per_image=32", "model.rpn_pre_nms_top_n_test=50", "model.rpn_post_nms_top_n_test=50",
            "data.batch_size=4", "data.workers=1", "schedule.epochs=1", "train.draw_images=0"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_detection.py"), *map(str, args)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _until(proc, "epoch 0: 5 optimizer steps done; evaluating")
    _wait_group(proc.pid, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = _finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM at the end of epoch 0 (after its evaluation)" in stdout
    assert (out / "checkpoints/epoch_000.pt").samefile(out / "checkpoints/last.pt")
    assert [r["epoch"] for r in _rows(out)] == [0] and (out / "detections/epoch_000.json").is_file()
    resumed = run_in_process("train_detection.py", args, tmp_path)  # nothing left to train: the report
    assert resumed.returncode == 0 and "all 1 epochs are done" in resumed.stdout, resumed.stderr
    assert (out / "report.md").is_file()


def test_every_loader_of_every_script_takes_the_signal_policy(toy_data):
    from engine import distributed, preemption
    from engine.config import load_config
    import train_classification as tc
    import train_detection as td
    import train_segmentation as ts
    from data.classification import build_loaders

    dist = distributed.DistState()
    cfg = load_config(tc.Config, ROOT / "recipes/toy/classification.yaml", [f"data.root={toy_data / 'imagenet'}"])
    loaders = build_loaders(cfg.data, 10, 0, dist)[1::2]
    for module, recipe, root in ((td, "detection.yaml", "coco"), (ts, "segmentation.yaml", "coco")):
        cfg = load_config(module.Config, ROOT / "recipes/toy" / recipe,
                          [f"data.root={toy_data / root}", "data.workers=1"])
        loaders += module.build_data(cfg, dist)[1::2]
    assert len(loaders) == 6 and all(ld.num_workers == 1 for ld in loaders)
    assert all(ld.worker_init_fn is preemption.ignore_in_worker and preemption.covers(ld) for ld in loaders)
    with pytest.raises(TypeError, match="sets worker_init_fn itself"):
        preemption.data_loader(range(3), worker_init_fn=print)


# ============================================================================ one run per directory


def test_a_second_start_on_a_running_directory_is_refused_naming_the_holder(toy_data, tmp_path):
    out = tmp_path / "run"
    first = _popen(fast(toy_data / "imagenet", out, *SLOW_VAL), tmp_path)
    try:
        _until(first, "optimizer steps done")  # running, past its start
        second = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, *SLOW_VAL,
                                                                "run.resume=auto"), tmp_path)
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert f"{out} is in use by another run (host {platform.node()}, pid {first.pid};" in second.stderr, \
            second.stderr
        os.kill(first.pid, signal.SIGKILL)  # the main process dies without cleaning up; its loader workers
        first.wait(timeout=60)               # live on a few seconds: the lock must not live with them
        # the lock of a dead run is not stale: the next start gets past it (and is refused for the recipe)
        again = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, *SLOW_VAL,
                                                               "run.resume=auto", "optimizer.lr=0.5"), tmp_path)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
    assert again.returncode == 1 and "holds a run of another recipe" in again.stderr, again.stderr
    assert (out / "run.lock").read_text().strip() == f"host {platform.node()}, pid {os.getpid()}"


@pytest.mark.slow
def test_every_rank_stops_when_rank_0_finds_the_directory_locked(toy_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "run.lock", "w") as holder:  # another run's lock, held by this process
        fcntl.lockf(holder, fcntl.LOCK_EX)
        holder.write("host elsewhere, pid 4242\n")
        holder.flush()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                               "--master_port=29631", str(ROOT / "train_classification.py"),
                               *fast(toy_data / "imagenet", out)], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("is in use by another run (host elsewhere, pid 4242;") == 2, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


# ============================================================================ metrics.jsonl


def test_a_torn_last_metrics_line_is_dropped_and_its_row_restored_on_resume(toy_data, finished_run, tmp_path):

    out = _copy(finished_run, tmp_path / "run")
    rows = _rows(out)
    line = json.dumps(rows[1])
    # killed while appending epoch 1's row, after its checkpoint: a prefix of the line, no newline
    (out / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n" + line[:len(line) // 2])
    proc = run_in_process("average_checkpoints.py", ["--run", out, "--select", "last:1", "--out",
                                                     tmp_path / "avg.pt"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {out / 'metrics.jsonl'}: line 2 is incomplete" in proc.stderr
    assert "epoch    0" in proc.stdout  # the torn row is not selected

    proc = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, "schedule.epochs=3",
                                                          "run.resume=auto", "run.allow_changes=true"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"warning: {out / 'metrics.jsonl'}: line 2 is incomplete" in proc.stderr
    resumed = _rows(out)
    assert [r["epoch"] for r in resumed if "row" not in r] == [0, 1, 2]
    assert resumed[1] == rows[1]  # the row the kill tore, written again from epoch 1's checkpoint

    text = (out / "metrics.jsonl").read_text().splitlines()
    text[1] = text[1][:20]  # a malformed line that is not the last: an error naming file and line
    (out / "metrics.jsonl").write_text("\n".join(text) + "\n")
    proc = run_in_process("average_checkpoints.py", ["--run", out, "--select", "last:1", "--out",
                                                     tmp_path / "avg2.pt"], tmp_path)
    assert proc.returncode == 1 and f"{out / 'metrics.jsonl'}: line 2 is not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "avg2.pt").exists()


# ============================================================================ disk full, file modes


def test_disk_full_during_a_checkpoint_save_is_one_message(toy_data, tmp_path):
    # 8 MiB: the run's files and one checkpoint (about 5 MB; last.pt is a hard link) fit, a second does not
    with small_disk(tmp_path, "8m") as disk:
        out = disk / "run"
        proc = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, "schedule.epochs=3"),
                              tmp_path)
        last = out / "checkpoints/last.pt"
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"train_classification.py: error: no space left on device while writing "
            f"{out / 'checkpoints/epoch_001.pt'}; the previous checkpoint {last} is intact"]
        assert torch.load(last, weights_only=True)["epoch"] == 0
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_000.pt", "last.pt"]  # no .tmp
        assert [r["epoch"] for r in _rows(out)] == [0]  # epoch 1's row waits for its checkpoint


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_get_the_mode_of_the_umask(toy_data, finished_run, tmp_path, umask):
    out = _copy(finished_run, tmp_path / "run")
    old = os.umask(umask)
    try:  # one more epoch: metrics.jsonl is rewritten on resume, every other file written anew
        proc = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, "schedule.epochs=3",
                                                              "run.resume=auto", "run.allow_changes=true"), tmp_path)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr
    for name in ("config.yaml", "env.json", "report.md", "metrics.jsonl", "checkpoints/epoch_002.pt",
                 "checkpoints/last.pt"):
        assert oct((out / name).stat().st_mode & 0o777) == oct(0o666 & ~umask), name


# ============================================================================ refusals and choices


@pytest.mark.parametrize("script,root,extra,images", [
    ("train_detection.py", "coco", "data.batch_size=32", 22),
    ("train_segmentation.py", "coco", "data.batch_size=32", 22),
])
def test_an_epoch_without_an_optimizer_step_is_exit_2_before_any_write(toy_data, tmp_path, script, root, extra,
                                                                       images):
    out = tmp_path / "run"
    recipe = ROOT / "recipes/toy" / script.removeprefix("train_").replace(".py", ".yaml")
    proc = run_in_process(script, ["--recipe", recipe, f"data.root={toy_data / root}", f"run.output_dir={out}",
                                   "model.backbone_weights=null", "data.workers=0", extra], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"data.batch_size=32: {images} usable training images over 1 process give no batch per process" \
        in proc.stderr, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


def test_eval_only_into_a_training_run_leaves_its_report(toy_data, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "run.lock"}
    proc = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, "run.eval_only=true",
                                                          f"model.weights={out / 'checkpoints/epoch_000.pt'}"),
                          tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"{out} holds a training run: this evaluation is written to {out / 'eval'}" in proc.stdout
    assert {p: p.read_bytes() for p in before} == before
    ev = json.loads((out / "eval/eval.json").read_text())
    assert ev["acc1"] == _rows(out)[0]["acc1"]  # epoch 0's weights give epoch 0's accuracy
    assert (out / "eval/report.md").exists()


def test_mid_epoch_resume_on_a_dataset_of_another_size_is_refused(toy_data, finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    last = out / "checkpoints/last.pt"
    state = torch.load(last, weights_only=True)  # made a mid-epoch checkpoint of epoch 2, step 3
    state.update(position={"epoch": 2, "micro": 3}, epoch_lr=0.002, train_images=390,
                 epoch_sums={"loss": torch.tensor(6.9, dtype=torch.float64),
                             "micro": torch.tensor(3.0, dtype=torch.float64)})
    last.unlink()
    torch.save(state, last)
    proc = run_in_process("train_classification.py", fast(toy_data / "imagenet", out, "schedule.epochs=3",
                                                          "run.resume=auto", "run.allow_changes=true"), tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"{last} stopped in the middle of epoch 2 with 390 training images, but the dataset now has 400"
            in proc.stderr), proc.stderr
