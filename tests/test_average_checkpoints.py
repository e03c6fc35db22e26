import hashlib
import json

import pytest
import torch
import torchvision

import average_checkpoints as avg
from engine import checkpoint


def _states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        m = torchvision.models.mobilenet_v3_small(num_classes=10)
        sd = {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v + 7 * i + 1)
              for k, v in m.state_dict().items()}
        out.append(sd)
    return out


def _write_run(tmp_path, history, missing=()):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    states = _states(len(history))
    for row, sd in zip(history, states):
        if row["epoch"] not in missing:
            checkpoint.save(checkpoint.new(sd, epoch=row["epoch"], optimizer={},
                                           config={"model": {"name": "mobilenet_v3_small", "num_classes": 10}}),
                            run / "checkpoints" / f"epoch_{row['epoch']:03d}.pt")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return run, states


def test_exact_average_against_independent_computation(tmp_path):
    states = _states(3)
    paths = []
    for i, sd in enumerate(states):
        paths.append(tmp_path / f"{i}.pth")
        torch.save(sd, paths[-1])
    out, _ = avg.average(paths)
    for k, v in out.items():
        if v.is_floating_point():
            expected = (sum(s[k].double() for s in states) / 3).float()
            assert v.dtype == torch.float32 and torch.equal(v, expected), k
        else:  # integer buffers stay integer: floor of the mean, as torchvision's tool does
            assert v.dtype == states[0][k].dtype
            assert torch.equal(v, sum(s[k] for s in states) // 3)


def test_integer_floor_division_and_float64_mean_by_hand(tmp_path):
    """Sums that 3 does not divide: integer buffers take the floor of the mean (torchvision's `//`:
    5/3 -> 1, 8/3 -> 2, -4/3 -> -2; rounding would give 2, 3, -1 and truncation -1), and float
    tensors are summed in float64 (1e8 + 1 - 1e8 is 0 in float32, 1 in float64) then cast back."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32).item()  # noqa: E731
    states = [
        {"w": torch.tensor([1e8, 1.0, 0.1]), "h": torch.tensor([0.5, 1.0], dtype=torch.float16),
         "bn.num_batches_tracked": torch.tensor(1), "v": torch.tensor([2, 3, -1, 0], dtype=torch.int32)},
        {"w": torch.tensor([1.0, 2.0, 0.2]), "h": torch.tensor([0.25, 1.0], dtype=torch.float16),
         "bn.num_batches_tracked": torch.tensor(2), "v": torch.tensor([3, 2, -2, 3], dtype=torch.int32)},
        {"w": torch.tensor([-1e8, 4.0, 0.3]), "h": torch.tensor([0.25, 2.0], dtype=torch.float16),
         "bn.num_batches_tracked": torch.tensor(2), "v": torch.tensor([3, 3, -1, 4], dtype=torch.int32)},
    ]
    paths = []
    for i, sd in enumerate(states):
        paths.append(tmp_path / f"{i}.pth")
        torch.save(sd, paths[-1])
    out, _ = avg.average(paths)
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and out["bn.num_batches_tracked"].item() == 1
    assert out["v"].dtype == torch.int32 and out["v"].tolist() == [2, 2, -2, 2]
    expected_w = torch.tensor([1 / 3, 7 / 3, (f32(0.1) + f32(0.2) + f32(0.3)) / 3], dtype=torch.float32)
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], expected_w), out["w"]
    assert out["h"].dtype == torch.float16
    assert torch.equal(out["h"], torch.tensor([1 / 3, 4 / 3], dtype=torch.float16))


HISTORY = [0.5, 0.9, 0.7, 0.9, 1.2, 1.1, 1.5, 1.5, 1.4]  # ties at epochs 1/3 and 6/7


def _rows(values):
    return [{"epoch": e, "acc1": v} for e, v in enumerate(values)]


def test_selection_rules_exact():
    rows = _rows(HISTORY)
    assert [r["epoch"] for r in avg.select(rows, "last-improved", 3, "acc1")] == [1, 4, 6]
    assert [r["epoch"] for r in avg.select(rows, "top", 3, "acc1", "max")] == [6, 7, 8]
    assert [r["epoch"] for r in avg.select(rows, "top", 2, "acc1", "min")] == [0, 2]
    assert [r["epoch"] for r in avg.select(rows, "top", 1, "acc1", "max")] == [7]  # tie: the later epoch
    assert [r["epoch"] for r in avg.select(rows, "last", 2, "acc1")] == [7, 8]
    with pytest.raises(avg.SelectionError, match="only 4 improved"):
        avg.select(rows, "last-improved", 5, "acc1")
    derived = rows + [{"epoch": 8, "row": "checkpoint averaging", "acc1": 99.0}]
    assert [r["epoch"] for r in avg.select(derived, "top", 1, "acc1")] == [7]


def test_run_selection_prints_and_writes_metadata(tmp_path, capsys):
    run, states = _write_run(tmp_path, _rows([1.0, 2.0, 1.5, 3.0, 4.0]))
    result = avg.main(["--run", str(run), "--select", "last-improved:3", "--out", str(tmp_path / "avg.pt"),
                       "--export"])
    text = capsys.readouterr().out
    assert "epoch    1  acc1 2.000" in text and "epoch    4  acc1 4.000" in text
    ckpt = torch.load(tmp_path / "avg.pt", weights_only=True)
    assert [s["epoch"] for s in ckpt["averaged_from"]] == [1, 3, 4] and ckpt["rule"].startswith("last-improved:3")
    assert ckpt["sha256"] == checkpoint.state_sha256(ckpt["model"])
    exported = tmp_path / result["export"].split("/")[-1]
    assert exported.name == f"avg-{hashlib.sha256(exported.read_bytes()).hexdigest()[:8]}.pth"
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    model.load_state_dict(torch.load(exported, weights_only=True), strict=True)  # loads into torchvision


def test_missing_checkpoint_file_is_named(tmp_path):
    run, _ = _write_run(tmp_path, _rows([1.0, 2.0, 3.0]), missing=(1,))
    with pytest.raises(FileNotFoundError, match="epoch_001.pt: selected by last:3 but missing"):
        avg.main(["--run", str(run), "--select", "last:3", "--out", str(tmp_path / "a.pt")])


def test_refuses_mismatched_checkpoints(tmp_path):
    small = torchvision.models.mobilenet_v3_small().state_dict()
    large = torchvision.models.mobilenet_v3_large().state_dict()
    torch.save(small, tmp_path / "s.pth")
    torch.save(large, tmp_path / "l.pth")
    with pytest.raises(ValueError, match="keys differ"):
        avg.average([tmp_path / "s.pth", tmp_path / "l.pth"])
    narrow = torchvision.models.mobilenet_v3_small(num_classes=10).state_dict()
    torch.save(narrow, tmp_path / "n.pth")
    with pytest.raises(ValueError, match=r"classifier.3.weight is torch.float32 \(10, 1024\)"):
        avg.average([tmp_path / "s.pth", tmp_path / "n.pth"])
    for i in range(2):
        cfg = {"model": {"name": "mobilenet_v3_small", "dropout": 0.2 + i}}
        checkpoint.save(checkpoint.new(small, config=cfg), tmp_path / f"c{i}.pt")
    with pytest.raises(ValueError, match="different model config.*model.dropout: 0.2 vs 1.2"):
        avg.average([tmp_path / "c0.pt", tmp_path / "c1.pt"])


def test_averaged_output_loads_strictly_into_torchvision_large(tmp_path):
    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(tmp_path / f"{i}.pth")
        torch.save(torchvision.models.mobilenet_v3_large().state_dict(), paths[-1])
    avg.main(["--inputs", *map(str, paths), "--out", str(tmp_path / "avg.pt")])
    torchvision.models.mobilenet_v3_large().load_state_dict(
        torch.load(tmp_path / "avg.pt", weights_only=True)["model"], strict=True)


def test_ema_weights(tmp_path):
    a, b = _states(2)
    checkpoint.save(checkpoint.new(a, model_ema=b), tmp_path / "x.pt")
    checkpoint.save(checkpoint.new(b, model_ema=a), tmp_path / "y.pt")
    out_model, _ = avg.average([tmp_path / "x.pt", tmp_path / "y.pt"], key="model_ema")
    k = "classifier.3.weight"
    assert torch.equal(out_model[k], ((a[k].double() + b[k].double()) / 2).float())
    torch.save(a, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="has no 'model_ema' weights"):
        avg.average([tmp_path / "plain.pth"], key="model_ema")


def test_eval_records_the_averaging_row(toy_data, tmp_path):
    from tests.test_train_classification import fast, run_script

    run = tmp_path / "run"
    assert run_script(fast(toy_data / "imagenet", run), tmp_path).returncode == 0
    result = avg.main(["--run", str(run), "--select", "last:2", "--out", str(tmp_path / "avg.pt"), "--eval"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["row"] == "checkpoint averaging" and rows[-1]["averaged_epochs"] == [1, 2]
    assert rows[-1]["acc1"] == result["metrics"]["acc1"] and result["metrics"]["val_images"] == 100


def _no_averaging(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("averaged before the refusal")

    monkeypatch.setattr(avg, "average", fail)


def test_out_under_a_file_is_refused_before_averaging(tmp_path, monkeypatch):
    run, _ = _write_run(tmp_path, [{"epoch": e, "acc1": float(e)} for e in range(2)])
    (tmp_path / "a_file").write_text("")
    _no_averaging(monkeypatch)
    with pytest.raises(avg.SelectionError, match=f"--out {tmp_path / 'a_file/x/avg.pt'}: {tmp_path / 'a_file'} "
                                                 "is a file, not a directory"):
        avg.main(["--run", str(run), "--select", "last:2", "--out", str(tmp_path / "a_file/x/avg.pt")])
    with pytest.raises(avg.SelectionError, match="is a directory; give a file name"):
        avg.main(["--run", str(run), "--select", "last:2", "--out", str(tmp_path)])


@pytest.mark.parametrize("config,script", [
    ("model: {name: fasterrcnn_mobilenet_v3_large_fpn}\n", "train_detection.py"),
    ("model: {name: mobilenet_v3_large}\nqat: {backend: x86}\n", "train_qat.py"),
    ("model: {name: lraspp_mobilenet_v3_large}\n", "train_segmentation.py"),
])
def test_eval_of_a_run_of_another_script_is_one_message_before_averaging(tmp_path, monkeypatch, config, script):
    run, _ = _write_run(tmp_path, [{"epoch": e, "acc1": float(e)} for e in range(2)])
    (run / "config.yaml").write_text(config)
    _no_averaging(monkeypatch)
    with pytest.raises(avg.SelectionError) as err:
        avg.main(["--run", str(run), "--select", "last:2", "--out", str(tmp_path / "avg.pt"), "--eval"])
    assert str(err.value) == (f"--eval evaluates classification runs; {run} is a run of {script}. Average without "
                              f"--eval, then evaluate: python {script} --recipe {run / 'config.yaml'} "
                              f"run.eval_only=true model.weights={tmp_path / 'avg.pt'}")


def test_eval_into_a_run_another_process_holds_is_refused_before_averaging(tmp_path, monkeypatch):
    """--eval rewrites the run's metrics.jsonl and report.md: a run directory locked by a training run that
    is still going (another process, as the lock is per process) is refused, naming the holder."""
    import subprocess
    import sys

    from engine import rundir
    from engine.errors import RunDirError
    from tests.conftest import ROOT

    run, _ = _write_run(tmp_path, [{"epoch": e, "acc1": float(e)} for e in range(2)])
    (run / "config.yaml").write_text("model: {name: mobilenet_v3_small}\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from engine import rundir; "
         "h = rundir.lock_dir(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _no_averaging(monkeypatch)
        with pytest.raises(RunDirError, match=rf"{run} is in use by another run \(host \S+, pid {holder.pid};"):
            avg.main(["--run", str(run), "--select", "last:2", "--out", str(tmp_path / "avg.pt"), "--eval"])
        assert not (tmp_path / "avg.pt").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    rundir.lock_dir(run).close()  # released when its holder ended: the next --eval gets it
