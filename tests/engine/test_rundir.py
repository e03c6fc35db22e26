"""engine/rundir.py in-process: a fresh run directory, the lock and who holds it, refusing a directory that
holds a run, choosing the checkpoint to resume (and saying why), and refusing or accepting a changed recipe.
Oracles: the files on disk, and the messages the module's docstring promises."""

import dataclasses
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from engine import checkpoint, rundir
from engine.config import RunConfig, load_config, to_dict
from engine.distributed import DistState
from engine.errors import RunDirError


@dataclasses.dataclass(frozen=True)
class Train:
    lr: float
    milestones: tuple[int, int] = (3, 6)


@dataclasses.dataclass(frozen=True)
class Cfg:
    run: RunConfig
    train: Train


def _cfg(out, lr=0.1, **run):
    return Cfg(run=RunConfig(output_dir=str(out), seed=0, **run), train=Train(lr=lr))


def _open(cfg):
    run = rundir.open_run(cfg, DistState())
    run.release()
    return run


def _checkpoints(out, cfg, epochs=2):
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True)
    for e in range(epochs):
        checkpoint.save(checkpoint.new({"w": torch.full((2,), float(e))}, epoch=e, config=to_dict(cfg)),
                        ckpt / f"epoch_{e:03d}.pt")
    (ckpt / "last.pt").write_bytes((ckpt / f"epoch_{epochs - 1:03d}.pt").read_bytes())
    return ckpt


def test_a_fresh_directory_is_created_locked_and_started(tmp_path, capsys):
    out = tmp_path / "a" / "b"
    cfg = _cfg(out)
    run = rundir.open_run(cfg, DistState())
    try:
        assert out.is_dir() and run.state is None and run.changes == {} and run.ckpt_dir == out / "checkpoints"
        assert (out / "run.lock").read_text() == f"host {platform.node()}, pid {os.getpid()}\n"
        run.start({"steps_per_epoch": 7})
        assert load_config(Cfg, out / "config.yaml") == cfg
        env = json.loads((out / "env.json").read_text())
        assert env["derived"] == {"steps_per_epoch": 7} and env["world_size"] == 1 and env["device"] == "cpu"
        assert capsys.readouterr().out == ""  # nothing to say about a fresh run
    finally:
        run.release()
    (out / "run.lock").write_text("host some-old-host-with-a-long-name, pid 123456789\n")
    _open(cfg)  # a stale holder line from a process that ended is replaced, not appended to
    assert (out / "run.lock").read_text() == f"host {platform.node()}, pid {os.getpid()}\n"


def test_a_directory_another_process_holds_is_refused_naming_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.lockf(f, fcntl.LOCK_EX)\n"
         "f.write('host elsewhere, pid 4242\\n'); f.flush(); print('locked', flush=True); time.sleep(60)",
         str(out / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunDirError) as err:
            rundir.open_run(_cfg(out), DistState())
        assert str(err.value) == (f"{out} is in use by another run (host elsewhere, pid 4242; {out / 'run.lock'} is "
                                  "locked); wait for it to end or give this run another run.output_dir")
    finally:
        holder.kill()
        holder.wait()
    _open(_cfg(out))  # the lock went with the process


def test_an_output_dir_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match=f"^run.output_dir: cannot create {tmp_path / 'file' / 'run'} "):
        rundir.open_run(_cfg(tmp_path / "file" / "run"), DistState())


def test_a_directory_holding_a_run_is_refused_without_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n')
    with pytest.raises(RunDirError, match=r"already holds a run \(metrics.jsonl\); continue it with run.resume=auto"):
        _open(_cfg(out))
    _checkpoints(out, _cfg(out), epochs=4)
    with pytest.raises(RunDirError, match=r"already holds a run \(epoch_001.pt, epoch_002.pt, epoch_003.pt\)"):
        _open(_cfg(out))
    assert _open(_cfg(out, eval_only=True)).out_dir == out / "eval"  # an evaluation beside it goes to eval/


def test_resume_auto_takes_last_pt_and_says_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _cfg(out, resume="auto")
    ckpt = _checkpoints(out, cfg)
    (ckpt / ".last.pt.1234.tmp").write_bytes(b"half a save")
    run = _open(cfg)
    assert run.state["epoch"] == 1 and run.resume_path == ckpt / "last.pt" and run.changes == {}
    assert not (ckpt / ".last.pt.1234.tmp").exists()  # an interrupted save's temporary is removed
    assert capsys.readouterr().out == ""


def test_resume_auto_falls_back_to_the_newest_readable_epoch_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _cfg(out, resume="auto")
    ckpt = _checkpoints(out, cfg)
    (ckpt / "last.pt").write_bytes((ckpt / "last.pt").read_bytes()[:100])  # truncated
    run = _open(cfg)
    assert run.state["epoch"] == 1 and run.resume_path == ckpt / "epoch_001.pt"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: {ckpt / 'last.pt'}: not a readable checkpoint")
    assert lines[0].endswith("; trying an older checkpoint")
    assert lines[1] == (f"warning: resuming from {ckpt / 'epoch_001.pt'}, the newest checkpoint that could be read; "
                        "metrics of later epochs are dropped")
    (ckpt / "last.pt").unlink()
    assert _open(cfg).resume_path == ckpt / "epoch_001.pt"
    assert capsys.readouterr().out == (f"warning: {ckpt / 'last.pt'} is missing; resuming from "
                                       f"{ckpt / 'epoch_001.pt'}, the newest epoch checkpoint\n")
    for f in ckpt.glob("epoch_*.pt"):
        f.write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError, match=r"no checkpoint can be read \(epoch_001.pt, epoch_000.pt\)"):
        _open(cfg)


def test_resume_auto_in_an_empty_directory_starts_from_scratch(tmp_path, capsys):
    out = tmp_path / "run"
    run = _open(_cfg(out, resume="auto"))
    assert run.state is None and run.resume_path is None
    assert capsys.readouterr().out == f"run.resume=auto: no checkpoint in {out / 'checkpoints'}, starting from scratch\n"


def test_a_changed_recipe_is_refused_listing_each_key_unless_changes_are_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    ckpt = _checkpoints(out, _cfg(out, resume="auto"))
    before = sorted(p.name for p in ckpt.iterdir())
    with pytest.raises(RunDirError) as err:
        _open(_cfg(out, lr=0.2, resume="auto"))
    assert f"this command differs from the checkpoint {ckpt / 'last.pt'} in\n  train.lr: 0.1 -> 0.2\nNothing" \
        in str(err.value)
    assert sorted(p.name for p in ckpt.iterdir()) == before
    # operational keys change freely; a list in the new config equals the tuple it was saved as
    same = _open(_cfg(out, resume="auto", print_freq=7, keep_checkpoints=3))
    assert same.changes == {} and to_dict(same.cfg)["train"]["milestones"] == [3, 6]
    run = _open(_cfg(out, lr=0.2, resume="auto", allow_changes=True))
    assert run.changes == {"train.lr": (0.1, 0.2)}
    capsys.readouterr()
    run.start({})
    assert capsys.readouterr().out == ("run.allow_changes=true: the recipe changed since the checkpoint; from now on:\n"
                                       "  train.lr: 0.1 -> 0.2\n")


def test_a_changed_recipe_is_refused_against_config_yaml_before_any_checkpoint(tmp_path):
    out = tmp_path / "run"
    first = rundir.open_run(_cfg(out), DistState())
    first.start({})
    first.release()
    with pytest.raises(RunDirError, match=f"differs from {out / 'config.yaml'} in\n  train.lr: 0.1 -> 0.5\n"):
        _open(_cfg(out, lr=0.5, resume="auto"))


def test_diff_names_nested_added_and_removed_keys():
    old = {"a": 1, "s": {"b": [1, 2], "c": 3}, "gone": 0}
    new = {"a": 1, "s": {"b": (1, 2), "c": 4}, "added": {"x": 1}}
    assert rundir._diff(old, new) == {"s.c": (3, 4), "added": (None, {"x": 1}), "gone": (0, None)}


@dataclasses.dataclass(frozen=True)
class Expected:
    acc1: float | None = None


@dataclasses.dataclass(frozen=True)
class EvalCfg:
    run: RunConfig
    expected: Expected


def test_an_evaluation_writes_eval_json_config_env_and_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = EvalCfg(RunConfig(output_dir=str(out), seed=0, eval_only=True), Expected(acc1=75.2))
    written = []

    def report(run_dir):
        written.append(run_dir)
        return run_dir / "report.md"

    run = rundir.open_run(cfg, DistState(), report=report)
    try:
        run.write_eval({"weights": "w.pt", "metrics": {"acc1": 74.9}})
    finally:
        run.release()
    assert json.loads((out / "eval.json").read_text()) == {"weights": "w.pt", "metrics": {"acc1": 74.9},
                                                          "expected": {"acc1": 75.2}}
    assert (out / "eval.json").read_text().endswith("}\n")
    assert load_config(EvalCfg, out / "config.yaml") == cfg and json.loads((out / "env.json").read_text())["world_size"] == 1
    assert written == [out] and capsys.readouterr().out == f"report: {out / 'report.md'}\n"
    quiet = rundir.Run(cfg, DistState(rank=1, world_size=2), out, None, None, None, {}, [])
    quiet.report = report
    quiet.write_report()  # another rank writes no report
    assert written == [out]


def test_a_run_that_fails_to_open_releases_its_lock(tmp_path):
    """A refusal after the lock was taken (here: a directory holding a run, without resume) closes the lock
    file: another process can take the directory at once (a lockf lock lasts as long as its open file), even
    while the exception, whose traceback holds the frame that opened it, is still around (as launch() holds it
    to print it)."""
    out = tmp_path / "run"
    cfg = _cfg(out)
    _checkpoints(out, cfg)
    with pytest.raises(RunDirError, match="already holds a run") as err:  # held: its traceback keeps the frames
        rundir.open_run(cfg, DistState())
    assert err.value is not None
    lock = str(out / "run.lock")
    assert not [fd for fd in os.listdir("/proc/self/fd") if os.path.realpath(f"/proc/self/fd/{fd}") == lock]
    other = subprocess.run([sys.executable, "-c", "import fcntl, sys\nf = open(sys.argv[1], 'a+')\n"
                            "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('taken')", lock],
                           capture_output=True, text=True, timeout=60)
    assert other.stdout == "taken\n", other.stderr


def test_release_gives_the_directory_up_at_once_and_twice_is_harmless(tmp_path):
    out = tmp_path / "run"
    run = rundir.open_run(_cfg(out), DistState())
    run.release()
    run.release()
    other = subprocess.run([sys.executable, "-c", "import fcntl, sys\nf = open(sys.argv[1], 'a+')\n"
                            "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nprint('taken')", str(out / "run.lock")],
                           capture_output=True, text=True, timeout=60)
    assert other.stdout == "taken\n", other.stderr  # `run` is still referenced: release closed the lock itself
    assert run.lock is None


def test_resume_from_an_explicit_path_loads_it_or_names_the_missing_file(tmp_path):
    """run.resume=PATH: that checkpoint (here another directory's), or, when no file is there, a RunDirError
    naming it and run.resume=auto, before anything is read."""
    out, other = tmp_path / "run", tmp_path / "other"
    given = _checkpoints(other, _cfg(out)) / "epoch_000.pt"  # the same recipe: no changes to refuse
    run = _open(_cfg(out, resume=str(given)))
    assert run.state["epoch"] == 0 and run.resume_path == given and run.changes == {}
    missing = tmp_path / "nowhere" / "last.pt"
    with pytest.raises(RunDirError) as err:
        _open(_cfg(out, resume=str(missing)))
    assert str(err.value) == f"run.resume: {missing} does not exist (use run.resume=auto to continue {out})"
    with pytest.raises(RunDirError) as err:  # a directory is no checkpoint file either
        _open(_cfg(out, resume=str(other)))
    assert str(err.value) == (f"run.resume: {other} is a directory, not a checkpoint file (use run.resume=auto to "
                              f"continue {out})")


def test_checkpoints_alone_without_last_pt_or_metrics_still_make_a_run(tmp_path):
    """A run killed between writing its epoch file and linking last.pt (or one whose last.pt was deleted) holds
    epoch files only; one whose epoch files were pruned by hand holds last.pt only. Either is a run to refuse,
    named by what it holds."""
    out = tmp_path / "run"
    ckpt = _checkpoints(out, _cfg(out))
    (ckpt / "last.pt").unlink()
    with pytest.raises(RunDirError, match=r"already holds a run \(epoch_000.pt, epoch_001.pt\); continue it"):
        _open(_cfg(out))
    (ckpt / "last.pt").write_bytes((ckpt / "epoch_001.pt").read_bytes())
    for f in ckpt.glob("epoch_*.pt"):
        f.unlink()
    with pytest.raises(RunDirError, match=r"already holds a run \(last.pt\); continue it"):
        _open(_cfg(out))


def test_resume_auto_without_last_pt_skips_an_unreadable_newest_epoch_and_says_later_metrics_are_dropped(
        tmp_path, capsys):
    """last.pt missing and the newest epoch file truncated: the one before it is resumed, and the warning is the
    one that says later epochs' metrics go (not merely that last.pt is missing)."""
    out = tmp_path / "run"
    cfg = _cfg(out, resume="auto")
    ckpt = _checkpoints(out, cfg, epochs=3)
    (ckpt / "last.pt").unlink()
    (ckpt / "epoch_002.pt").write_bytes((ckpt / "epoch_002.pt").read_bytes()[:100])
    run = _open(cfg)
    assert run.state["epoch"] == 1 and run.resume_path == ckpt / "epoch_001.pt"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"warning: {ckpt / 'epoch_002.pt'}: not a readable checkpoint (")
    assert lines[1] == (f"warning: resuming from {ckpt / 'epoch_001.pt'}, the newest checkpoint that could be read; "
                        "metrics of later epochs are dropped")


def test_an_evaluation_beside_a_training_run_says_where_it_writes(tmp_path, capsys):
    """docs/cluster.md: an eval-only run pointed at a training run's directory writes to its eval/; the user
    is told so, in one line."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n')
    run = _open(_cfg(out, eval_only=True))
    assert run.out_dir == out / "eval" and (out / "eval" / "run.lock").exists() and not (out / "run.lock").exists()
    assert capsys.readouterr().out == f"{out} holds a training run: this evaluation is written to {out / 'eval'}\n"


def test_release_closes_the_lock_file_itself_whoever_else_still_holds_it(tmp_path):
    """The lock lasts as long as its open file: release() must close it, not only drop its reference (a
    traceback or a caller holding the file would otherwise keep the directory locked)."""
    run = rundir.open_run(_cfg(tmp_path / "run"), DistState())
    held = run.lock
    assert not held.closed
    run.release()
    assert held.closed and run.lock is None


def test_a_refused_lock_leaves_no_open_file_for_the_garbage_collector(tmp_path):
    """The lock file of a refused start is closed on the spot (Python reports a file left to the collector
    with a ResourceWarning). The holder here is an open-file-description lock taken in this process: it
    conflicts with lockf's record lock even within one process (fcntl(2)), so no second process is needed."""
    import fcntl
    import struct
    import warnings

    out = tmp_path / "run"
    out.mkdir()
    with open(out / "run.lock", "a+") as other:  # empty: the holder wrote no line yet
        fcntl.fcntl(other, fcntl.F_OFD_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(RunDirError) as err:
                rundir.lock_dir(out)
        assert [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)] == []
    assert str(err.value) == (f"{out} is in use by another run (unknown; {out / 'run.lock'} is locked); wait for it "
                              "to end or give this run another run.output_dir")
    rundir.lock_dir(out).close()  # the holder's lock went with its file
