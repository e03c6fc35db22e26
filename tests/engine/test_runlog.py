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
