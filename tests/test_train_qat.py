"""train_qat.py and models/quantize.py on the toy ImageNet, on CPU.

Oracles: torchvision's own quantizable MobileNetV3-Large (fusion, QAT preparation, conversion of our
checkpoint), torchvision's reference QAT loop transcribed below (the per-epoch observer/BN phase),
an uninterrupted run (SIGKILL resume), and a fresh process (the int8 export).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.ao import quantization as tq
from torch.ao.nn.intrinsic import qat as nniqat
from torchvision.models.quantization import mobilenet_v3_large as tv_quantizable

from engine.config import load_config
from models import build, quantize
from tests.conftest import ROOT

import train_qat as tq_script

pytestmark = pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning")
RECIPE = ROOT / "recipes/toy/qat.yaml"
BACKEND = "qnnpack"


def args(data_root, weights, out, *extra):
    """The toy recipe made smaller: 3 epochs, observers and BN statistics updating in epoch 0 only."""
    return ["--recipe", str(RECIPE), f"data.root={data_root}", f"model.weights={weights}", f"run.output_dir={out}",
            "data.workers=0", "schedule.epochs=3", "qat.num_observer_update_epochs=0",
            "qat.num_batch_norm_update_epochs=0", "run.print_freq=100", *extra]


def run_script(argv, cwd, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train_qat.py"), *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def state(path: Path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def small_data(toy_data, tmp_path_factory) -> Path:
    """The toy ImageNet with 8 training images per class (3 batches an epoch), all 100 val images."""
    root = tmp_path_factory.mktemp("qat_data") / "imagenet"
    shutil.copytree(toy_data / "imagenet" / "val", root / "val")
    for cls in sorted((toy_data / "imagenet" / "train").iterdir()):
        (root / "train" / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:8]:
            shutil.copy(f, root / "train" / cls.name / f.name)
    return root


@pytest.fixture(scope="module")
def float_weights(toy_backbone, toy_data, tmp_path_factory) -> Path:
    """toy_backbone trained 2 epochs more (4 in all): its predictions depend on the image (after 2 epochs
    every image gets nearly the same logits, which would make the int8 checks below degenerate)."""
    out = tmp_path_factory.mktemp("qat_float") / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train_classification.py"), "--recipe",
                           str(ROOT / "recipes/toy/classification.yaml"), f"data.root={toy_data / 'imagenet'}",
                           f"run.output_dir={out}", f"model.weights={toy_backbone}", "schedule.epochs=2",
                           "data.workers=0", "run.print_freq=1000"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def reference_run(small_data, float_weights, tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch toy QAT run (the oracle of the resume test, the subject of the others)."""
    out = tmp_path_factory.mktemp("qat_ref") / "run"
    proc = run_script(args(small_data, float_weights, out), out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


# ============================================================================ mechanics (no training run)


def test_phase_is_torchvision_reference_loop_without_its_resume_quirk():
    """torchvision's loop: enable observers; for each epoch: train, then `if epoch >= N_obs: disable_observer`,
    `if epoch >= N_bn: freeze_bn_stats`. Transcribed here; the phase of each epoch must equal it."""
    for n_obs, n_bn, epochs in ((4, 3, 90), (0, 0, 3), (2, 5, 4)):
        observers, bn = True, True
        for epoch in range(epochs):
            assert quantize.phase(epoch, n_obs, n_bn) == quantize.Phase(observers, bn), (n_obs, n_bn, epoch)
            if epoch >= n_obs:
                observers = False
            if epoch >= n_bn:
                bn = False
    published = [quantize.phase(e, 4, 3) for e in range(90)]
    assert [e for e, p in enumerate(published) if p.observers] == [0, 1, 2, 3, 4]
    assert [e for e, p in enumerate(published) if p.bn_stats] == [0, 1, 2, 3]


def _prepared(model, backend=BACKEND):
    model.train()
    model.fuse_model(is_qat=True)
    model.qconfig = tq.get_default_qat_qconfig(backend)
    tq.prepare_qat(model, inplace=True)
    return model


def test_fusion_and_preparation_match_torchvision():
    ours = quantize.prepare_qat(build("quantizable_mobilenet_v3_large", num_classes=10), BACKEND)
    ref = _prepared(tv_quantizable(num_classes=10))
    types = lambda m: [(n, type(x).__name__) for n, x in m.named_modules()]  # noqa: E731
    assert types(ours) == types(ref)
    kinds = [t for _, t in types(ours)]
    # Conv+BN: stem, 14 expansions, 15 depthwise, 15 projections, last conv; the ReLU blocks' expansion and
    # depthwise convs (5 + 6) fuse their ReLU too; the 8 SE blocks fuse fc1+ReLU (no BN).
    assert (kinds.count("ConvBn2d"), kinds.count("ConvBnReLU2d"), kinds.count("ConvReLU2d")) == (35, 11, 8)
    names = dict(ours.named_modules())
    bn_parents = [names[n.rsplit(".", 1)[0]] for n, m in names.items() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn_parents) == 46 and all(isinstance(p, nniqat.ConvBn2d) for p in bn_parents)
    assert kinds.count("FloatFunctional") == 15 + 8  # every block's residual add (10 used), 8 SE multiplies
    ptq = quantize.prepare_ptq(build("quantizable_mobilenet_v3_large", num_classes=10), BACKEND)
    ref_ptq = tv_quantizable(num_classes=10).eval()
    ref_ptq.fuse_model(is_qat=False)
    ref_ptq.qconfig = tq.get_default_qconfig(BACKEND)
    tq.prepare(ref_ptq, inplace=True)
    assert types(ptq) == types(ref_ptq)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ptq.modules())  # folded into the convs


def test_set_phase_freezes_observers_and_bn_statistics():
    torch.manual_seed(0)
    model = quantize.prepare_qat(build("quantizable_mobilenet_v3_large", num_classes=10), BACKEND)
    model(torch.randn(2, 3, 32, 32))  # the first forward initialises the ranges

    def snapshot():
        sd = model.state_dict()
        return {k: v.clone() for k, v in sd.items() if k.endswith(("min_val", "max_val", "running_mean"))}

    for observers, bn in ((False, False), (True, False), (False, True), (True, True)):
        quantize.set_phase(model, quantize.Phase(observers, bn))
        model.train()
        before = snapshot()
        model(torch.randn(2, 3, 32, 32) * 3)
        after = snapshot()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.endswith(("min_val", "max_val")) for k in moved) == observers, (observers, bn)
        assert any(k.endswith("running_mean") for k in moved) == bn, (observers, bn)
        assert quantize.observer_flags(model) == {int(observers)}
        assert quantize.bn_frozen_flags(model) == {not bn}
    with quantize.observers_frozen(model):  # evaluation leaves the observers alone and restores the flags
        model.eval()
        before = snapshot()
        model(torch.randn(2, 3, 32, 32) * 5)
        assert all(torch.equal(before[k], v) for k, v in snapshot().items())
    assert quantize.observer_flags(model) == {1}


def _val_images(data_root, n=32):
    cfg = load_config(tq_script.Config, RECIPE, [f"data.root={data_root}", "data.workers=0"])
    _, _, _, val_loader = tq_script.build_loaders(cfg.data, cfg.model.num_classes, cfg.run.seed, tq_script.distributed.DistState(), train=False)
    cpu_tf = tq_script.BatchTransform(cfg.data.mean, cfg.data.std, False)
    return torch.cat([cpu_tf(b) for b, _ in val_loader])[:n]


def test_int8_model_reloads_exactly_from_the_export_and_from_a_rebuild(float_weights, small_data, tmp_path):
    """torchvision#5890: in 2021 a serialized int8 MobileNetV3 reloaded at random accuracy (one cause:
    quantized Hardswish kept its output scale/zero-point out of the state dict, pytorch#91877). The
    export needs no rebuild; a rebuild from the int8 state dict must give the same logits too, or the
    README's statement about the pinned torch is wrong."""
    images = _val_images(small_data)
    model = build("quantizable_mobilenet_v3_large", num_classes=10)
    model.load_state_dict(state(float_weights))
    with torch.no_grad():  # spread the logits: how much the toy model's differ between images depends on the
        model.classifier[-1].weight.mul_(20.0)  # CPU it trained on (std 0.05 on an AVX2-only EPYC)
    quantize.prepare_ptq(model, BACKEND)
    quantize.calibrate(model, [images[:16], images[16:]])
    int8 = quantize.convert_int8(model, BACKEND)
    with quantize.engine(BACKEND), torch.no_grad():
        expected = int8(images)
        assert expected.std(0).max() > 0.1  # outputs differ from image to image: not a degenerate check
        quantize.export_int8(int8, tmp_path, BACKEND, 64)
        loaded, meta = quantize.load_int8(tmp_path)
        assert meta["backend"] == BACKEND and torch.equal(loaded(images), expected)
        rebuilt = quantize.prepare_ptq(build("quantizable_mobilenet_v3_large", num_classes=10), BACKEND)
        quantize.calibrate(rebuilt, [images[:2] * 0.1])  # other ranges than the saved model's
        rebuilt = quantize.convert_int8(rebuilt, BACKEND)
        rebuilt.load_state_dict(int8.state_dict())
        assert "features.0.2.scale" in int8.state_dict()  # Hardswish's output qparams (pytorch#91877, fixed)
        assert torch.equal(rebuilt(images), expected)


# ============================================================================ runs


def test_qat_run_contract_torchvision_conversion_and_export_in_a_fresh_process(reference_run, small_data, tmp_path):
    out = reference_run
    cfg = load_config(tq_script.Config, out / "config.yaml")  # the resolved config loads back
    assert cfg.qat.backend == BACKEND and cfg.schedule.epochs == 3
    r = rows(out)
    assert [x["epoch"] for x in r] == [0, 1, 2]
    assert [(x["observers"], x["bn_stats"]) for x in r] == [(1, 1), (0, 0), (0, 0)]
    for x in r:
        assert {"acc1", "acc5", "int8_acc1", "int8_acc5", "train_loss", "lr"} <= set(x)
    assert r[-1]["int8_acc1"] > 20, r  # 10 classes: well above chance from the toy float checkpoint
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "tensorboard")).Reload().Tags()["scalars"]
    assert {"acc1", "int8_acc1", "int8_acc5"} <= set(tags)

    # torchvision's quantizable model takes the checkpoint after fuse + prepare_qat, converts to the same int8 model
    qat_state = state(out / "checkpoints/last.pt")
    ref = _prepared(tv_quantizable(num_classes=10))
    ref.load_state_dict(qat_state, strict=True)
    with quantize.engine(BACKEND):
        ref_int8 = tq.convert(ref.eval(), inplace=False)
        cfg_eval = load_config(tq_script.Config, RECIPE, [f"data.root={small_data}", "data.workers=0"])
        dist = tq_script.distributed.DistState()
        _, _, _, val_loader = tq_script.build_loaders(cfg_eval.data, cfg_eval.model.num_classes, cfg_eval.run.seed, dist, train=False)
        cpu_tf = tq_script.BatchTransform(cfg_eval.data.mean, cfg_eval.data.std, False)
        acc = tq_script.evaluate(ref_int8, val_loader, cpu_tf, torch.device("cpu"), dist)
        assert acc["acc1"] == r[-1]["int8_acc1"] and acc["acc5"] == r[-1]["int8_acc5"]
        exported, _ = quantize.load_int8(out / "export")
        images = torch.cat([cpu_tf(b) for b, _ in val_loader])
        with torch.no_grad():
            assert torch.equal(exported(images), ref_int8(images))  # the export is that int8 model

    # a fresh process evaluates the export to the logged int8 accuracy
    proc = run_script(args(small_data, out / "export", tmp_path / "eval", "run.eval_only=true"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert (ev["int8_acc1"], ev["int8_acc5"]) == (r[-1]["int8_acc1"], r[-1]["int8_acc5"])
    assert "int8 export (qnnpack, TorchScript)" in proc.stdout


@pytest.mark.slow
def test_sigkill_resume_is_exact_and_keeps_observers_and_bn_frozen(reference_run, small_data, float_weights, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_qat.py"), *args(small_data, float_weights, out)],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "epoch_000.pt"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = int(torch.load(first, weights_only=True)["epoch"])
    assert done == 0 and not (out / "checkpoints/epoch_002.pt").exists(), "the run finished before the kill"
    resumed = run_script(args(small_data, float_weights, out), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing at epoch" in resumed.stdout
    # bit-identical to the uninterrupted run: weights, BN statistics, observer ranges and flags
    a, b = state(reference_run / "checkpoints/last.pt"), state(out / "checkpoints/last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [(x["observers"], x["bn_stats"]) for x in rows(out)] == [(1, 1), (0, 0), (0, 0)]
    # frozen after epoch 0 (the reference's resume would have re-enabled both for epoch 1): observer
    # ranges and BN statistics of every later checkpoint are epoch 0's, while the weights moved
    s0, s1, s2 = (state(out / f"checkpoints/epoch_{e:03d}.pt") for e in range(3))
    frozen = [k for k in s0 if k.endswith(("min_val", "max_val", "running_mean", "running_var"))]
    assert len(frozen) > 100 and all(torch.equal(s0[k], s1[k]) and torch.equal(s1[k], s2[k]) for k in frozen)
    assert not torch.equal(s0["classifier.3.weight"], s2["classifier.3.weight"])
    flags = [k for k in s2 if k.endswith("observer_enabled")]
    assert flags and all(int(s2[k][0]) == 0 for k in flags)


def test_post_training_quantization(small_data, float_weights, tmp_path):
    out = tmp_path / "ptq"
    proc = run_script(args(small_data, float_weights, out, "qat.mode=ptq", "qat.calibration_batches=2"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["calibration_images"] == 64 and ev["val_images"] == 100
    # oracle: torchvision's PTQ procedure on the same float weights and the same 64 calibration images
    cfg = load_config(tq_script.Config, RECIPE, args(small_data, float_weights, out, "qat.mode=ptq",
                                                        "qat.calibration_batches=2")[2:])
    dist = tq_script.distributed.DistState()
    train_set, _, _, val_loader = tq_script.build_loaders(cfg.data, cfg.model.num_classes, cfg.run.seed, dist)
    cpu_tf = tq_script.BatchTransform(cfg.data.mean, cfg.data.std, False)
    ref = tv_quantizable(num_classes=10)
    ref.load_state_dict(state(float_weights))
    ref.eval().fuse_model(is_qat=False)
    ref.qconfig = tq.get_default_qconfig(BACKEND)
    with quantize.engine(BACKEND), torch.no_grad():
        tq.prepare(ref, inplace=True)
        for i in range(0, 64, 32):
            items = [train_set[(0, j)] for j in range(i, i + 32)]
            ref(cpu_tf(torch.stack([im for im, _, _ in items])))
        tq.convert(ref, inplace=True)
        acc = tq_script.evaluate(ref, val_loader, cpu_tf, torch.device("cpu"), dist)
        assert (acc["acc1"], acc["acc5"]) == (ev["int8_acc1"], ev["int8_acc5"])
        loaded, meta = quantize.load_int8(out / "export")
        images = torch.cat([cpu_tf(b) for b, _ in val_loader])
        assert meta["mode"] == "ptq" and torch.equal(loaded(images), ref(images))


@pytest.mark.parametrize("extra,message", [
    (("model.weights={missing}",), "checkpoint not found"),
    (("model.weights={small}",), "the weights do not fit MobileNetV3-Large"),
    (("model.weights={qat}",), "holds a QAT (fake-quant) model, not float weights"),
])
def test_bad_weights_are_clear_errors(reference_run, small_data, tmp_path, extra, message, capsys):
    small = tmp_path / "small.pth"
    torch.save(build("mobilenet_v3_small", num_classes=10).state_dict(), small)
    fill = {"missing": tmp_path / "nope.pth", "small": small, "qat": reference_run / "checkpoints/last.pt"}
    argv = args(small_data, "x", tmp_path / "run") + [e.format(**fill) for e in extra]
    with pytest.raises(SystemExit) as exc:
        tq_script.launch(tq_script.Config, tq_script.main, tq_script.derived, argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_truncated_or_missing_int8_export_is_one_clear_error(reference_run, small_data, tmp_path, capsys):
    """run.eval_only on an export whose model_int8.pt was cut short (a copy or a full disk), or on a
    directory without one: exit 1, one line naming the file and what is wrong, no traceback."""
    export = tmp_path / "export"
    shutil.copytree(reference_run / "export", export)
    data = (export / quantize.EXPORT_FILE).read_bytes()
    (export / quantize.EXPORT_FILE).write_bytes(data[:len(data) // 2])
    (tmp_path / "empty").mkdir()
    truncated = "the int8 export is truncated or unreadable"
    for weights, message in ((export, f"{export / quantize.EXPORT_FILE}: {truncated}"),
                             (export / quantize.EXPORT_FILE, truncated),
                             (tmp_path / "empty", f"{tmp_path / 'empty'}: a directory without")):
        argv = args(small_data, weights, tmp_path / "run", "run.eval_only=true")
        with pytest.raises(SystemExit) as exc:
            tq_script.launch(tq_script.Config, tq_script.main, tq_script.derived, argv)
        err = capsys.readouterr().err
        assert exc.value.code == 1 and message in err, err
        assert "Traceback" not in err and "checkpoint not found" not in err, err


def test_configuration_errors_exit_2(small_data, tmp_path, capsys):
    argv = ["--recipe", str(RECIPE), "qat.backend=tensorrt", "model.name=mobilenet_v3_small"]
    with pytest.raises(SystemExit) as exc:
        tq_script.launch(tq_script.Config, tq_script.main, tq_script.derived, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "qat.backend: invalid choice 'tensorrt'" in err and "model.name: invalid choice" in err
    with pytest.raises(SystemExit) as exc:
        tq_script.launch(tq_script.Config, tq_script.main, tq_script.derived,
                         ["--recipe", str(RECIPE), "model.weights=null"])
    assert exc.value.code == 2
    assert "model.weights: required" in capsys.readouterr().err


def test_recipes_load_and_state_the_published_numbers():
    qat = load_config(tq_script.Config, ROOT / "recipes/qat/mobilenet_v3_large.yaml")
    assert (qat.expected.acc1, qat.expected.acc5) == (73.004, 90.858)
    assert (qat.optimizer.name, qat.optimizer.lr, qat.optimizer.momentum, qat.optimizer.weight_decay) == \
        ("sgd", 0.001, 0.9, 1e-5)
    assert (qat.schedule.name, qat.schedule.step_size, qat.schedule.gamma, qat.schedule.epochs) == ("step", 30, 0.1, 90)
    assert (qat.data.batch_size, qat.run.world_size, qat.run.global_batch) == (32, 8, 256)
    assert qat.data.auto_augment is None and qat.data.random_erasing == 0.0
    assert (qat.qat.backend, qat.qat.num_observer_update_epochs, qat.qat.num_batch_norm_update_epochs) == \
        ("qnnpack", 4, 3)
    ptq = load_config(tq_script.Config, ROOT / "recipes/qat/mobilenet_v3_large_ptq.yaml")
    assert ptq.qat.mode == "ptq" and (ptq.expected.acc1, ptq.expected.acc5) == (71.160, 89.834)
    # the published rows: qnnpack for both (the blog compares them), the 2021 module's float SE gate
    assert (ptq.qat.backend, ptq.qat.se_gate, qat.qat.se_gate) == ("qnnpack", "float", "float")
    assert tq_script.derived(qat, world_size=8, n_train=1_281_167)["optimizer_steps_per_epoch"] == 5005
    one = tq_script.derived(qat, world_size=1, n_train=1_281_167)  # one GPU: the published 256 images per step
    assert (one["accumulate"], one["global_batch"], one["lr"], one["optimizer_steps_per_epoch"]) == (8, 256, 0.001, 5005)
    two = tq_script.derived(qat, world_size=2, n_train=1_281_167)
    assert (two["accumulate"], two["global_batch"], two["optimizer_steps_per_epoch"]) == (4, 256, 5005)


def test_latency_bench_times_the_export_per_backend(reference_run, capsys):
    sys.path.insert(0, str(ROOT))
    from bench import qat_latency

    rows = qat_latency.main(["--size", "32", "--reps", "1", "--batches", "1", "--backends", "x86",
                             "--export", str(reference_run / "export")])
    assert [(r["model"], r["engine"]) for r in rows] == [("PTQ export (x86 qconfig)", "x86"), ("run export", "x86")]
    assert all(r["int8_ms"] > 0 and r["float_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert "machine: " in capsys.readouterr().out
