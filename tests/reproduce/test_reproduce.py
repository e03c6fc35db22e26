"""tools/reproduce.py (reproduce/plan.py, reproduce/launch.py): a whole table, here and on a real SLURM.

The toy table runs once on this machine (module fixture, ~1 CPU-minute: every task shrunk to an epoch or
two) and is then read by several tests: every row in the combined report with the run directories'
own numbers, a second invocation that starts nothing and changes no file, the status view. A table on
bad data shows the failed step with its log's last line and never starts its dependents. The dry run
of every published table prints commands each recipe accepts (--print-config). The same toy table
goes through the real SLURM on this machine when one is up (slurm/local_cluster.sh start).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reproduce import plan
from reproduce.published import TABLE_NAMES
from tests.conftest import ROOT, run_in_process

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Every task on the toy data at the smallest size that still trains: Large at 32 px for 2 epochs (the
# detection/segmentation backbone, the QAT/PTQ start), one epoch of each other task.
SHRINK = [
    "data.workers=0", "run.print_freq=100",
    "classification:schedule.epochs=2", "classification:data.crop_size=32", "classification:data.val_resize=36",
    "classification:data.val_crop=32",
    "qat:schedule.epochs=1", "qat:qat.num_observer_update_epochs=1", "qat:qat.num_batch_norm_update_epochs=1",
    "qat:qat.calibration_batches=1", "qat:data.crop_size=32", "qat:data.val_resize=36", "qat:data.val_crop=32",
    "detection:model.min_size=128", "detection:model.max_size=160", "detection:model.box_batch_size_per_image=32",
    "detection:model.rpn_pre_nms_top_n_test=50", "detection:model.rpn_post_nms_top_n_test=50",
    "detection:schedule.epochs=1", "detection:train.draw_images=0",
    "segmentation:data.crop_size=64", "segmentation:data.short_side=[48,128]", "segmentation:data.eval_size=72",
    "segmentation:schedule.epochs=1", "segmentation:train.draw_images=0",
]


def toy_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["toy", "--data", str(data), "--out", str(out), "--gpus-per-node", "0",
            *[a for o in SHRINK for a in ("--set", o)], *extra]


def reproduce(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/reproduce.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, env=ENV)


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def status_rows(text: str) -> dict[str, tuple[str, str]]:
    """step -> (state, detail) from the status table."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+\.(?:make|train|average|eval)|report-\S+)\s+(\w+)\s*(.*)$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def report_lines(md: Path, run_dir: Path) -> list[list[str]]:
    """The cells of the combined report's lines for one run directory."""
    out = []
    for line in md.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 9 and cells[4] == f"`{run_dir}`":
            out.append(cells)
    return out


def check_toy_table(out: Path) -> None:
    """Every toy row in the combined report, each with the numbers of its own run directory."""
    md = out / "reports" / "toy.md"
    assert (out / "reports" / "toy.png").stat().st_size > 0
    for step in plan.steps("toy", plan.Options(Path("/unused"), out)):
        if step.kind in ("data", "report"):
            continue
        lines = report_lines(md, step.run_dir)
        assert lines, f"{step.run_dir} is not in {md}"
        if step.kind == "eval":
            ev = json.loads((step.run_dir / "eval.json").read_text())
            key = "int8_acc1" if step.task == "qat" else {"detection": "bbox_map", "segmentation": "miou"}[step.task]
            (line,) = [c for c in lines if c[5].startswith("eval-only")]
            assert float(line[6].split(" / ")[0]) == pytest.approx(ev[key], abs=5e-4)
        elif step.kind == "train":
            rows = [json.loads(x) for x in (step.run_dir / "metrics.jsonl").read_text().splitlines()]
            last = [r for r in rows if "row" not in r][-1]
            key = {"classification": "acc1", "qat": "int8_acc1", "detection": "bbox_map", "segmentation": "miou"}
            (line,) = [c for c in lines if c[5] == f"last epoch ({last['epoch']})"]
            assert float(line[6].split(" / ")[0]) == pytest.approx(last[key[step.task]], abs=5e-4)
        else:  # the averaging row, in the training run's metrics.jsonl
            assert [c for c in lines if c[5].startswith("checkpoint averaging: last:2 on acc1")]


@pytest.fixture(scope="module")
def toy_table(toy_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "runs"
    start = time.perf_counter()
    proc = reproduce(toy_args(toy_data, out, "--jobs", "2"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc, time.perf_counter() - start


# ============================================================================ the toy table, here


def test_toy_table_ends_with_every_row_in_the_combined_report(toy_table):
    out, proc, _ = toy_table
    check_toy_table(out)
    assert set(status_rows(proc.stdout).values()) == {("done", "")}
    assert len(status_rows(proc.stdout)) == 10  # the toy data (already there), 8 steps of 7 rows, the report


def test_toy_rows_share_and_chain_their_weights(toy_table):
    """QAT and PTQ start from the classification run's average, detection and segmentation from its last
    checkpoint; the variant evaluations evaluate the training run's checkpoint with their variant."""
    import yaml

    out, _, _ = toy_table

    def config(name: str) -> dict:
        return yaml.safe_load((out / name / "config.yaml").read_text())

    averaged, last = str(out / "toy_classification/averaged.pt"), str(out / "toy_classification/checkpoints/last.pt")
    assert config("toy_qat")["model"]["weights"] == config("toy_ptq")["model"]["weights"] == averaged
    assert config("toy_ptq")["qat"]["mode"] == "ptq" and config("toy_qat")["qat"]["mode"] == "qat"
    assert config("toy_detection")["model"]["backbone_weights"] == last
    assert config("toy_segmentation")["model"]["backbone_weights"] == last
    rpn = config("toy_detection_rpn1000")["model"]
    assert (rpn["rpn_pre_nms_top_n_test"], rpn["rpn_post_nms_top_n_test"]) == (1000, 1000)
    assert json.loads((out / "toy_detection_rpn1000/eval.json").read_text())["weights"] == \
        str(out / "toy_detection/checkpoints/last.pt")
    low = json.loads((out / "toy_segmentation_low/eval.json").read_text())
    assert (low["eval_size"], low["weights"]) == (128, str(out / "toy_segmentation/checkpoints/last.pt"))


def test_the_same_command_again_starts_nothing_and_changes_nothing(toy_table, toy_data):
    out, _, _ = toy_table
    before = snapshot(out)
    proc = reproduce(toy_args(toy_data, out, "--jobs", "2"), timeout=120)
    assert proc.returncode == 0 and "started" not in proc.stdout, proc.stdout
    assert set(status_rows(proc.stdout).values()) == {("done", "")}
    assert snapshot(out) == before
    status = reproduce(toy_args(toy_data, out, "--status"), timeout=120)
    assert status.returncode == 0 and status.stdout == proc.stdout and snapshot(out) == before


def test_a_report_older_than_a_run_is_written_again(toy_table, toy_data):
    """The report step is finished only while its files are newer than every run it gathers."""
    out, _, _ = toy_table
    md = out / "reports" / "toy.md"
    old = md.stat().st_mtime
    os.utime(md, (old - 3600, old - 3600))
    proc = reproduce(toy_args(toy_data, out, "--status"), timeout=120)
    assert status_rows(proc.stdout)["report-toy"] == ("ready", "out of date: a run changed since")
    proc = reproduce(toy_args(toy_data, out), timeout=300)
    assert proc.returncode == 0 and proc.stdout.count("started ") == 1 and "started report-toy" in proc.stdout
    assert md.stat().st_mtime > old - 3600
    check_toy_table(out)


def test_a_failed_step_stops_its_dependents_and_says_why(toy_data, tmp_path):
    bad = tmp_path / "bad"
    (bad / "imagenet").mkdir(parents=True)  # no train/ nor val/: the classification run refuses it
    (bad / "coco").symlink_to(toy_data / "coco")
    out = tmp_path / "runs"
    proc = reproduce(toy_args(bad, out, "--jobs", "2"), timeout=300)
    assert proc.returncode == 1
    rows = status_rows(proc.stdout)
    state, detail = rows["toy_classification.train"]
    log = out / "logs" / "toy_classification.train.log"
    last = [x for x in log.read_text().splitlines() if x.strip()][-1]
    assert state == "failed" and detail == f"{last}  [{log}]" and "imagenet" in last, proc.stdout
    assert rows.pop("toy_data.make") == ("done", "")  # data given is taken as it is
    assert all(s == "blocked" for name, (s, _) in rows.items() if name != "toy_classification.train"), rows
    assert rows["toy_detection.train"][1] == "toy_classification.train failed: not started"
    assert rows["toy_detection_rpn1000.eval"][1] == "toy_detection.train blocked: not started"
    assert sorted(p.name for p in out.iterdir()) == ["logs", "toy_classification"]
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["toy_classification.train.log"]
    assert reproduce(toy_args(bad, out, "--status"), timeout=120).stdout.splitlines()[:-1] == \
        proc.stdout.splitlines()[-len(rows) - 3:-1]


# ============================================================================ plans of the published tables


def test_rows_that_share_a_training_run_share_it():
    opts = plan.Options(Path("/data"), Path("/out"), float_weights="/w/float.pth")
    rpn = {s.name: s for s in plan.steps("rpn", opts)}
    assert [s for s in rpn if s.endswith(".train")] == ["fasterrcnn_mobilenet_v3_large_320_fpn.train"]
    ev = rpn["fasterrcnn_mobilenet_v3_large_320_fpn_no_rpn_tuning.eval"]
    assert ev.deps == ("fasterrcnn_mobilenet_v3_large_320_fpn.train",)
    assert "model.weights=/out/fasterrcnn_mobilenet_v3_large_320_fpn/checkpoints/epoch_023.pt" in ev.command
    assert "recipes/detection/fasterrcnn_mobilenet_v3_large_320_fpn_no_rpn_tuning.yaml" in ev.command
    short = plan.Options(Path("/data"), Path("/out"), ("detection:schedule.epochs=3",))  # never has epoch 23:
    ev = {s.name: s for s in plan.steps("rpn", short)}["fasterrcnn_mobilenet_v3_large_320_fpn_no_rpn_tuning.eval"]
    assert "model.weights=/out/fasterrcnn_mobilenet_v3_large_320_fpn/checkpoints/last.pt" in ev.command  # its last
    low = {s.name: s for s in plan.steps("segmentation-lowres", opts)}
    assert sorted(s for s in low if s.endswith(".train")) == [
        "deeplabv3_mobilenet_v3_large.train", "fcn_mobilenet_v3_large.train", "lraspp_mobilenet_v3_large.train"]
    lraspp = low["lraspp_mobilenet_v3_large_evalsize320.eval"]
    assert {"data.eval_size=320", "expected.miou=55.8", "expected.pixel_acc=90.3",
            "model.weights=/out/lraspp_mobilenet_v3_large/checkpoints/epoch_028.pt"} <= set(lraspp.command)
    assert "model.weights=/out/fcn_mobilenet_v3_large/checkpoints/last.pt" in \
        low["fcn_mobilenet_v3_large_evalsize320.eval"].command
    quant = plan.steps("quantization", opts)
    assert [s.deps for s in quant[:2]] == [(), ()]
    assert all("model.weights=/w/float.pth" in s.command for s in quant[:2])
    released = {s.name: s for s in plan.steps("released", opts)}
    assert released["mobilenet_v3_large.average"].command[-5:] == [
        "--metric", "acc1", "--out", "/out/mobilenet_v3_large/averaged.pt", "--eval"]
    # tuning rows 4 and 5 are one recipe's training: row 5 is an evaluation of its average, with its recipe
    tuning = {s.name: s for s in plan.steps("tuning", opts)}
    assert [s for s in tuning if s.endswith(".train")] == [
        "ablation-1_baseline.train", "ablation-2_rmsprop_default_eps.train",
        "ablation-3_rmsprop_adjusted_eps_lr.train", "ablation-4_augmentation_tuned.train",
        "mobilenet_v3_large_improved.train"]
    average = tuning["ablation-4_augmentation_tuned.average"]
    assert average.deps == ("ablation-4_augmentation_tuned.train",)
    assert average.command[:5] == ["average_checkpoints.py", "--run", "/out/ablation/4_augmentation_tuned",
                                   "--select", "last-improved:3"]
    row5 = tuning["ablation-5_checkpoint_averaging.eval"]
    assert row5.deps == ("ablation-4_augmentation_tuned.average",) and row5.run_dir == Path(
        "/out/ablation/5_checkpoint_averaging")
    assert {"recipes/ablation/5_checkpoint_averaging.yaml", "run.eval_only=true",
            "model.weights=/out/ablation/4_augmentation_tuned/averaged.pt"} <= set(row5.command)
    toy = plan.steps("toy", opts)  # on a fresh machine the toy data is written first
    assert (toy[0].name, toy[0].command) == ("toy_data.make", ["tools/make_toy_data.py", "--out", "/data"])
    assert [s.name for s in toy if s.deps == ("toy_data.make",)] == ["toy_classification.train"]
    for table in plan.TABLES:
        steps = plan.steps(table, opts)
        assert steps[-1].name == f"report-{table}" and set(steps[-1].deps) == {s.name for s in steps[:-1]}
        assert plan.order(steps) == steps


def _dry_run_commands(table: str, tmp_path: Path, *extra: str) -> list[list[str]]:
    proc = run_in_process("tools/reproduce.py", [table, "--data", "/data", "--out", tmp_path / "out",
                                                 "--gpus-per-node", "0", "--dry-run", *extra], ROOT)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out").exists()
    return [shlex.split(line.split("  # ")[0]) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("table", list(TABLE_NAMES))
def test_dry_run_of_a_published_table_prints_commands_the_recipes_accept(table, tmp_path):
    commands = _dry_run_commands(table, tmp_path)
    steps = plan.steps(table, plan.Options(Path("/data"), tmp_path / "out"))
    assert [c[1:] for c in commands] == [s.command for s in steps] and {c[0] for c in commands} == {sys.executable}
    for cmd in commands:
        script, args = cmd[1], cmd[2:]
        assert "run.resume=auto" in args or not script.startswith("train_")  # an interrupted step continues
        if script.startswith("train_"):
            proc = run_in_process(script, [*args, "--print-config"], ROOT)
            assert proc.returncode == 0, f"{shlex.join(cmd)}:\n{proc.stderr[-2000:]}"
    slurm = run_in_process("tools/reproduce.py", [table, "--out", tmp_path / "out", "--on", "slurm", "--dry-run",
                                                  "--nodes", "2", "--time", "24:00:00", "--partition", "gpu",
                                                  "--account", "vision", "--sbatch-args=--qos=high --mem=0"], ROOT)
    assert slurm.returncode == 0, slurm.stderr
    jobs = [line for line in slurm.stdout.splitlines() if line.startswith("JOB_")]
    assert len(jobs) == len(steps)
    defined: set[str] = set()
    for line, step in zip(jobs, steps):
        var, cmd = line.split("=$(", 1)
        args = shlex.split(cmd.rstrip(")"))
        assert args[:2] == ["sbatch", "--parsable"] and f"--job-name={table}.{step.name}" in args
        assert {"--partition=gpu", "--account=vision", "--qos=high", "--mem=0", "--time=24:00:00"} <= set(args)
        template = "slurm/multinode.sbatch" if step.distributed else "slurm/1node.sbatch"
        i = args.index(template)
        assert args[i + 1:] == step.command and (ROOT / template).is_file()
        assert ("--nodes=2" if step.distributed else "--nodes=1") in args
        after = [a for a in args if a.startswith("--dependency=")]
        assert after == ([f"--dependency=afterok:{':'.join('$' + v for v in _vars(step.deps))}"]
                         if step.deps else [])
        assert set(_vars(step.deps)) <= defined
        defined.add(var)


def _vars(names) -> list[str]:
    return ["JOB_" + "".join(c if c.isalnum() else "_" for c in n).upper() for n in names]


def test_bad_options_are_one_message_and_exit_2(tmp_path):
    proc = run_in_process("tools/reproduce.py", ["toy", "--set", "dectection:schedule.epochs=1", "--status"], ROOT)
    assert proc.returncode == 2 and "--set dectection:schedule.epochs=1: expected [TASK:]KEY=VALUE with TASK one " \
        "of classification, qat, detection, segmentation" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_in_process("tools/reproduce.py", ["tables"], ROOT)
    assert proc.returncode == 2 and "invalid choice: 'tables'" in proc.stderr


# ============================================================================ the toy table on a real SLURM


def _slurm_idle() -> str | None:
    """Why the SLURM test cannot run here, or None."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "no SLURM here (sbatch/sinfo not on PATH); slurm/local_cluster.sh start runs a one-node cluster"
    # a node that takes jobs: idle, or busy with other jobs (ours then wait in the queue)
    proc = subprocess.run(["sinfo", "--noheader", "--responding", "--states=idle,mixed,allocated,completing",
                           "--format=%n %T"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip():
        return f"no SLURM node up to run jobs (sinfo: {(proc.stdout + proc.stderr).strip() or 'no idle node'})"
    return None


@pytest.mark.skipif(_slurm_idle() is not None, reason=str(_slurm_idle()))
def test_toy_table_on_slurm_ends_with_every_row_and_again_submits_nothing(toy_data, tmp_path):
    out = tmp_path / "runs"
    args = toy_args(toy_data, out, "--on", "slurm", "--cpus-per-task", "1", "--time", "20")
    proc = reproduce(args, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    submitted = dict(re.findall(r"^submitted (\S+): job (\d+)$", proc.stdout, re.MULTILINE))
    assert len(submitted) == 9
    deadline = time.monotonic() + 480
    while True:
        status = reproduce([*args, "--status"], timeout=120)
        rows = status_rows(status.stdout)
        if all(s == "done" for s, _ in rows.values()) or any(s in ("failed", "blocked") for s, _ in rows.values()):
            break
        assert time.monotonic() < deadline, status.stdout
        time.sleep(5)
    assert all(s == "done" for s, _ in rows.values()), status.stdout
    check_toy_table(out)
    for step, job in submitted.items():  # each ran through slurm/launch.sh inside its own job
        assert f"launch: job {job}, 1 tasks on 1 node(s)" in (out / "logs" / f"{step}.log").read_text()
    before = snapshot(out)
    again = reproduce(args, timeout=120)
    assert again.returncode == 0 and "submitted" not in again.stdout, again.stdout
    assert set(status_rows(again.stdout).values()) == {("done", "")} and snapshot(out) == before


def test_an_interrupted_step_continues_from_its_run_directory(toy_data, tmp_path):
    """A step stopped part-way (SIGTERM, as SLURM preempts) is failed with its log's last line until the same
    command runs it again, which continues its run directory (run.resume=auto) to the end."""
    import signal

    from reproduce import launch
    from tests.test_train_classification import fast

    out = tmp_path / "runs"
    run_dir = out / "cls"
    step = plan.Step("cls.train", "train", "classification",
                     ["train_classification.py", *fast(toy_data / "imagenet", run_dir, "schedule.epochs=3"),
                      "run.resume=auto"], run_dir)
    proc, _ = launch._start(step, out, 0)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "epoch_000.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, launch.last_line(launch.log_path(out, step))
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM and not step.done()
    state = launch.states([step], out)["cls.train"]
    assert state.state == "failed" and "stopped by SIGTERM" in state.detail
    assert launch.run_local([step], out) == 0 and step.done()
    epochs = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]  # each epoch once: the second run continued, it did not start over
    log = launch.log_path(out, step).read_text()
    assert log.count("=== ") == 2 and "resum" in log.split("=== ")[2]
