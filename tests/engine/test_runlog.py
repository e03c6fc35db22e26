"""engine/runlog.py's metrics.jsonl reader: a torn last line (a kill while appending) is dropped with a
warning; any other malformed line is an error naming the file and line."""

import json

import pytest

from engine.errors import UserError
from engine.runlog import RunLog, read_metrics

ROWS = [{"epoch": 0, "acc1": 10.0}, {"row": "recipe change", "epoch": 1, "changes": {}}, {"epoch": 1, "acc1": 20.5}]


def _write(tmp_path, text):
    (tmp_path / "metrics.jsonl").write_text(text)
    return tmp_path / "metrics.jsonl"


def test_rows_read_back_and_a_torn_last_line_is_dropped_with_a_warning(tmp_path, capsys):
    whole = "".join(json.dumps(r) + "\n" for r in ROWS)
    _write(tmp_path, whole)
    assert read_metrics(tmp_path) == ROWS and capsys.readouterr().err == ""
    path = _write(tmp_path, whole + json.dumps({"epoch": 2, "acc1": 30.0})[:17])
    assert read_metrics(tmp_path) == ROWS
    assert capsys.readouterr().err == (f"warning: {path}: line 4 is incomplete (a process stopped while writing it); "
                                       "ignored\n")


@pytest.mark.parametrize("text,line", [
    ('{"epoch": 0}\n{"epoch": 1, "acc\n{"epoch": 2}\n', 2),   # torn, then written after: not the last line
    ('{"epoch": 0}\n{"epoch": 1, "acc\n', 2),                 # a torn line that ends in a newline
    ('{"epoch": 0}\n[1, 2]\n', 2),                            # JSON, but not a row
    ('{"acc1": 1.0}\n', 1),                                   # a row without its epoch
])
def test_any_other_malformed_line_is_an_error_naming_file_and_line(tmp_path, text, line):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=f"^{path}: line {line} is not"):
        read_metrics(tmp_path)


def test_truncate_after_drops_the_torn_line_so_appends_start_on_a_line_of_their_own(tmp_path):
    _write(tmp_path, "".join(json.dumps(r) + "\n" for r in ROWS) + '{"epoch": 2, "ac')
    log = RunLog(tmp_path, enabled=True)
    log.truncate_after(0)
    log.ensure_row({"epoch": 1, "acc1": 20.5})
    log.ensure_row({"epoch": 1, "acc1": 20.5})  # present: not written twice
    assert read_metrics(tmp_path) == [ROWS[0], ROWS[2]]


def test_progress_in_a_batch_job_prints_every_n_steps_and_the_last(capsys):
    from engine.runlog import Progress

    bar = Progress("epoch 2", total=7, every=3, enabled=True, interactive=False)
    assert [bar.due(step) for step in range(7)] == [False, False, True, False, False, True, True]
    for step in range(7):
        bar.update(step, loss=0.123456)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" eta ")[0] for line in lines] == ["epoch 2 3/7", "epoch 2 6/7", "epoch 2 7/7"]
    assert lines[-1].endswith("eta 0:00:00 loss 0.1235")
    quiet = Progress("epoch 2", total=7, every=3, enabled=False, interactive=False)
    quiet.update(2, loss=1.0)
    assert not quiet.due(2) and capsys.readouterr().out == ""


def test_progress_on_a_terminal_redraws_one_bar_every_step(capsys):
    from engine.runlog import Progress

    bar = Progress("eval", total=4, every=100, enabled=True, interactive=True)
    for step in range(4):
        bar.update(step)
    out = capsys.readouterr().out
    assert out.count("\r") == 4 and out.endswith("\n") and out.count("\n") == 1
    assert "\reval [############............] 2/4 eta" in out
    assert "\reval [########################] 4/4 eta 0:00:00 \n" in out


def test_environment_names_the_git_commit_or_none():
    """A checkout names its commit (40 hex digits); a tree without git history (an sdist, a copy) says None."""
    import re
    import subprocess
    from pathlib import Path

    import torch

    from engine.runlog import environment

    env = environment(3, torch.device("cpu"))
    assert env["world_size"] == 3 and env["device"] == "cpu" and env["torch"] == torch.__version__
    assert "gpus" not in env and "cuda" not in env  # a CPU run names no GPU
    here = Path(__file__).resolve().parent
    in_git = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=here, capture_output=True,
                            text=True).stdout.strip() == "true"
    if in_git:
        assert re.fullmatch(r"[0-9a-f]{40}", env["git_commit"]), env["git_commit"]
    else:
        assert env["git_commit"] is None


def test_closing_a_log_that_never_wrote_tensorboard_does_nothing(tmp_path):
    log = RunLog(tmp_path, enabled=True)
    log.close()
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_improving_epochs_skip_ties_rows_without_the_metric_and_recipe_change_rows():
    from engine.runlog import improved

    history = [{"epoch": 3, "acc1": 3.0}, {"epoch": 0, "acc1": 1.0}, {"epoch": 1},
               {"row": "recipe change", "epoch": 1, "acc1": 99.0}, {"epoch": 2, "acc1": 3.0},
               {"epoch": 4, "acc1": 2.0}, {"epoch": 5, "acc1": 3.5}]
    assert [r["epoch"] for r in improved(history, "acc1")] == [0, 2, 5]
    assert [r["epoch"] for r in improved(history, "acc1", mode="min")] == [0]
    assert improved([], "acc1") == []
    losses = [{"epoch": e, "val_loss": v} for e, v in enumerate([2.0, 1.5, 1.5, 1.7, 1.0])]
    assert [r["epoch"] for r in improved(losses, "val_loss", mode="min")] == [0, 1, 4]  # a tie is no gain


def test_metrics_rows_create_the_directory(tmp_path):
    log = RunLog(tmp_path / "new" / "run", enabled=True)
    log.metrics({"epoch": 0, "acc1": 1.5})
    assert read_metrics(tmp_path / "new" / "run") == [{"epoch": 0, "acc1": 1.5}]
    RunLog(tmp_path / "off", enabled=False).metrics({"epoch": 0})
    assert not (tmp_path / "off").exists()


def test_images_and_scalars_go_to_tensorboard_event_files(tmp_path):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, enabled=True)
    log.images(2, {"pred": torch.full((3, 4, 5), 200, dtype=torch.uint8)})
    log.scalars(2, {"acc1": 12.5, "skipped": None}, prefix="val/")
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["val/acc1"] and events.Tags()["images"] == ["pred"]
    assert [(e.step, e.value) for e in events.Scalars("val/acc1")] == [(2, 12.5)]
    [img] = events.Images("pred")
    assert (img.step, img.width, img.height) == (2, 5, 4)
    RunLog(tmp_path / "off", enabled=False).images(0, {"pred": torch.zeros(3, 2, 2, dtype=torch.uint8)})
    assert not (tmp_path / "off").exists()


def test_eta_is_hours_minutes_seconds():
    from engine.runlog import _hms

    assert [_hms(s) for s in (0, 59.9, 61, 3599, 3600, 7322, 90061)] == \
        ["0:00:00", "0:00:59", "0:01:01", "0:59:59", "1:00:00", "2:02:02", "25:01:01"]


class _Stream:
    """A stand-in for a batch job's stdout/stderr (a file: block-buffered): what was written, and what
    of it was flushed."""

    def __init__(self):
        self.flushed, self.pending = "", ""

    def write(self, text):
        self.pending += text
        return len(text)

    def flush(self):
        self.flushed, self.pending = self.flushed + self.pending, ""


def test_every_log_line_is_flushed_as_it_is_written(tmp_path, monkeypatch):
    """A SLURM log is a file: a line left in the buffer shows up only when the job ends (or never, if
    it is killed). Progress lines, messages and the torn-line warning are each flushed at once."""
    from engine.runlog import Progress

    out, err = _Stream(), _Stream()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    RunLog(tmp_path, enabled=True).info("resumed from epoch 3")
    assert (out.flushed, out.pending) == ("resumed from epoch 3\n", "")
    RunLog(tmp_path, enabled=False).info("not the main process")
    assert (out.flushed, out.pending) == ("resumed from epoch 3\n", "")
    Progress("epoch 0", total=2, every=1, enabled=True, interactive=False).update(0)
    assert out.pending == "" and out.flushed.startswith("resumed from epoch 3\nepoch 0 1/2 eta ")
    Progress("eval", total=2, every=1, enabled=True, interactive=True).update(0)
    assert out.pending == "" and out.flushed.endswith("\reval [############............] 1/2 eta 0:00:00 ")
    _write(tmp_path, '{"epoch": 0}\n{"epoch": 1')
    assert read_metrics(tmp_path) == [{"epoch": 0}]
    assert err.pending == "" and err.flushed.startswith("warning: ") and err.flushed.endswith("ignored\n")


def test_progress_eta_is_the_time_per_step_so_far_times_the_steps_left(monkeypatch, capsys):
    """A clock under the test's control: started at 1000 s, 10 s for the first 2 of 8 steps is 5 s a
    step, 6 steps left: 30 s."""
    import time

    from engine.runlog import Progress

    now = [1000.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    bar = Progress("epoch 3", total=8, every=2, enabled=True, interactive=False)
    for step, at in [(0, 1004.0), (1, 1010.0), (2, 1050.0), (3, 1100.0), (7, 1200.0)]:
        now[0] = at
        bar.update(step, loss=2.5, lr=0.1, acc1=12.34567)
    assert capsys.readouterr().out.splitlines() == [
        "epoch 3 2/8 eta 0:00:30 loss 2.5 lr 0.1 acc1 12.35",
        "epoch 3 4/8 eta 0:01:40 loss 2.5 lr 0.1 acc1 12.35",   # 100 s / 4 steps x 4 left
        "epoch 3 8/8 eta 0:00:00 loss 2.5 lr 0.1 acc1 12.35",
    ]
    now[0] = 2000.0
    bar = Progress("eval", total=3, every=100, enabled=True, interactive=True)
    for step, at in [(0, 2004.0), (1, 2010.0), (2, 2030.0)]:
        now[0] = at
        bar.update(step, acc1=50.0)
    assert capsys.readouterr().out == ("\reval [########................] 1/3 eta 0:00:08 acc1 50"
                                       "\reval [################........] 2/3 eta 0:00:05 acc1 50"
                                       "\reval [########################] 3/3 eta 0:00:00 acc1 50\n")


def test_environment_names_the_commit_git_finds(tmp_path, monkeypatch):
    """The commit is the text git prints (a str, stripped), whichever repository git finds: here one
    pointed to by GIT_DIR whose HEAD is a commit we chose. The Python version is the bare number."""
    import platform
    import shutil

    import torch

    from engine.runlog import environment

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    sha = "0123456789abcdef0123456789abcdef01234567"
    for sub in ("objects", "refs"):
        (tmp_path / sub).mkdir()
    (tmp_path / "HEAD").write_text(sha + "\n")
    monkeypatch.setenv("GIT_DIR", str(tmp_path))
    env = environment(1, torch.device("cpu"))
    assert env["git_commit"] == sha
    assert env["python"] == platform.python_version()


def test_env_json_is_indented_json_with_paths_as_text(tmp_path):
    from pathlib import Path

    RunLog(tmp_path, enabled=True).write_env({"world_size": 2, "root": Path("/data/imagenet"), "gpus": ["A", "B"]})
    assert (tmp_path / "env.json").read_text() == (
        '{\n  "world_size": 2,\n  "root": "/data/imagenet",\n  "gpus": [\n    "A",\n    "B"\n  ]\n}\n')
    RunLog(tmp_path / "off", enabled=False).write_env({"world_size": 2})
    assert not (tmp_path / "off").exists()


def test_truncate_after_without_a_metrics_file_or_on_another_rank_changes_nothing(tmp_path):
    RunLog(tmp_path, enabled=True).truncate_after(3)  # a run that stopped before its first row
    assert list(tmp_path.iterdir()) == []
    text = "".join(json.dumps(r) + "\n" for r in ROWS)
    _write(tmp_path, text)
    RunLog(tmp_path, enabled=False).truncate_after(0)  # only the main process rewrites the file
    assert (tmp_path / "metrics.jsonl").read_text() == text


def test_metrics_rows_are_one_json_object_a_line_in_the_order_given_and_on_disk_when_written(tmp_path, monkeypatch):
    """One line per row, keys in the order the loop wrote them (epoch first, as docs/training.md lists
    them); each row is flushed and fsynced before metrics() returns, so a crash right after keeps it:
    the file's size at each fsync is everything written so far."""
    import os

    sizes = []
    real_fsync = os.fsync

    def fsync(fd):
        sizes.append(os.fstat(fd).st_size)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    log = RunLog(tmp_path, enabled=True)
    log.metrics({"epoch": 0, "acc1": 1.5, "train_loss": 2.25})
    log.metrics({"epoch": 1, "acc1": 3.0, "lr": 0.1})
    lines = ['{"epoch": 0, "acc1": 1.5, "train_loss": 2.25}\n', '{"epoch": 1, "acc1": 3.0, "lr": 0.1}\n']
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines)
    assert sizes == [len(lines[0]), len(lines[0]) + len(lines[1])]


def test_blank_lines_are_skipped_and_a_long_bad_line_is_quoted_to_80_characters(tmp_path):
    _write(tmp_path, '{"epoch": 0}\n\n   \n{"epoch": 1}\n')  # a file edited by hand
    assert read_metrics(tmp_path) == [{"epoch": 0}, {"epoch": 1}]
    line = '{"epoch": "2", "note": "' + "0123456789" * 10 + '"}'
    path = _write(tmp_path, '{"epoch": 0}\n' + line + "\n")
    with pytest.raises(UserError) as err:
        read_metrics(tmp_path)
    head = '{"epoch": "2", "note": "' + "0123456789" * 5 + "012345"  # its first 80 characters
    assert len(head) == 80
    assert str(err.value) == f'{path}: line 2 is not a metrics row (a JSON object with an integer "epoch"): {head}'
    path = _write(tmp_path, '{"epoch": 0}\n{"epoch": 1,}\n{"epoch": 2}\n')
    with pytest.raises(UserError) as err:
        read_metrics(tmp_path)
    assert str(err.value) == (f"{path}: line 2 is not valid JSON (Expecting property name enclosed in double "
                              "quotes: line 1 column 13 (char 12)); fix or delete that line")


def test_tensorboard_values_are_on_disk_before_close_and_close_stops_the_writer(tmp_path, monkeypatch):
    """TensorBoard reads a running job's event files: each call returns once its values are written,
    even on a slow disk (a background thread writes them: here it takes 0.1 s a record). The first
    call, whichever it is, opens the writer; close() ends its background thread."""
    import threading
    import time

    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.summary.writer.record_writer import RecordWriter

    write = RecordWriter.write
    monkeypatch.setattr(RecordWriter, "write", lambda self, data: (time.sleep(0.1), write(self, data)))
    RunLog(tmp_path / "no-images", enabled=True).images(0, {})  # nothing to draw: no event file either
    assert not (tmp_path / "no-images").exists()
    before = set(threading.enumerate())
    log = RunLog(tmp_path, enabled=True)
    log.scalars(5, {"loss": 0.5}, prefix="train/")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(5, 0.5)]
    log.images(5, {"pred": torch.zeros(3, 2, 3, dtype=torch.uint8)})
    events.Reload()
    assert [(i.step, i.width, i.height) for i in events.Images("pred")] == [(5, 3, 2)]
    assert set(threading.enumerate()) - before  # the writer's thread
    log.close()
    assert set(threading.enumerate()) - before == set()
