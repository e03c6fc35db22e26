import math

import pytest
import torch

from engine.config import ConfigError, load_config
from engine.optim import EpochSchedule, OptimizerConfig, ScheduleConfig, build_optimizer, param_groups


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def test_rmsprop_uses_sqrt_of_tf_eps():
    cfg = OptimizerConfig(name="rmsprop", lr=0.064, weight_decay=1e-5, momentum=0.9, alpha=0.9, tf_eps=1e-3)
    m = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, param_groups(m, cfg.weight_decay, None))
    assert isinstance(opt, torch.optim.RMSprop) and opt.defaults["eps"] == pytest.approx(math.sqrt(1e-3))
    assert opt.defaults["alpha"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-5


def test_rmsprop_tf_is_timms_with_eps_inside_the_root():
    from timm.optim import RMSpropTF

    cfg = OptimizerConfig(name="rmsprop_tf", lr=0.01, weight_decay=0.0, momentum=0.9, alpha=0.9, tf_eps=1e-3)
    opt = build_optimizer(cfg, param_groups(torch.nn.Linear(2, 2), 0.0, None))
    assert isinstance(opt, RMSpropTF) and opt.defaults["eps"] == 1e-3


def test_norm_and_bias_weight_decay_group():
    m = _model()
    m(torch.zeros(1, 3, 5, 5))
    groups = param_groups(m, 1e-4, 0.0)
    assert [g["weight_decay"] for g in groups] == [1e-4, 0.0]
    assert all(p.ndim > 1 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])


def test_optimizer_config_errors(tmp_path):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class C:
        optimizer: OptimizerConfig

    p = tmp_path / "r.yaml"
    p.write_text("optimizer: {name: rmsprop, lr: 0.1, weight_decay: 0.0, alpha: 0.9, tf_eps: 0.001, eps: 0.1}\n")
    with pytest.raises(ConfigError, match="needs exactly one of tf_eps"):
        load_config(C, p)
    p.write_text("optimizer: {name: sgd, lr: -1.0, weight_decay: 0.0, nesterov: true}\n")
    with pytest.raises(ConfigError) as err:
        load_config(C, p)
    assert len(err.value.problems) == 2


def test_step_schedule_matches_torch_steplr():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.064)
    sched = EpochSchedule(ScheduleConfig(epochs=600, name="step", step_size=2, gamma=0.973), opt)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.064)
    ref = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.973)
    for epoch in range(20):
        assert sched.set(opt, epoch) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        ref_opt.step()
        ref.step()


def test_lr_noise_is_bounded_deterministic_and_in_range():
    def lrs(seed):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
        s = EpochSchedule(ScheduleConfig(epochs=20, name="step", step_size=100, gamma=1.0, lr_noise=(5, 10),
                                         lr_noise_pct=0.3, lr_noise_seed=seed), opt)
        return [s.set(opt, e) for e in range(20)]

    a = lrs(42)
    assert a == lrs(42) and a != lrs(7)  # a function of (seed, epoch) alone: resumes exactly
    assert all(v == 1.0 for e, v in enumerate(a) if not 5 <= e < 10)
    noisy = a[5:10]
    assert all(0.7 < v < 1.3 for v in noisy) and any(v != 1.0 for v in noisy)


def test_cosine_and_warmup_and_multistep():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    s = EpochSchedule(ScheduleConfig(epochs=10, name="multistep", milestones=[4, 8], gamma=0.1, warmup_epochs=2,
                                     warmup_lr_init=0.0), opt)
    assert [round(s.lrs(e)[0], 6) for e in (0, 1, 2, 4, 8)] == [0.0, 0.5, 1.0, 0.1, 0.01]
    c = EpochSchedule(ScheduleConfig(epochs=10, name="cosine", min_lr=0.0), opt)
    assert c.set(opt, 0) == pytest.approx(1.0) and c.set(opt, 5) == pytest.approx(0.5)
