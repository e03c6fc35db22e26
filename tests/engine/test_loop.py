"""engine/loop.py in-process: the batch plan, gradient accumulation against one big batch, the short
last group, the divergence guard and mid-epoch skipping."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset

from engine.config import ConfigError, RunConfig
from engine.distributed import DistState
from engine.errors import Diverged
from engine.loop import BatchPlan, EpochBatches, Loop, plan_batch
from engine.optim import EpochSchedule, OptimizerConfig, ScheduleConfig, build_optimizer
from engine.runlog import RunLog


def _run_cfg(**kw):
    return RunConfig(output_dir="unused", seed=0, **kw)


def test_plan_auto_meets_the_recipe_global_batch():
    run = _run_cfg(global_batch=1024)
    assert plan_batch(run, 128, "auto", "none", 1).accumulate == 8
    assert plan_batch(run, 128, "auto", "none", 8).accumulate == 1
    p = plan_batch(run, 32, "auto", "none", 2)
    assert (p.accumulate, p.global_batch, p.lr_scale) == (16, 1024, 1.0)


def test_plan_summary_and_description_in_whole_numbers():
    p = plan_batch(_run_cfg(global_batch=1024, world_size=8), 128, "auto", "none", 2)
    assert p.summary(0.1) == ("global batch 1024 = 2 processes x 128 images x 4 accumulation steps "
                              "(the recipe's, tuned on 8 processes)")
    assert p.describe() == {"processes": 2, "batch_per_process": 128, "accumulate": 4, "global_batch": 1024,
                            "recipe_global_batch": 1024, "lr_scaling": "none", "lr_scale": 1.0}
    assert type(p.accumulate) is int and type(p.global_batch) is int
    free = plan_batch(_run_cfg(), 32, "auto", "linear", 1)  # no global batch in the recipe: no accumulation
    assert free.summary(0.1) == "global batch 32 = 1 processes x 32 images x 1 accumulation steps"
    assert (free.accumulate, free.lr_scale) == (1, 1.0)
    fixed = plan_batch(_run_cfg(global_batch=64), 16, 2, "linear", 1)  # 32 of 64: half the LR
    assert fixed.summary(0.1) == ("warning: global batch 32 = 1 processes x 16 images x 2 accumulation steps, but the "
                                  "recipe was tuned for a global batch of 64 on an unstated process count; lr scaled "
                                  "linearly: 0.1 x 0.5 = 0.05: results will differ from the published ones")


def test_plan_that_cannot_meet_the_global_batch_says_what_would():
    with pytest.raises(ConfigError) as err:
        plan_batch(_run_cfg(global_batch=1024), 96, "auto", "none", 1)
    msg = err.value.problems[0]
    assert "run.global_batch=1024" in msg and "1 processes x data.batch_size 96 = 96" in msg
    assert "data.batch_size one of 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024" in msg
    with pytest.raises(ConfigError, match="with data.batch_size=128, a process count of 1, 2, 4, 8;"):
        plan_batch(_run_cfg(global_batch=1024), 128, "auto", "none", 3)


@pytest.mark.parametrize("rule,scale", [("none", 1.0), ("linear", 0.25), ("sqrt", 0.5)])
def test_lr_scaling_rules(rule, scale):
    p = plan_batch(_run_cfg(global_batch=1024), 128, 2, rule, 1)  # 256 of 1024
    assert p.global_batch == 256 and p.lr_scale == pytest.approx(scale)
    opt = build_optimizer(OptimizerConfig(name="sgd", lr=0.02, weight_decay=0, momentum=0.9),
                          [{"params": [nn.Parameter(torch.ones(1))]},
                           {"params": [nn.Parameter(torch.ones(1))], "lr": 0.2}], lr_scale=p.lr_scale)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02 * scale, 0.2 * scale])
    sched = EpochSchedule(ScheduleConfig(epochs=10, name="constant", warmup_epochs=2, warmup_lr_init=0.001), opt,
                          lr_scale=p.lr_scale)
    assert sched.set(opt, 0) == pytest.approx(0.001 * scale)  # warm-up start values scale too
    assert "lr" in p.summary(0.02) and ("warning" in p.summary(0.02))


class _NoLog(RunLog):
    def __init__(self):
        super().__init__("unused", enabled=False)


@dataclasses.dataclass(frozen=True)
class _Schedule:
    epochs: int


@dataclasses.dataclass(frozen=True)
class _Cfg:
    schedule: _Schedule
    run: RunConfig


def _loop(model, optimizer, plan, tmp_path, epochs=1, factor=None, clip=None, print_freq=1000, log=None,
          ema=None, keep_checkpoints=None, state=None, schedule=None, changes=None, **kw):
    cfg = _Cfg(_Schedule(epochs), _run_cfg(print_freq=print_freq, divergence_factor=factor,
                                           keep_checkpoints=keep_checkpoints))
    run = SimpleNamespace(log=log or _NoLog(), ckpt_dir=tmp_path / "checkpoints", out_dir=tmp_path, state=state,
                          changes=changes or {}, resume_path=tmp_path / "checkpoints" / "last.pt")
    schedule = EpochSchedule(schedule or ScheduleConfig(epochs=epochs, name="constant"), optimizer)
    return Loop(cfg, DistState(), run, model, optimizer, schedule, plan, clip_grad_norm=clip, ema=ema, **kw)


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _epoch(loop, model, n, micro, epoch=0, before=None, after=None):
    """One epoch of cross-entropy steps over _data(n) in micro-batches; before(i) / after(i) around each."""
    loader = DataLoader(_data(n), batch_sampler=EpochBatches(SequentialSampler(range(n)), micro))
    for i, (x, y) in enumerate(loop.batches(loader, epoch)):
        if before:
            before(i)
        with loop.forward():
            loss = nn.functional.cross_entropy(model(x), y)
        loop.backward(loss, images=len(x))
        if after:
            after(i)


def _train(opt_cfg, micro, accumulate, n, tmp_path, clip=None):
    model = _model()
    opt = build_optimizer(opt_cfg, [{"params": list(model.parameters()), "weight_decay": opt_cfg.weight_decay}])
    loop = _loop(model, opt, BatchPlan(1, micro, accumulate, None, "none"), tmp_path, clip=clip)
    loader = DataLoader(_data(n), batch_sampler=EpochBatches(SequentialSampler(range(n)), micro))
    steps = 0
    for x, y in loop.batches(loader, 0):
        with loop.forward():
            loss = nn.functional.cross_entropy(model(x), y)
        steps += loop.backward(loss, images=len(x))
    return model, opt, steps, loop.epoch_stats()


@pytest.mark.parametrize("opt_cfg", [
    OptimizerConfig(name="sgd", lr=0.5, weight_decay=1e-2, momentum=0.9),
    OptimizerConfig(name="rmsprop", lr=0.01, weight_decay=1e-2, momentum=0.9, alpha=0.9, tf_eps=1e-3),
], ids=["sgd", "rmsprop"])
def test_four_micro_batches_equal_one_batch_of_four_times_the_size(opt_cfg, tmp_path):
    big, big_opt, big_steps, _ = _train(opt_cfg, micro=32, accumulate=1, n=64, tmp_path=tmp_path, clip=1.0)
    acc, acc_opt, acc_steps, stats = _train(opt_cfg, micro=8, accumulate=4, n=64, tmp_path=tmp_path, clip=1.0)
    assert big_steps == acc_steps == 2 and stats["optimizer_steps"] == 2
    start = _model()
    for p, q, p0 in zip(big.parameters(), acc.parameters(), start.parameters()):
        assert (p - p0).abs().max() > 1e-3  # the update is not degenerate
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_short_last_group_is_stepped_as_the_mean_of_its_micro_batches(tmp_path):
    cfg = OptimizerConfig(name="sgd", lr=0.5, weight_decay=0.0)
    # 40 samples in micro-batches of 8 = 5 micro-batches; groups of 4: [4, 1] -> 2 steps
    acc, _, steps, _ = _train(cfg, micro=8, accumulate=4, n=40, tmp_path=tmp_path)
    assert steps == 2
    ref = _model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    x, y = _data(40).tensors
    for sl in (slice(0, 32), slice(32, 40)):  # plain SGD on the two groups as whole batches
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x[sl]), y[sl]).backward()
        opt.step()
    for p, q in zip(ref.parameters(), acc.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


def test_divergence_guard_names_epoch_and_step(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loop = _loop(model, opt, BatchPlan(1, 4, 1, None, "none"), tmp_path, factor=5.0)
    loader = DataLoader(_data(80), batch_sampler=EpochBatches(SequentialSampler(range(80)), 4))
    with pytest.raises(Diverged) as err:
        for i, (x, y) in enumerate(loop.batches(loader, 0)):
            with loop.forward():
                loss = nn.functional.cross_entropy(model(x), y) * (100.0 if i == 13 else 1.0 + i / 10)
            loop.backward(loss, images=len(x))
    assert "above 5 x the starting loss" in str(err.value) and "at epoch 0, step 13" in str(err.value)
    x, y = _data(80).tensors
    assert loop.loss_reference == pytest.approx(nn.functional.cross_entropy(_model()(x[:4]), y[:4]).item())


def test_epoch_batches_skip_resumes_the_same_order():
    class Shuffled(SequentialSampler):
        def set_epoch(self, epoch):
            self.order = torch.randperm(20, generator=torch.Generator().manual_seed(epoch)).tolist()

        def __iter__(self):
            return iter(self.order)

    b = EpochBatches(Shuffled(range(20)), 3)
    b.set_epoch(4)
    full = list(b)
    b.set_epoch(4, skip=2)
    assert list(b) == full[2:] and len(b) == 5 and b.total() == 7
    b.set_epoch(5)
    assert list(b) != full  # a new order each epoch
    fresh = EpochBatches(SequentialSampler(range(20)), 3)  # before any set_epoch: from the first batch, as DataLoader
    assert len(fresh) == 7 and list(fresh)[0] == [0, 1, 2]


def test_epoch_stats_average_the_loss_and_each_logged_part_over_micro_batches(tmp_path):
    """What detection writes to metrics.jsonl per loss component: the mean over the epoch's micro-batches."""
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loop = _loop(model, opt, BatchPlan(1, 8, 2, None, "none"), tmp_path)
    loader = DataLoader(_data(40), batch_sampler=EpochBatches(SequentialSampler(range(40)), 8))
    parts = [(0.5, 2.0), (1.5, 4.0), (2.5, 0.0), (0.25, 1.0), (0.25, 3.0)]  # 5 micro-batches
    for (x, _), (a, b) in zip(loop.batches(loader, 0), parts):
        with loop.forward():
            loss = model(x).sum() * 0.0 + (a + b)
        loop.backward(loss, images=len(x), logs={"loss_a": torch.tensor(a), "loss_b": torch.tensor(b)})
    stats = loop.epoch_stats()
    assert stats["loss_a"] == pytest.approx(5.0 / 5) and stats["loss_b"] == pytest.approx(10.0 / 5)
    assert stats["train_loss"] == pytest.approx(15.0 / 5)
    assert stats["optimizer_steps"] == 3 and stats["lr"] == 0.0  # groups of 2: [2, 2, 1]
    assert 0.0 <= stats["data_wait"] <= 1.0 and stats["images_per_s"] > 0


class _Printing(RunLog):
    def __init__(self, tmp_path):
        super().__init__(tmp_path, enabled=True)


def test_batch_mode_prints_a_progress_line_every_print_freq_optimizer_steps_and_the_last(tmp_path, capsys):
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    # 44 samples in micro-batches of 4 = 11 micro-batches, groups of 2: 6 optimizer steps
    loop = _loop(model, opt, BatchPlan(1, 4, 2, None, "none"), tmp_path, print_freq=4, log=_Printing(tmp_path))
    _epoch(loop, model, 44, 4, epoch=3)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" eta ")[0] for line in lines] == ["epoch 3 4/6", "epoch 3 6/6"], lines
    assert all(" loss " in line and " lr 0 " in line and " img_s " in line for line in lines), lines


def _constant_losses(loop, model, n, micro, values, logs=None):
    """Feed `values` as the micro-batches' losses (a loss with no gradient: the model does not move)."""
    loader = DataLoader(_data(n), batch_sampler=EpochBatches(SequentialSampler(range(n)), micro))
    for (x, _), v in zip(loop.batches(loader, loop.start_epoch), values):
        with loop.forward():
            loss = model(x).sum() * 0.0 + v
        loop.backward(loss, images=len(x))


def test_the_starting_loss_is_the_mean_of_the_first_group_and_the_guard_says_what_is_kept(tmp_path):
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loop = _loop(model, opt, BatchPlan(1, 4, 3, None, "none"), tmp_path, factor=4.0)
    with pytest.raises(Diverged) as err:  # groups of 3: means 2, 3, then 9 > 4 x 2
        _constant_losses(loop, model, 40, 4, [1.0, 2.0, 3.0, 3.0, 3.0, 3.0, 9.0, 9.0, 9.0, 1.0])
    assert loop.loss_reference == pytest.approx(2.0)
    assert (loop.step, loop.micro) == (3, 9)  # stopped at the bad step, not at the end of the epoch
    assert "above 4 x the starting loss 2 (run.divergence_factor) at epoch 0, step 2" in str(err.value)
    assert "(no checkpoint was written yet)" in str(err.value)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    loop = _loop(model, opt, BatchPlan(1, 4, 1, None, "none"), tmp_path, factor=None)
    with pytest.raises(Diverged) as err:
        _constant_losses(loop, model, 40, 4, [1.0, float("nan")])
    assert f"training loss is not finite at epoch 0, step 1: stopping (the last good checkpoint " \
           f"{tmp_path / 'checkpoints' / 'last.pt'} is intact)" in str(err.value)
    loop = _loop(model, opt, BatchPlan(1, 4, 1, None, "none"), tmp_path, factor=None)
    with pytest.raises(Diverged, match="not finite at epoch 0, step 0:"):  # the very first step
        _constant_losses(loop, model, 40, 4, [float("inf")])


class _Rows(RunLog):
    """metrics.jsonl and the console; TensorBoard's scalars are kept in a list."""

    def __init__(self, tmp_path):
        super().__init__(tmp_path, enabled=True)
        self.tb = []

    def scalars(self, step, values, prefix=""):
        self.tb.append((step, prefix, values))


def test_resume_writes_the_row_of_an_epoch_whose_checkpoint_was_saved_but_not_its_row(tmp_path, capsys):
    from engine import checkpoint
    from engine.runlog import read_metrics

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = _loop(model, opt, BatchPlan(1, 8, 1, None, "none"), tmp_path, epochs=3, log=_Rows(tmp_path))
    _constant_losses(loop, model, 16, 8, [1.0, 2.0])
    loop.end_epoch(0, {"acc1": 12.5, "note": "text"}, loop.epoch_stats())
    rows = read_metrics(tmp_path)
    assert [(r["epoch"], r["acc1"], r["train_loss"]) for r in rows] == [(0, 12.5, 1.5)]
    [(step, prefix, scalars)] = loop.log.tb  # the row's numbers, by epoch
    assert (step, prefix) == (0, "") and {k: v for k, v in rows[0].items() if k not in ("epoch", "note")} == scalars
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_000.pt", "last.pt"]
    assert (ckpt / "epoch_000.pt").read_bytes() == (ckpt / "last.pt").read_bytes()
    (tmp_path / "metrics.jsonl").unlink()  # the process stopped after the checkpoint, before the row
    for _ in range(2):  # a second resume finds the row and does not write it again
        again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"),
                      tmp_path, epochs=3, log=_Rows(tmp_path))
        again.run.state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
        again.run.resume_path = tmp_path / "checkpoints" / "last.pt"
        capsys.readouterr()
        again.resume()
        assert (again.start_epoch, again.start_micro) == (1, 0) and read_metrics(tmp_path) == rows
        assert again.global_step == 2 and again.history == [{"epoch": 0, "acc1": 12.5, "note": "text"}]
        assert capsys.readouterr().out == (f"resumed from {tmp_path / 'checkpoints' / 'last.pt'} (epoch 0 done); "
                                           "continuing at epoch 1\n")
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    del state["row"]  # a checkpoint without its row (an older one): resumed, nothing written back
    (tmp_path / "metrics.jsonl").unlink()
    again.run.state = state
    again.resume()
    assert again.start_epoch == 1 and not (tmp_path / "metrics.jsonl").exists()


def test_a_resume_from_an_older_checkpoint_drops_the_rows_of_the_epochs_it_redoes(tmp_path):
    """Resuming from epoch 0's checkpoint (a newer one was lost), the rows of epochs 1 and 2 go: they are
    redone, and a row must never exist without its checkpoint; epoch 0's row stays."""
    from engine import checkpoint
    from engine.runlog import read_metrics

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = _loop(model, opt, BatchPlan(1, 8, 1, None, "none"), tmp_path, epochs=3, log=_Rows(tmp_path))
    for epoch in range(3):
        loop.start_epoch = epoch
        _constant_losses(loop, model, 16, 8, [1.0 + epoch, 2.0])
        loop.end_epoch(epoch, {"acc1": 10.0 * epoch}, loop.epoch_stats())
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"),
                  tmp_path, epochs=3, log=_Rows(tmp_path))
    state = checkpoint.load(tmp_path / "checkpoints" / "epoch_000.pt")
    del state["row"]  # an older checkpoint without its row: the kept row is the file's own, not a rewrite
    again.run.state, again.run.resume_path = state, tmp_path / "checkpoints" / "epoch_000.pt"
    again.resume()
    assert again.start_epoch == 1
    assert [(r["epoch"], r["acc1"], r["train_loss"]) for r in read_metrics(tmp_path)] == [(0, 0.0, 1.5)]


def test_a_signal_mid_epoch_saves_the_position_and_stops(tmp_path, monkeypatch, capsys):
    import signal

    from engine import checkpoint
    from engine.errors import Preempted

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = _loop(model, opt, BatchPlan(1, 4, 1, None, "none"), tmp_path, epochs=3, log=_Rows(tmp_path))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # not a batch job: nothing to requeue
    loop.start_epoch = 2
    _constant_losses(loop, model, 40, 4, [1.0, 1.0, 1.0])
    with pytest.raises(Preempted) as err:
        loop._stop(signal.SIGUSR1)
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["epoch"] == 1 and state["position"] == {"epoch": 2, "micro": 3}
    assert not list((tmp_path / "checkpoints").glob("epoch_*.pt"))  # mid-epoch: last.pt only
    assert err.value.code == 128 + signal.SIGUSR1
    again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 4, 1, None, "none"),
                  tmp_path, epochs=3, log=_Rows(tmp_path))
    again.run.state, again.run.resume_path = state, tmp_path / "checkpoints" / "last.pt"
    again.resume()  # mid-epoch: no row to write back
    assert (again.start_epoch, again.start_micro) == (2, 3) and not (tmp_path / "metrics.jsonl").exists()
    assert err.value.message == (f"stopped by SIGUSR1 at epoch 2, optimizer step 3/10: "
                                 f"{tmp_path / 'checkpoints' / 'last.pt'} written; the same command resumes exactly")
    assert err.value.message in capsys.readouterr().out.splitlines()  # and in the run's log


def test_a_run_whose_epochs_are_all_done_says_so_and_trains_nothing(tmp_path, capsys):
    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 4, 1, None, "none"), tmp_path,
                 epochs=3, log=_Rows(tmp_path))
    loop.start_epoch = 3
    assert list(loop.epochs()) == []
    assert capsys.readouterr().out == f"all 3 epochs are done in {tmp_path}; nothing to train\n"
    loop.start_epoch = 1
    assert list(loop.epochs()) == [1, 2] and capsys.readouterr().out == ""


def test_clip_grad_norm_scales_the_step_to_the_clipped_gradient(tmp_path):
    """train.clip: one SGD step (lr 1, no momentum) moves the weights by exactly the gradient rescaled to
    norm `clip` (computed here by hand), not by the raw gradient."""
    cfg = OptimizerConfig(name="sgd", lr=1.0, weight_decay=0.0)
    x, y = _data(16)[:]
    start = _model()
    loss = nn.functional.cross_entropy(start(x), y)
    grads = torch.autograd.grad(loss, list(start.parameters()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    clip = 0.05
    assert norm > 10 * clip  # the clip is active
    model = _model()
    opt = build_optimizer(cfg, [{"params": list(model.parameters()), "weight_decay": 0.0}])
    loop = _loop(model, opt, BatchPlan(1, 16, 1, None, "none"), tmp_path, clip=clip)
    loader = DataLoader(TensorDataset(x, y), batch_sampler=EpochBatches(SequentialSampler(range(16)), 16))
    for xb, yb in loop.batches(loader, 0):
        with loop.forward():
            out = nn.functional.cross_entropy(model(xb), yb)
        loop.backward(out, images=len(xb))
    for p, p0, g in zip(model.parameters(), start.parameters(), grads):
        torch.testing.assert_close(p0 - p, g * clip / norm, rtol=1e-4, atol=1e-7)


def test_no_batch_per_process_is_refused_naming_the_process_count_in_words():
    from engine.loop import check_steps

    for world, words in [(1, "0 usable training images over 1 process give no batch"),
                         (2, "0 usable training images over 2 processes give no batch")]:
        with pytest.raises(ConfigError) as exc:
            check_steps(EpochBatches(SequentialSampler(range(0)), 8), 0, BatchPlan(world, 8, 1, None, "none"))
        assert words in exc.value.problems[0]


def test_a_signal_at_the_epochs_short_last_step_resumes_with_the_full_step_count(tmp_path, monkeypatch):
    """40 samples in micro-batches of 8, groups of 4: [4, 1]. A signal agreed after the short last group
    saves micro 5 of 5; the resumed epoch has 2 optimizer steps, as the uninterrupted one (not 5 // 4 = 1)."""
    import signal

    from engine import checkpoint
    from engine.errors import Preempted

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loop = _loop(model, opt, BatchPlan(1, 8, 4, None, "none"), tmp_path, epochs=2, log=_Rows(tmp_path))
    monkeypatch.setattr(loop._preempt, "agreed", lambda: signal.SIGUSR1 if loop.step == 2 else 0)
    loader = DataLoader(_data(40), batch_sampler=EpochBatches(SequentialSampler(range(40)), 8))
    with pytest.raises(Preempted):
        for x, y in loop.batches(loader, 0):
            with loop.forward():
                loss = nn.functional.cross_entropy(model(x), y)
            loop.backward(loss, images=len(x))
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert state["position"] == {"epoch": 0, "micro": 5}
    again_model = _model()
    again = _loop(again_model, torch.optim.SGD(again_model.parameters(), lr=0.1), BatchPlan(1, 8, 4, None, "none"),
                  tmp_path, epochs=2, log=_Rows(tmp_path))
    again.run.state, again.run.resume_path = state, tmp_path / "checkpoints" / "last.pt"
    again.resume()
    assert list(again.batches(loader, 0)) == []  # nothing left of the epoch
    assert again.epoch_stats()["optimizer_steps"] == 2
    _, _, steps, stats = _train(OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.0), 8, 4, 40, tmp_path / "ref")
    assert steps == stats["optimizer_steps"] == 2


def test_a_fresh_start_drops_the_rows_of_a_run_that_never_reached_its_first_checkpoint(tmp_path):
    """metrics.jsonl rows without any checkpoint (the run was killed before its first save): the run starts
    over at epoch 0, so none of them may stay beside the rows it will write."""
    from engine.runlog import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "acc1": 1.0}\n{"epoch": 1, "acc1": 2.0}\n')
    loop = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"),
                 tmp_path, epochs=3, log=_Rows(tmp_path))
    loop.resume()  # run.state None: nothing to resume
    assert loop.start_epoch == 0 and read_metrics(tmp_path) == []


def test_a_checkpoint_of_another_process_count_says_which_draws_do_not_resume_and_reseeds(tmp_path, capsys):
    """Written by 2 processes, resumed by 1: the per-rank RNG states cannot be handed out, so the run says
    what that changes and seeds from run.seed, the epoch and the rank (seed + 1000 x epoch + rank)."""
    from engine import checkpoint

    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3, log=_Rows(tmp_path))
    _constant_losses(loop, model, 16, 8, [1.0, 2.0])
    loop.end_epoch(0, {"acc1": 1.0}, loop.epoch_stats())
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    state["rng"] = state["rng"] * 2
    again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"),
                  tmp_path, epochs=3, log=_Rows(tmp_path))
    again.run.state, again.run.resume_path = state, tmp_path / "checkpoints" / "last.pt"
    capsys.readouterr()
    again.resume()
    draw = torch.rand(4)
    assert torch.equal(draw, torch.rand(4, generator=torch.Generator().manual_seed(0 + 1000 * 1 + 0)))
    assert ("warning: the checkpoint was written by 2 processes, this run has 1: data order and augmentation resume "
            "exactly, dropout and stochastic-depth draws do not") in capsys.readouterr().out


def test_the_ema_is_updated_every_ema_every_optimizer_steps(tmp_path):
    """torchvision's reference updates its EMA after every `model_ema_steps`-th optimizer step: with 2, after
    steps 2 and 4 of 5 (the copy is taken at those steps' weights)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    class Ema:
        module = model

        def update(self, m):
            seen.append(m[0].weight.detach().clone())

    loop = _loop(model, opt, BatchPlan(1, 8, 1, None, "none"), tmp_path, ema=Ema(), ema_every=2)
    weights = []
    _epoch(loop, model, 40, 8, after=lambda i: weights.append(model[0].weight.detach().clone()))
    assert len(weights) == 5 and len(seen) == 2
    assert torch.equal(seen[0], weights[1]) and torch.equal(seen[1], weights[3])


def test_progress_lines_give_the_images_per_second_since_the_epoch_began(tmp_path, capsys, monkeypatch):
    """A clock that moves only when the test says: 4 images per step, 10 s per step, so img_s is 0.4."""
    import engine.loop

    clock = SimpleNamespace(t=0.0)
    monkeypatch.setattr(engine.loop.time, "perf_counter", lambda: clock.t)
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loop = _loop(model, opt, BatchPlan(1, 4, 1, None, "none"), tmp_path, print_freq=2, log=_Printing(tmp_path))
    _epoch(loop, model, 16, 4, before=lambda i: setattr(clock, "t", 10.0 * (i + 1)))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" eta ")[0] for line in lines] == ["epoch 0 2/4", "epoch 0 4/4"], lines
    assert all(line.endswith(" img_s 0.4") for line in lines), lines


def test_long_lists_in_messages_keep_the_first_six_and_the_last_three():
    from engine.loop import _few

    assert _few(list(range(12))) == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11"
    assert _few(list(range(20))) == "0, 1, 2, 3, 4, 5, ..., 17, 18, 19"
    assert _few(list(range(13))) == "0, 1, 2, 3, 4, 5, ..., 10, 11, 12"  # 12 is the most listed whole


def test_the_ema_weights_are_restored_on_resume(tmp_path):
    """The checkpoint holds the EMA model; a resumed run continues averaging from it, not from a fresh copy."""
    from engine import checkpoint

    class Ema:
        def __init__(self, seed):
            torch.manual_seed(seed)
            self.module = nn.Linear(6, 3)

        def update(self, m):
            pass

    model, ema = _model(), Ema(1)
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3, ema=ema)
    _constant_losses(loop, model, 16, 8, [1.0, 2.0])
    loop.end_epoch(0, {"acc1": 1.0}, loop.epoch_stats())
    fresh = Ema(2)
    assert not torch.equal(fresh.module.weight, ema.module.weight)
    again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"),
                  tmp_path, epochs=3, ema=fresh, state=checkpoint.load(tmp_path / "checkpoints" / "last.pt"))
    again.resume()
    assert torch.equal(fresh.module.weight, ema.module.weight) and torch.equal(fresh.module.bias, ema.module.bias)


def test_a_fixed_accumulation_of_1_is_a_plain_step_and_0_is_refused():
    plan = plan_batch(_run_cfg(), 32, 1, "none", 2)
    assert (plan.accumulate, plan.global_batch) == (1, 64)
    with pytest.raises(ConfigError, match="train.accumulate: expected 'auto' or a count >= 1, got 0"):
        plan_batch(_run_cfg(), 32, 0, "none", 2)


def test_each_epoch_end_keeps_the_newest_run_keep_checkpoints_epoch_files(tmp_path):
    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=5, keep_checkpoints=2)
    for epoch in range(4):
        loop.start_epoch = epoch
        _constant_losses(loop, model, 16, 8, [1.0, 2.0])
        loop.end_epoch(epoch, {"acc1": 1.0}, loop.epoch_stats())
        kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
        assert kept == [f"epoch_{e:03d}.pt" for e in range(max(0, epoch - 1), epoch + 1)] + ["last.pt"], kept


def test_on_resume_the_recipes_hyperparameters_replace_the_checkpoints(tmp_path):
    """The optimizer's state (momentum buffers, step counts) comes from the checkpoint, its hyperparameters
    from the recipe: with run.allow_changes a changed weight decay or momentum really takes effect."""
    from engine import checkpoint

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loop = _loop(model, opt, BatchPlan(1, 8, 1, None, "none"), tmp_path, epochs=3, log=_Rows(tmp_path))
    _epoch(loop, model, 16, 8)
    loop.end_epoch(0, {"acc1": 1.0}, loop.epoch_stats())
    new_model = _model()
    new_opt = torch.optim.SGD(new_model.parameters(), lr=0.1, momentum=0.5, weight_decay=1e-3)
    again = _loop(new_model, new_opt, BatchPlan(1, 8, 1, None, "none"), tmp_path, epochs=3, log=_Rows(tmp_path),
                  state=checkpoint.load(tmp_path / "checkpoints" / "last.pt"))
    again.resume()
    group = new_opt.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.5, 1e-3)
    buffers = [new_opt.state[p]["momentum_buffer"] for p in new_model.parameters()]
    assert all(torch.equal(b, opt.state[p]["momentum_buffer"]) for b, p in zip(buffers, model.parameters()))


def test_with_a_grad_scaler_the_clip_and_the_step_see_the_unscaled_gradient_and_the_scale_resumes(tmp_path):
    """train.amp with a GradScaler: the loss is scaled for backward, the gradient unscaled before the clip
    (else the clip would act on a gradient 2^10 times too large) and before the step: the weights are those
    of plain clipped SGD, computed here by hand. The scale grows after every step without inf/nan
    (growth_interval 1) and travels in the checkpoint."""
    from engine import checkpoint

    x, y = _data(16)[:]
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for i in range(2):  # two steps of 8 images, clipped to norm 0.05
        ref_opt.zero_grad()
        nn.functional.cross_entropy(ref(x[8 * i:8 * i + 8]), y[8 * i:8 * i + 8]).backward()
        nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.5), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=2, clip=0.05, scaler=scaler)
    _epoch(loop, model, 16, 8)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert scaler.get_scale() == 2.0 ** 12
    loop.end_epoch(0, {"acc1": 1.0}, loop.epoch_stats())
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0 ** 3, growth_interval=1)
    again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.5), BatchPlan(1, 8, 1, None, "none"),
                  tmp_path, epochs=2, scaler=fresh, state=checkpoint.load(tmp_path / "checkpoints" / "last.pt"))
    again.resume()
    assert fresh.get_scale() == 2.0 ** 12


def test_a_resume_with_recipe_changes_records_them_in_a_row_of_metrics_jsonl(tmp_path):
    """run.allow_changes: what changed since the checkpoint (old and new value per key) is a row of its own,
    beside the epochs' rows, at the epoch the run continues with."""
    from engine import checkpoint

    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3, log=_Rows(tmp_path))
    _constant_losses(loop, model, 16, 8, [1.0, 2.0])
    loop.end_epoch(0, {"acc1": 1.0}, loop.epoch_stats())
    again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"),
                  tmp_path, epochs=3, log=_Rows(tmp_path), state=checkpoint.load(tmp_path / "checkpoints" / "last.pt"),
                  changes={"optimizer.lr": (0.1, 0.05), "schedule.epochs": (2, 3)})
    again.resume()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("row") for r in rows] == [None, "recipe change"] and rows[0]["epoch"] == 0
    assert rows[1] == {"row": "recipe change", "epoch": 1, "changes": {"optimizer.lr": {"old": 0.1, "new": 0.05},
                                                                       "schedule.epochs": {"old": 2, "new": 3}}}


def test_ranks_with_different_batch_counts_are_refused_before_the_epoch_starts(tmp_path, monkeypatch):
    """Every rank must take the same number of optimizer steps (else the all-reduces hang): the counts are
    compared with one max-reduce of (n, -n). Here the other rank is simulated with 7 batches to our 5."""
    import engine.loop
    from engine.errors import UserError

    def other_rank_has_7(t, dist):
        t.copy_(torch.maximum(t, torch.tensor([7, -7])))

    monkeypatch.setattr(engine.loop.distributed, "all_reduce_max", other_rank_has_7)
    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path)
    with pytest.raises(UserError) as err:
        _epoch(loop, model, 40, 8, epoch=0)
    assert str(err.value) == ("epoch 0: the ranks have different numbers of batches (5 to 7); the training "
                              "sampler must pad shards")


def test_epoch_0_warm_up_sets_each_steps_lr_as_torchvisions_linear_lr(tmp_path):
    """schedule.warmup_iters (detection): every optimizer step of epoch 0 gets its own LR, that of
    torch's LinearLR(start_factor=warmup_factor, total_iters=min(warmup_iters, steps - 1)) stepped once per
    iteration; epoch 1 is at the full LR throughout."""
    ref_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.2)
    ref = torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=0.1, total_iters=3)
    expected = []
    for _ in range(5):
        expected.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    loop = _loop(model, opt, BatchPlan(1, 8, 1, None, "none"), tmp_path, epochs=2,
                 schedule=ScheduleConfig(epochs=2, name="constant", warmup_iters=3, warmup_factor=0.1))
    seen = []
    _epoch(loop, model, 40, 8, before=lambda i: seen.append(opt.param_groups[0]["lr"]))
    assert seen == pytest.approx(expected) and expected[0] == pytest.approx(0.02)
    seen.clear()
    _epoch(loop, model, 40, 8, epoch=1, before=lambda i: seen.append(opt.param_groups[0]["lr"]))
    assert seen == pytest.approx([0.2] * 5)


def test_a_signal_during_evaluation_stops_after_the_epochs_checkpoint(tmp_path, monkeypatch, capsys):
    """A signal that arrives while the epoch is evaluated: end_epoch writes the epoch's checkpoint and row
    first, then stops; the message says the checkpoint is the epoch's own."""
    import signal

    from engine import checkpoint
    from engine.errors import Preempted
    from engine.runlog import read_metrics

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3, log=_Rows(tmp_path))
    loop.start_epoch = 1
    _epoch(loop, model, 16, 8, epoch=1)
    monkeypatch.setattr(loop._preempt, "agreed", lambda: signal.SIGTERM)
    with pytest.raises(Preempted) as err:
        loop.end_epoch(1, {"acc1": 3.0}, loop.epoch_stats())
    last = tmp_path / "checkpoints" / "last.pt"
    assert err.value.message == (f"stopped by SIGTERM at the end of epoch 1 (after its evaluation): its "
                                 f"checkpoint {last} written; the same command resumes exactly")
    assert checkpoint.load(last)["position"] == {"epoch": 2, "micro": 0}
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]


def test_a_full_disk_says_whether_a_previous_checkpoint_is_intact(tmp_path, monkeypatch):
    from engine import checkpoint
    from engine.errors import UserError

    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3)
    real_save = checkpoint.save

    def full(state, path):
        raise checkpoint.NoSpace(path)

    monkeypatch.setattr(checkpoint, "save", full)
    _epoch(loop, model, 16, 8)
    with pytest.raises(UserError) as err:
        loop.end_epoch(0, {"acc1": 1.0}, loop.epoch_stats())
    ckpt = tmp_path / "checkpoints"
    assert str(err.value) == (f"no space left on device while writing {ckpt / 'epoch_000.pt'}; no checkpoint was "
                              "written yet")
    monkeypatch.setattr(checkpoint, "save", real_save)
    loop.start_epoch = 0
    _epoch(loop, model, 16, 8)
    loop.end_epoch(0, {"acc1": 1.0}, loop.epoch_stats())
    monkeypatch.setattr(checkpoint, "save", full)
    _epoch(loop, model, 16, 8, epoch=1)
    with pytest.raises(UserError) as err:
        loop.end_epoch(1, {"acc1": 1.0}, loop.epoch_stats())
    assert str(err.value) == (f"no space left on device while writing {ckpt / 'epoch_001.pt'}; the previous "
                              f"checkpoint {ckpt / 'last.pt'} is intact")


def test_save_extra_adds_its_entries_to_every_checkpoint(tmp_path):
    """QAT's observer state and the like: `save_extra()` is called at each save and its keys stored."""
    from engine import checkpoint

    model = _model()
    calls = []
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3, save_extra=lambda: calls.append(1) or {"qat": {"frozen": len(calls)}})
    for epoch in range(2):
        _epoch(loop, model, 16, 8, epoch=epoch)
        loop.end_epoch(epoch, {"acc1": 1.0}, loop.epoch_stats())
    assert checkpoint.load(tmp_path / "checkpoints" / "epoch_000.pt")["qat"] == {"frozen": 1}
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["qat"] == {"frozen": 2}


def test_finish_restores_the_handlers_closes_the_log_writes_the_report_and_releases_the_run(tmp_path):
    import signal

    events = []

    class Log(_NoLog):
        def close(self):
            events.append("close")

    before = signal.getsignal(signal.SIGTERM)
    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3, log=Log())
    assert signal.getsignal(signal.SIGTERM) is not before  # the loop's handler, from its construction on
    loop.run.write_report = lambda: events.append("report")
    loop.run.release = lambda: events.append("release")
    loop.finish()  # no epoch done: no report
    assert events == ["close", "release"] and signal.getsignal(signal.SIGTERM) is before
    events.clear()
    loop.history.append({"epoch": 0, "acc1": 1.0})
    loop.finish()
    assert events == ["close", "report", "release"]


def test_an_epoch_of_one_micro_batch_has_its_loss_as_the_mean_and_says_that_evaluation_begins(tmp_path, capsys):
    model = nn.Linear(6, 3)
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.0), BatchPlan(1, 8, 4, None, "none"), tmp_path,
                 epochs=3, log=_Printing(tmp_path))
    loop.start_epoch = 2
    _constant_losses(loop, model, 8, 8, [2.5])  # 8 images in batches of 8: one micro-batch, one (short) step
    stats = loop.epoch_stats()
    assert (stats["train_loss"], stats["optimizer_steps"]) == (2.5, 1)
    assert capsys.readouterr().out.splitlines()[-1] == "epoch 2: 1 optimizer steps done; evaluating"


def test_the_gradients_are_freed_after_each_optimizer_step(tmp_path):
    """zero_grad(set_to_none=True): no gradient is held between steps, so a parameter that gets none in a
    step is skipped by the optimizer; with zeroed gradients SGD's momentum would still move it."""
    model = nn.Linear(6, 3)
    extra = nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1, momentum=0.9)
    loop = _loop(model, opt, BatchPlan(1, 8, 1, None, "none"), tmp_path)
    loader = DataLoader(_data(16), batch_sampler=EpochBatches(SequentialSampler(range(16)), 8))
    after = []
    for i, (x, y) in enumerate(loop.batches(loader, 0)):
        with loop.forward():
            loss = nn.functional.cross_entropy(model(x), y) + (extra.sum() if i == 0 else 0.0)  # extra: step 0 only
        assert loop.backward(loss, images=len(x))
        assert all(p.grad is None for p in [*model.parameters(), extra])
        after.append(extra.detach().clone())
    assert torch.equal(after[0], torch.full((3,), 0.9)) and torch.equal(after[1], after[0])


def test_a_resume_restores_the_weights_and_leaves_out_an_ema_and_a_scaler_the_run_no_longer_has(tmp_path):
    """A checkpoint of a run with EMA and a GradScaler, resumed with both switched off (model.ema, train.amp
    changed): the model's weights and the epoch's metrics come back, the EMA and scaler entries are ignored."""
    from engine import checkpoint

    class Ema:
        module = nn.Linear(6, 3)

        def update(self, m):
            pass

    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.5), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3, ema=Ema(), scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))
    _epoch(loop, model, 16, 8)
    loop.end_epoch(0, {"acc1": 7.5}, loop.epoch_stats())
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    assert "model_ema" in state and "scaler" in state and state["metrics"] == {"acc1": 7.5}
    again_model = _model()
    assert not torch.equal(again_model[0].weight, model[0].weight)  # trained: not the starting weights
    again = _loop(again_model, torch.optim.SGD(again_model.parameters(), lr=0.5), BatchPlan(1, 8, 1, None, "none"),
                  tmp_path, epochs=3, state=state)
    again.resume()
    for p, q in zip(again_model.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_a_checkpoint_without_a_position_resumes_at_the_start_of_the_next_epoch(tmp_path):
    """An older checkpoint (no position, optimizer-step count or starting loss): its `epoch` is the last one
    done, so the run continues at the next epoch's first micro-batch, counting optimizer steps from 0."""
    from engine import checkpoint

    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=5)
    loop.start_epoch = 1
    _constant_losses(loop, model, 16, 8, [1.0, 2.0])
    loop.end_epoch(1, {"acc1": 1.0}, loop.epoch_stats())
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    for key in ("position", "global_step", "loss_reference"):
        del state[key]
    again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"),
                  tmp_path, epochs=5, state=state)
    again.resume()
    assert (again.start_epoch, again.start_micro, again.global_step, again.loss_reference) == (2, 0, 0, None)


def test_with_ddp_only_the_last_micro_batch_of_a_group_synchronises_gradients(tmp_path):
    """DDP's all-reduce runs only for a group's last micro-batch (no_sync for the others: DDP decides in the
    forward pass). 10 micro-batches in groups of 4: [4, 4, 2]. A one-process gloo group, in-process."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _model()
        ddp = DistributedDataParallel(model)
        synced = []
        model.register_forward_pre_hook(lambda m, args: synced.append(ddp.require_backward_grad_sync))
        loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 4, 4, None, "none"), tmp_path,
                     train_model=ddp)
        _epoch(loop, ddp, 40, 4)
    finally:
        dist.destroy_process_group()
    assert synced == [False, False, False, True, False, False, False, True, False, True]
    assert loop.step == 3


def test_srun_with_several_tasks_counts_them_as_processes(monkeypatch):
    from engine.loop import launch_world_size

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    for ntasks, processes in [("2", 2), ("1", 1)]:
        monkeypatch.setenv("SLURM_NTASKS", ntasks)
        assert launch_world_size() == processes
    monkeypatch.setenv("WORLD_SIZE", "3")  # torchrun's count first
    assert launch_world_size() == 3


def test_cudnn_autotuning_is_set_for_a_cuda_device_only_and_tf32_for_any():
    from engine.loop import set_backends

    backends = torch.backends
    saved = backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    try:
        backends.cudnn.benchmark = False
        set_backends(torch.device("cpu"), True, True)
        assert (backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32) == \
            (False, True, True)
        set_backends(torch.device("cuda"), True, False)  # flags only: no GPU needed
        assert (backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32) == \
            (True, False, False)
    finally:
        backends.cudnn.benchmark, backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = saved


class _Timed(TensorDataset):
    """Each sample takes 1 s of the test's clock to load."""

    def __init__(self, clock, n):
        super().__init__(*_data(n).tensors)
        self.clock = clock

    def __getitem__(self, i):
        self.clock.t += 1.0
        return super().__getitem__(i)


def test_two_ranks_starting_loss_epoch_loss_and_throughput_are_over_both(tmp_path, monkeypatch, capsys):
    """Rank 0 of 2, the other rank simulated in the collectives: its first step's loss is 5 (ours 1), so the
    starting loss is 3; its 2 micro-batches sum to 10 (ours 1 + 3), so the epoch's loss is 14 / 4; it loads
    as many images, so images/s count ours twice. The clock (from 100 s): 4 s to load each batch of 4,
    6 s per step: 2 steps in 20 s, 8 s of them waiting for data."""
    import engine.loop

    clock = SimpleNamespace(t=100.0)
    monkeypatch.setattr(engine.loop.time, "perf_counter", lambda: clock.t)

    def all_reduce_sum(t, dist):
        return t.add_(5.0 if t.dim() == 0 else torch.tensor([10.0, 2.0], dtype=t.dtype))  # sorted keys: loss, micro

    monkeypatch.setattr(engine.loop.distributed, "all_reduce_sum", all_reduce_sum)
    monkeypatch.setattr(engine.loop.distributed, "all_reduce_max", lambda t, dist: t)  # the same counts, no bad step
    model = nn.Linear(6, 3)
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.0), BatchPlan(2, 4, 1, None, "none"), tmp_path,
                 factor=10.0, print_freq=2, log=_Printing(tmp_path))
    loop.dist = DistState(rank=0, world_size=2)
    loader = DataLoader(_Timed(clock, 8), batch_sampler=EpochBatches(SequentialSampler(range(8)), 4))
    for (x, _), v in zip(loop.batches(loader, 0), [1.0, 3.0]):
        clock.t += 6.0
        with loop.forward():
            loss = model(x).sum() * 0.0 + v
        loop.backward(loss, images=len(x))
    assert loop.loss_reference == 3.0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("epoch 0 2/2 ") and line.endswith(" img_s 0.8"), line  # 2 x 8 images in 20 s
    stats = loop.epoch_stats()
    assert stats["train_loss"] == 14.0 / 4
    assert stats["images_per_s"] == pytest.approx(0.8) and stats["data_wait"] == pytest.approx(0.4)


@dataclasses.dataclass(frozen=True)
class _LaunchCfg:
    run: RunConfig


def test_launch_prints_a_user_facing_error_as_one_message_and_exits_1(tmp_path, capsys, monkeypatch):
    """launch(): a KeyError's quotes go (str(KeyError) adds them), other messages keep theirs; a loader worker's
    error (its text holds the worker's traceback) is shown from its last `Type: message` line on, or by its
    type alone without a message, or by its last line when it has no such line; a preemption passes through."""
    import sys

    from engine.errors import Preempted, UserError
    from engine.loop import launch

    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: {output_dir: out, seed: 0}\n")
    monkeypatch.setattr(sys, "argv", ["/somewhere/train_x.py"])
    worker = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "/x/worker.py", line 309, in _worker_loop\n    data = fetcher.fetch(index)\n')
    for exc, shown in [(KeyError("model_ema"), "model_ema"),
                       (UserError("expected 'a' or \"b\""), "expected 'a' or \"b\""),
                       (FileNotFoundError("/d/x.jpg: not found"), "/d/x.jpg: not found"),
                       (ValueError(worker + "engine.errors.DataError"), "engine.errors.DataError"),
                       (ValueError(worker.rstrip("\n")), "data = fetcher.fetch(index)")]:
        def main(cfg, exc=exc):
            raise exc

        with pytest.raises(SystemExit) as exit_:
            launch(_LaunchCfg, main, argv=["--recipe", str(recipe)])
        assert exit_.value.code == 1 and capsys.readouterr().err == f"train_x.py: error: {shown}\n", exc

    def preempted(cfg):
        raise Preempted(15, "stopped by SIGTERM")

    with pytest.raises(Preempted) as exit_:
        launch(_LaunchCfg, preempted, argv=["--recipe", str(recipe)])
    assert exit_.value.code == 143 and capsys.readouterr().err == ""


def test_a_signal_in_a_slurm_job_requeues_it_says_so_and_closes_the_log(tmp_path, monkeypatch, capsys):
    """SIGUSR1 (SLURM's time-limit warning) in a batch job: `scontrol requeue JOB` (faked here), the message
    says the job was requeued, the log (TensorBoard's writer) is closed; the mid-epoch checkpoint has no
    metrics (none were computed)."""
    import signal

    from engine import checkpoint, preemption
    from engine.errors import Preempted

    calls, closed = [], []

    def scontrol(cmd, **kw):
        calls.append(cmd)
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    class Log(_Rows):
        def close(self):
            closed.append(True)
            super().close()

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(preemption, "subprocess", SimpleNamespace(run=scontrol))
    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=2, log=Log(tmp_path))
    monkeypatch.setattr(loop._preempt, "agreed", lambda: signal.SIGUSR1 if loop.step == 2 else 0)
    with pytest.raises(Preempted) as err:
        _epoch(loop, model, 40, 8)
    last = tmp_path / "checkpoints" / "last.pt"
    assert err.value.message == (f"stopped by SIGUSR1 at epoch 0, optimizer step 2/5: {last} written; the same "
                                 "command resumes exactly (requeued SLURM job 42)")
    assert calls == [["scontrol", "requeue", "42"]] and closed == [True]
    state = checkpoint.load(last)
    assert state["position"] == {"epoch": 0, "micro": 2} and state["metrics"] == {}


def test_progress_lines_show_each_steps_loss_as_the_mean_of_its_group(tmp_path, capsys):
    """14 micro-batches in groups of 2: 7 optimizer steps; with run.print_freq=3 a line after steps 3 and 6
    and the last, each with the mean loss of that step's group."""
    model = nn.Linear(6, 3)
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.0), BatchPlan(1, 4, 2, None, "none"), tmp_path,
                 print_freq=3, log=_Printing(tmp_path))
    _constant_losses(loop, model, 56, 4, [1.0, 3.0, 5.0, 7.0, 1.0, 2.0, 4.0, 8.0, 0.0, 1.0, 9.0, 3.0, 4.0, 6.0])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" eta ")[0] for line in lines] == ["epoch 0 3/7", "epoch 0 6/7", "epoch 0 7/7"], lines
    assert [line.split(" loss ")[1].split()[0] for line in lines] == ["1.5", "6", "5"], lines


def test_on_a_gpu_the_guard_checks_every_print_freq_steps_and_names_the_first_bad_step(tmp_path):
    """On a GPU the guard's .item() (a sync) runs every run.print_freq optimizer steps and after the epoch's
    last; it names the first bad step since the last check, though later ones are bad too."""
    model = nn.Linear(6, 3)
    nan = float("nan")
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.0), BatchPlan(1, 4, 1, None, "none"), tmp_path,
                 print_freq=4)
    loop._check_every = 4  # what a CUDA device gets (run.print_freq); a CPU checks every step
    with pytest.raises(Diverged, match="is not finite at epoch 0, step 0:"):
        _constant_losses(loop, model, 24, 4, [nan, 1.0, nan, 1.0, 1.0, 1.0])
    assert loop.step == 4  # found at the check after step 4, not at once
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.0), BatchPlan(1, 4, 1, None, "none"), tmp_path,
                 print_freq=4)
    loop._check_every = 4
    with pytest.raises(Diverged, match="is not finite at epoch 0, step 5:"):  # 6 steps: found at the epoch's end
        _constant_losses(loop, model, 24, 4, [1.0, 1.0, 1.0, 1.0, 1.0, nan])
    assert loop.step == 6


def test_a_loss_of_exactly_the_factor_times_the_starting_loss_is_not_divergence(tmp_path):
    model = nn.Linear(6, 3)
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.0), BatchPlan(1, 4, 1, None, "none"), tmp_path,
                 factor=4.0)
    with pytest.raises(Diverged, match="above 4 x the starting loss 2 .* at epoch 0, step 2:"):
        _constant_losses(loop, model, 16, 4, [2.0, 8.0, 8.5, 1.0])


def test_a_resumed_rank_continues_its_own_random_stream_or_reseeds_by_its_rank(tmp_path):
    """Rank 1 of 2: from a checkpoint of 2 processes it takes the second RNG state; from one of 1 process
    it seeds with run.seed + 1000 x epoch + rank."""
    from engine import checkpoint, seeding

    model = _model()
    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"), tmp_path,
                 epochs=3)
    _constant_losses(loop, model, 16, 8, [1.0, 2.0])
    loop.end_epoch(0, {"acc1": 1.0}, loop.epoch_stats())
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    states, draws = [], []
    for seed in (11, 22):
        torch.manual_seed(seed)
        states.append(seeding.rng_state())
        draws.append(torch.rand(3))
    for rngs, expected in [(states, draws[1]),
                           (states[:1], torch.rand(3, generator=torch.Generator().manual_seed(0 + 1000 * 1 + 1)))]:
        torch.manual_seed(99)
        again = _loop(_model(), torch.optim.SGD(_model().parameters(), lr=0.1), BatchPlan(1, 8, 1, None, "none"),
                      tmp_path, epochs=3, state={**state, "rng": rngs})
        again.dist = DistState(rank=1, world_size=2)
        again.resume()
        assert torch.equal(torch.rand(3), expected)


def test_a_per_iteration_schedule_sets_each_optimizer_steps_lr_and_leaves_the_last_steps(tmp_path):
    """schedule.per_iteration (poly, power 1, 2 epochs): optimizer step s of epoch e (8 micro-batches in groups of
    2: 4 steps) has lr 0.4 x (1 - (e + s / 4) / 2). After the epoch's last step the LR stays that step's (the
    epoch's checkpoint records it; the next epoch sets its own); the epoch's row has its first step's."""
    from engine import checkpoint

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    loop = _loop(model, opt, BatchPlan(1, 4, 2, None, "none"), tmp_path, epochs=2,
                 schedule=ScheduleConfig(epochs=2, name="poly", power=1.0, per_iteration=True))
    seen = []
    _epoch(loop, model, 32, 4, before=lambda i: seen.append(opt.param_groups[0]["lr"]))
    assert seen == pytest.approx([0.4, 0.4, 0.35, 0.35, 0.3, 0.3, 0.25, 0.25])
    stats = loop.epoch_stats()
    loop.end_epoch(0, {"acc1": 1.0}, stats)
    assert stats["lr"] == pytest.approx(0.4)
    lr = checkpoint.load(tmp_path / "checkpoints" / "epoch_000.pt")["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(0.25)


def test_the_ema_is_updated_after_every_optimizer_step_by_default(tmp_path):
    model = _model()
    updates = []

    class Ema:
        module = model

        def update(self, m):
            updates.append(1)

    loop = _loop(model, torch.optim.SGD(model.parameters(), lr=0.1), BatchPlan(1, 8, 2, None, "none"), tmp_path,
                 ema=Ema())
    _epoch(loop, model, 40, 8)  # 5 micro-batches in groups of 2: 3 optimizer steps
    assert len(updates) == 3


def test_plan_that_cannot_meet_the_global_batch_lists_the_batch_sizes_and_process_counts_that_would():
    """run.global_batch=96 with 2 processes x 32: per process 48, whose divisors are the batch sizes; with 32
    images per process, 96 = 1 x 32 x 3 or 3 x 32 x 1 (2 x 32 = 64 does not divide 96)."""
    with pytest.raises(ConfigError) as err:
        plan_batch(_run_cfg(global_batch=96), 32, "auto", "none", 2)
    assert err.value.problems == [
        "train.accumulate=auto: the recipe's global batch (run.global_batch=96) is not a multiple of 2 processes x "
        "data.batch_size 32 = 64; it would be met exactly with 2 processes, data.batch_size one of 1, 2, 3, 4, 6, 8, "
        "12, 16, 24, 48; with data.batch_size=32, a process count of 1, 3; or an explicit train.accumulate=N with "
        "optimizer.lr_scaling=linear|sqrt|none"]
    with pytest.raises(ConfigError) as err:  # 100 is a multiple of neither 3 nor 7: only the explicit way
        plan_batch(_run_cfg(global_batch=100), 7, "auto", "none", 3)
    assert err.value.problems == [
        "train.accumulate=auto: the recipe's global batch (run.global_batch=100) is not a multiple of 3 processes x "
        "data.batch_size 7 = 21; it would be met exactly or an explicit train.accumulate=N with "
        "optimizer.lr_scaling=linear|sqrt|none"]
