"""train_classification.py end to end on the toy ImageNet, on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torchvision

from engine.config import load_config
from tests.conftest import ROOT, run_in_process

import train_classification as tc

RECIPE = ROOT / "recipes/toy/classification.yaml"


def fast(data_root, out, *extra):
    """The toy recipe made smaller still: Small at 32 px, 3 epochs, a few seconds."""
    return ["--recipe", str(RECIPE), f"data.root={data_root}", f"run.output_dir={out}",
            "model.name=mobilenet_v3_small", "model.width_mult=0.5", "data.crop_size=32", "data.val_resize=36",
            "data.val_crop=32", "data.workers=0", "schedule.epochs=3", "run.print_freq=100", *extra]


def run_script(args, cwd, timeout=300, **popen):
    return subprocess.run([sys.executable, str(ROOT / "train_classification.py"), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout, **popen)


def test_run_directory_contract(toy_data, tmp_path):
    out = tmp_path / "run"
    proc = run_script(fast(toy_data / "imagenet", out), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "rmsprop: tf_eps 0.001 -> torch eps sqrt(tf_eps) = 0.0316228" in proc.stdout
    cfg = load_config(tc.Config, out / "config.yaml")  # the resolved config loads back
    assert cfg == load_config(tc.Config, RECIPE, fast(toy_data / "imagenet", out)[2:])
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["world_size"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert {"acc1", "acc5", "train_loss", "lr", "images_per_s", "data_wait"} <= set(rows[0])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch_000.pt", "epoch_001.pt",
                                                                       "epoch_002.pt", "last.pt"]
    assert list((out / "tensorboard").iterdir())
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 2 and "optimizer" in state and len(state["rng"]) == 1
    ref = torchvision.models.mobilenet_v3_small(num_classes=10, width_mult=0.5)
    ref.load_state_dict(state["model"], strict=True)  # torchvision's key layout


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.slow
def test_sigkill_then_resume_with_accumulation_is_bit_identical(toy_data, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    extra = ("schedule.epochs=4", "model.stochastic_depth=0.1", "data.workers=1", "train.accumulate=2")
    assert run_script(fast(toy_data / "imagenet", ref_out, *extra), tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_classification.py"),
                             *fast(toy_data / "imagenet", out, *extra)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "epoch_000.pt"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = int(torch.load(out / "checkpoints/last.pt", weights_only=True)["epoch"])
    assert done < 3, "the run finished before it could be killed"
    resumed = run_script(fast(toy_data / "imagenet", out, *extra), tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints/last.pt'} (epoch {done} done); continuing at epoch {done + 1}" \
        in resumed.stdout
    a, b = _weights(ref_out / "checkpoints/last.pt"), _weights(out / "checkpoints/last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3]


def test_eval_only_prints_published_numbers(toy_data, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(torchvision.models.mobilenet_v3_small(num_classes=10, width_mult=0.5).state_dict(), weights)
    proc = run_script(fast(toy_data / "imagenet", tmp_path / "e", "run.eval_only=true", f"model.weights={weights}",
                           "expected.acc1=67.668"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Acc@1" in proc.stdout and "(published 67.668)" in proc.stdout and "100 images" in proc.stdout


def _copy_tree(src: Path, dst: Path):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,message", [
    ("missing_root", "data.root: {root} does not exist"),
    ("missing_split", "{root}/val: split folder not found"),
    ("empty_class", "{root}/train/n00000003_hstripes: class folder has no images"),
    ("truncated", "{root}/train/n00000000_circle/circle_train_0000.jpg: unreadable or truncated JPEG image "
                  "(Image is incomplete or truncated)"),
    ("garbage", "{root}/train/n00000000_circle/circle_train_0000.jpg: not an image (the file starts with bytes "
                "00 00 00 00 00 00 00 00, not a JPEG, PNG, WebP or GIF signature)"),
])
def test_bad_data_is_a_clear_error(toy_data, tmp_path, damage, message):
    root = tmp_path / "data"
    if damage != "missing_root":
        _copy_tree(toy_data / "imagenet", root)
    victim = root / "train/n00000000_circle/circle_train_0000.jpg"
    if damage == "missing_split":
        import shutil

        shutil.rmtree(root / "val")
    elif damage == "empty_class":
        for f in (root / "train/n00000003_hstripes").iterdir():
            f.unlink()
    elif damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:2000])
    elif damage == "garbage":
        victim.write_bytes(b"\x00" * 300)
    args = fast(root, tmp_path / "run", "data.workers=1", "schedule.epochs=1")
    if damage in ("truncated", "garbage"):  # found mid-epoch in a loader worker: the real process's exit path
        proc = run_script(args, tmp_path)
    else:  # refused before anything runs
        proc = run_in_process("train_classification.py", args, tmp_path)
    assert proc.returncode == 1
    assert message.format(root=root) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _animated_gif(path: Path) -> None:
    from PIL import Image

    frames = [Image.new("RGB", (80, 60), (60 * i, 90, 0)) for i in range(3)]
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:])


def test_bad_val_images_are_found_before_training(toy_data, tmp_path):
    """A truncated val JPEG and an animated GIF named .jpg: refused at start (header and end read), not
    after a training epoch that is then lost."""
    root = _copy_tree(toy_data / "imagenet", tmp_path / "data")
    truncated = root / "val/n00000002_triangle/triangle_val_0004.jpg"
    gif = root / "val/n00000005_checker/moving.jpg"
    truncated.write_bytes(truncated.read_bytes()[:1500])
    _animated_gif(gif)
    proc = run_in_process("train_classification.py", fast(root, tmp_path / "run", "schedule.epochs=1"),
                          tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr == (
        f"train_classification.py: error: the validation set: 2 of 101 images cannot be used:\n"
        f"  {truncated}: unreadable or truncated JPEG image (Image is incomplete or truncated)\n"
        f"  {gif}: an animated GIF of 3 frames; expected a still image (save one frame as a JPEG or PNG)\n")
    assert "epoch 0" not in proc.stdout and not (tmp_path / "run/checkpoints").exists()


def test_check_data_refuses_an_animated_gif_named_jpg(toy_data, tmp_path):
    root = _copy_tree(toy_data / "imagenet", tmp_path / "data")
    gif = root / "train/n00000001_square/moving.jpg"
    _animated_gif(gif)
    proc = run_in_process("train_classification.py",
                          ["--check-data", *fast(root, tmp_path / "run", "schedule.epochs=1")], tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"--check-data: 1 of 501 images cannot be used:\n  {gif}: an animated GIF of 3 frames" \
        in proc.stderr, proc.stderr[-2000:]


def test_train_and_val_class_folders_that_differ_are_named(toy_data, tmp_path):
    root = _copy_tree(toy_data / "imagenet", tmp_path / "data")
    (root / "val/n00000009_diamond").rename(root / "val/n00000009_rhombus")
    proc = run_in_process("train_classification.py", fast(root, tmp_path / "run"), tmp_path)
    assert proc.returncode == 1
    assert (f"{root}: train/ and val/ have different class folders (labels are the sorted folder names, so "
            "they must be the same): only in train/: n00000009_diamond; only in val/: n00000009_rhombus") \
        in proc.stderr, proc.stderr


def test_a_last_batch_of_one_image_that_batchnorm_cannot_train_is_refused(toy_data, tmp_path):
    """13 images in batches of 3: the last batch of each epoch holds 1 image, which torchvision's reference
    keeps (no drop_last) and which MobileNetV3 at 32 px cannot train on (BatchNorm over a 1 x 1 map)."""
    root = _copy_tree(toy_data / "imagenet", tmp_path / "data")
    for k, folder in enumerate(sorted((root / "train").iterdir())):
        for image in sorted(folder.iterdir())[1 + (k < 3):]:
            image.unlink()
    proc = run_in_process("train_classification.py", fast(root, tmp_path / "run", "data.batch_size=3"),
                          tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"error: {root / 'train'}: 13 images over 1 process(es) in batches of data.batch_size 3 leave a "
            "last batch of 1 image per process each epoch, and the model cannot train on one image (its "
            "BatchNorm needs more than one value per channel: Expected more than 1 value per channel when "
            "training") in proc.stderr, proc.stderr
    assert proc.stderr.rstrip().endswith("choose a data.batch_size that leaves no short batch or one of 2 or "
                                         "more images")
    assert not (tmp_path / "run/checkpoints").exists()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(toy_data, tmp_path):
    out = tmp_path / "run"
    assert run_script(fast(toy_data / "imagenet", out, "schedule.epochs=1"), tmp_path).returncode == 0
    before = (out / "checkpoints/last.pt").read_bytes()
    proc = run_script(fast(toy_data / "imagenet", out, "schedule.epochs=2", "optimizer.lr=1e30",
                           "run.resume=auto", "run.allow_changes=true"), tmp_path)
    assert proc.returncode == 1
    assert "training loss is not finite or above 10 x the starting loss" in proc.stderr, proc.stderr
    assert "at epoch 1, step 1: stopping" in proc.stderr, proc.stderr
    assert f"the last good checkpoint {out / 'checkpoints/last.pt'} is intact" in proc.stderr
    assert (out / "checkpoints/last.pt").read_bytes() == before
    assert "  optimizer.lr: 0.002 -> 1e+30" in proc.stdout and "  schedule.epochs: 1 -> 2" in proc.stdout
    assert not (out / "checkpoints/epoch_001.pt").exists()


@pytest.mark.slow
def test_torchrun_two_processes_gloo_counts_each_val_image_once(toy_data, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29611",
                           str(ROOT / "train_classification.py"), *fast(toy_data / "imagenet", out,
                                                                        "schedule.epochs=1")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["val_images"] == 100  # 100 images over 2 ranks: no padded duplicates
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert len(state["rng"]) == 2 and json.loads((out / "env.json").read_text())["world_size"] == 2


def test_derived_values():
    cfg = load_config(tc.Config, ROOT / "recipes/large.yaml")
    d = tc.derived(cfg, world_size=8, n_train=1_281_167)
    assert d["global_batch"] == 1024 and d["accumulate"] == 1 and d["optimizer_steps_per_epoch"] == 1252
    assert abs(d["torch_rmsprop_eps"] - 0.0316) < 1e-4
    one = tc.derived(cfg, world_size=1, n_train=1_281_167)  # one GPU: 8 micro-batches of 128 per step
    assert (one["accumulate"], one["global_batch"], one["optimizer_steps_per_epoch"], one["lr"]) == (8, 1024, 1252,
                                                                                                     0.064)


def test_ema_evaluated_beside_raw_model_and_bf16_autocast(toy_data, tmp_path):
    out = tmp_path / "ema"
    proc = run_script(fast(toy_data / "imagenet", out, "schedule.epochs=1", "train.ema_decay=0.9",
                           "train.amp=bf16", "run.global_batch=64", "train.accumulate=1"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ("warning: global batch 32 = 1 processes x 32 images x 1 accumulation steps, but the recipe was tuned "
            "for a global batch of 64 on an unstated process count; lr not scaled (optimizer.lr_scaling=none)") in proc.stdout
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"acc1_ema", "acc5_ema"} <= set(row)
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert state["model_ema"].keys() == state["model"].keys()
    assert not torch.equal(state["model_ema"]["classifier.3.weight"], state["model"]["classifier.3.weight"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_amp_channels_last_smoke(toy_data, tmp_path):
    proc = run_script(fast(toy_data / "imagenet", tmp_path / "cuda", "schedule.epochs=1", "run.device=cuda",
                           "train.amp=fp16"), tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_print_config_shows_the_published_global_batch_on_one_process(tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        for launcher_var in ("WORLD_SIZE", "RANK", "SLURM_NTASKS", "SLURM_PROCID"):
            mp.delenv(launcher_var, raising=False)
        proc = run_in_process("train_classification.py",
                              ["--recipe", ROOT / "recipes/large.yaml", "--print-config"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    derived = proc.stdout.split("# derived", 1)[1]
    for line in ("processes: 1", "batch_per_process: 128", "accumulate: 8", "global_batch: 1024",
                 "recipe_global_batch: 1024", "lr: 0.064"):
        assert f"  {line}\n" in derived, derived
