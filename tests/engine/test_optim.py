import math
from pathlib import Path

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


# --------------------------------------------------------------------------- the published curves
# Expected LRs are computed here from the published formula, not from the project's schedule code.
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("recipe", ["large.yaml", "small.yaml"])
def test_published_recipe_lr_per_epoch(recipe):
    """torchvision's MobileNetV3 recipe: lr 0.064, StepLR(step_size 2, gamma 0.973) per epoch, no
    warm-up: lr(e) = 0.064 * 0.973 ** (e // 2), through the recipe file, build_optimizer and the
    schedule exactly as a training run uses them."""
    from train_classification import Config

    cfg = load_config(Config, ROOT / "recipes" / recipe)
    model = _model()
    model(torch.zeros(1, 3, 5, 5))
    opt = build_optimizer(cfg.optimizer, param_groups(model, cfg.optimizer.weight_decay,
                                                      cfg.optimizer.norm_weight_decay))
    schedule = EpochSchedule(cfg.schedule, opt)
    assert cfg.schedule.epochs == 600
    for epoch in [*range(12), 100, 101, 598, 599]:
        expected = 0.064 * 0.973 ** (epoch // 2)
        assert schedule.set(opt, epoch) == pytest.approx(expected, rel=1e-12), epoch
        assert all(g["lr"] == pytest.approx(expected, rel=1e-12) for g in opt.param_groups), epoch
    assert schedule.set(opt, 599) == pytest.approx(1.78616e-5, rel=1e-5)  # the last epoch's LR, by hand


def test_step_schedule_with_warmup_decays_from_the_end_of_warmup():
    """Linear warm-up from warmup_lr_init over warmup_epochs, then
    lr(e) = base * gamma ** ((e - warmup) // step_size): the decay counts from the end of warm-up."""
    base, init, warmup, step, gamma = 0.5, 0.01, 5, 3, 0.5
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=base)
    s = EpochSchedule(ScheduleConfig(epochs=30, name="step", step_size=step, gamma=gamma, warmup_epochs=warmup,
                                     warmup_lr_init=init), opt)
    for e in range(30):
        expected = init + e / warmup * (base - init) if e < warmup else base * gamma ** ((e - warmup) // step)
        assert s.set(opt, e) == pytest.approx(expected, rel=1e-12), e
    assert s.set(opt, 5) == pytest.approx(0.5) and s.set(opt, 8) == pytest.approx(0.25)


def test_cosine_with_warmup_starts_its_half_period_after_warmup():
    base, init, warmup, epochs, min_lr = 1.0, 0.1, 3, 13, 0.01
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=base)
    s = EpochSchedule(ScheduleConfig(epochs=epochs, name="cosine", min_lr=min_lr, warmup_epochs=warmup,
                                     warmup_lr_init=init), opt)
    for e in range(epochs):
        if e < warmup:
            expected = init + e / warmup * (base - init)
        else:
            progress = (e - warmup) / (epochs - warmup)
            expected = min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * progress))
        assert s.set(opt, e) == pytest.approx(expected, rel=1e-12), e


def test_poly_schedule_per_epoch():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.02)
    s = EpochSchedule(ScheduleConfig(epochs=30, name="poly", power=0.9), opt)
    for e in range(30):
        assert s.set(opt, e) == pytest.approx(0.02 * (1 - e / 30) ** 0.9, rel=1e-12), e


def test_linear_warmup_epochs_of_the_closed_form_schedules():
    """lr(e) = init + e / warmup * (base - init) during warm-up, base after (constant schedule)."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.2)
    s = EpochSchedule(ScheduleConfig(epochs=10, name="constant", warmup_epochs=3, warmup_lr_init=0.02), opt)
    assert [s.set(opt, e) for e in range(5)] == pytest.approx([0.02, 0.08, 0.14, 0.2, 0.2], rel=1e-12)
    assert not s.needs_step_updates(0)


def test_iteration_warmup_of_epoch_0_is_torch_linear_lr():
    """Detection's warmup_iters: epoch 0's LR times torch's LinearLR(start_factor, total_iters) per step."""
    base, factor, iters, steps = 0.02, 0.001, 5, 8
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=base)
    s = EpochSchedule(ScheduleConfig(epochs=3, name="constant", warmup_iters=iters, warmup_factor=factor), opt)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=base)
    ref = torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=factor, total_iters=iters)
    for step in range(steps):
        assert s.set(opt, 0, step, steps) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12), step
        ref_opt.step()
        ref.step()
    assert s.needs_step_updates(0) and not s.needs_step_updates(1)
    assert s.set(opt, 1, 0, steps) == pytest.approx(base)  # epoch 1: no warm-up
    # fewer steps in the epoch than warmup_iters: the warm-up ends at the epoch's last step (steps - 1)
    short = EpochSchedule(ScheduleConfig(epochs=3, name="constant", warmup_iters=1000, warmup_factor=factor), opt)
    assert short.set(opt, 0, 0, 3) == pytest.approx(base * factor)
    assert short.set(opt, 0, 1, 3) == pytest.approx(base * (factor + (1 - factor) / 2))
    assert short.set(opt, 0, 2, 3) == pytest.approx(base)
    plain = EpochSchedule(ScheduleConfig(epochs=3, name="constant"), opt)
    assert plain.set(opt, 0, 0, 3) == pytest.approx(base) and not plain.needs_step_updates(0)


def test_per_iteration_poly_uses_the_fraction_of_the_epoch():
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.02)
    s = EpochSchedule(ScheduleConfig(epochs=30, name="poly", power=0.9, per_iteration=True), opt)
    assert s.set(opt, 2, 50, 100) == pytest.approx(0.02 * (1 - 2.5 / 30) ** 0.9, rel=1e-12)
    assert s.needs_step_updates(5)
    epochwise = EpochSchedule(ScheduleConfig(epochs=30, name="poly", power=0.9), opt)
    assert epochwise.set(opt, 2, 50, 100) == pytest.approx(0.02 * (1 - 2 / 30) ** 0.9, rel=1e-12)


def test_two_groups_split_weights_from_norms_and_biases_by_name():
    """Oracle: the parameters by module, not by dimension: conv and linear weights decay, biases and norm
    weights get norm_weight_decay."""
    m = _model()
    m(torch.zeros(1, 3, 5, 5))
    conv, bn, _, linear = m
    decay, norm = param_groups(m, 1e-4, 0.0)
    assert {id(p) for p in decay["params"]} == {id(conv.weight), id(linear.weight)}
    assert {id(p) for p in norm["params"]} == {id(conv.bias), id(bn.weight), id(bn.bias), id(linear.bias)}
    assert (decay["weight_decay"], norm["weight_decay"]) == (1e-4, 0.0)
    [one] = param_groups(m, 1e-4, None)
    assert len(one["params"]) == 6 and one["weight_decay"] == 1e-4


def test_eps_given_as_pytorch_s_goes_inside_timm_s_root_squared():
    """PyTorch's RMSprop adds eps outside the square root, TF's (timm's RMSpropTF) inside: sqrt(v) + e ~ sqrt(v + e^2)."""
    def eps(**kw):
        return OptimizerConfig(lr=0.01, weight_decay=0.0, momentum=0.9, **kw).torch_eps()

    assert eps(name="rmsprop_tf", alpha=0.9, eps=1e-3) == pytest.approx(1e-6, rel=1e-12)
    assert eps(name="rmsprop", alpha=0.9, eps=1e-3) == 1e-3
    assert eps(name="adamw") == 1e-8 and eps(name="adamw", eps=1e-6) == 1e-6


def test_schedule_section_is_frozen_and_names_the_negative_warm_up():
    """Nothing writes back into the config (DESIGN rule 1); a negative warm-up is named by its own key."""
    import dataclasses

    cfg = ScheduleConfig(epochs=10, name="constant")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 20
    assert list(ScheduleConfig(epochs=10, name="constant", warmup_epochs=-1).validate()) == [
        ("warmup_epochs", "expected >= 0")]
    assert list(ScheduleConfig(epochs=10, name="constant", warmup_iters=-1).validate()) == [
        ("warmup_iters", "expected >= 0")]
    assert list(ScheduleConfig(epochs=10, name="constant", warmup_epochs=0, warmup_iters=0).validate()) == []
    # torchvision's LinearLR start_factor: in (0, 1] (0 would start at lr 0 and LinearLR refuses it)
    for factor, problems in ((0.0, ["warmup_factor"]), (1.0, []), (1.5, ["warmup_factor"]), (1e-3, [])):
        assert [k for k, _ in ScheduleConfig(epochs=10, name="constant", warmup_factor=factor).validate()] == problems


def test_rmsprop_smoothing_constant_is_open_at_both_ends():
    """alpha is TF's RMSProp decay (0.9 in the recipes): 0 keeps no average of squared gradients, 1 never
    updates it; both are refused with the key and the range."""
    def problems(alpha):
        cfg = OptimizerConfig(name="rmsprop", lr=0.064, weight_decay=1e-5, momentum=0.9, alpha=alpha, tf_eps=1e-3)
        return list(cfg.validate())

    assert problems(0.9) == [] and problems(1e-6) == []
    for bad in (0.0, 1.0, -0.1):
        assert problems(bad) == [("alpha", f"expected a smoothing constant in (0, 1), got {bad}")]


def test_nesterov_needs_sgd_with_momentum():
    def problems(**kw):
        base = dict(name="sgd", lr=0.1, weight_decay=0.0, momentum=0.9, nesterov=True)
        return [k for k, _ in OptimizerConfig(**{**base, **kw}).validate()]

    assert problems() == []
    assert problems(momentum=0.0) == ["nesterov"]
    assert problems(name="adamw", momentum=0.0) == ["nesterov"]


def test_optimizer_section_limits_at_both_sides():
    def problems(**kw):
        base = dict(name="sgd", lr=0.1, weight_decay=0.0, momentum=0.9)
        return list(OptimizerConfig(**{**base, **kw}).validate())

    assert problems(lr=1e-12, weight_decay=0.0, momentum=0.0) == [] and problems(momentum=0.999) == []
    for bad in (0.0, -0.1, float("inf"), float("nan")):
        assert [k for k, _ in problems(lr=bad)] == ["lr"], bad
    assert problems(lr=0.0) == [("lr", "expected a positive learning rate, got 0.0")]
    assert problems(weight_decay=-1e-9) == [("weight_decay", "expected >= 0, got -1e-09")]
    for bad in (1.0, -0.1):
        assert problems(momentum=bad) == [("momentum", f"expected a momentum in [0, 1), got {bad}")]
    adamw = dict(name="adamw", momentum=0.0)
    assert problems(**adamw, betas=(0.0, 0.999)) == []
    for bad in ((0.9, 1.0), (-0.1, 0.999)):
        assert [k for k, _ in problems(**adamw, betas=bad)] == ["betas"], bad


def test_schedule_section_names_what_each_schedule_needs_and_lr_noise_limits():
    def problems(**kw):
        return list(ScheduleConfig(**{"epochs": 10, "name": "constant", **kw}).validate())

    assert problems(epochs=1) == [] and problems(epochs=0) == [("epochs", "expected a positive number of epochs, got 0")]
    assert problems(name="step") == [("step_size", "required for schedule name: step"),
                                     ("gamma", "required for schedule name: step")]
    assert problems(name="multistep", gamma=0.1) == [("milestones", "required for schedule name: multistep")]
    assert problems(name="poly") == [("power", "required for schedule name: poly")]
    assert problems(name="cosine") == []
    assert problems(lr_noise=(2, 3)) == []
    assert problems(lr_noise=(3, 3)) == [("lr_noise", "expected [start_epoch, end_epoch) with start < end, got [3, 3]")]
    assert [k for k, _ in problems(lr_noise=(2, 3), per_iteration=True)] == ["per_iteration"]


def test_cosine_without_min_lr_ends_at_0_as_torchs_cosine_annealing():
    """A recipe that states no min_lr anneals to 0, as CosineAnnealingLR's default eta_min."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.4)
    ours = EpochSchedule(ScheduleConfig(epochs=8, name="cosine"), opt)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.4)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=8)
    for epoch in range(8):
        assert ours.set(opt, epoch) == pytest.approx(ref_opt.param_groups[0]["lr"], abs=1e-12), epoch
        ref_opt.step()
        ref.step()


def test_adamw_is_torchs_adamw_with_the_recipe_s_hyperparameters_and_decay_groups():
    """name: adamw builds torch.optim.AdamW with lr, betas and eps (PyTorch's, as given) over the two decay
    groups; the oracle is torch.optim.AdamW built here by hand: the same groups and the same two steps
    (two, since the bias correction makes the first step independent of the betas)."""
    cfg = OptimizerConfig(name="adamw", lr=0.05, weight_decay=0.1, norm_weight_decay=0.0, betas=(0.5, 0.6),
                          eps=0.3)
    models = []
    for _ in range(2):  # each initialised right after its seed (LazyLinear draws at the first forward)
        models.append(_model())
        models[-1](torch.zeros(1, 3, 5, 5))
    ours = build_optimizer(cfg, param_groups(models[0], cfg.weight_decay, cfg.norm_weight_decay))
    decay, norm = param_groups(models[1], 0.1, 0.0)
    ref = torch.optim.AdamW([decay, norm], lr=0.05, betas=(0.5, 0.6), eps=0.3)
    assert type(ours) is torch.optim.AdamW

    def hyper(opt):
        return [(g["lr"], g["betas"], g["eps"], g["weight_decay"], len(g["params"]))
                for g in opt.param_groups]

    assert hyper(ours) == hyper(ref) == [(0.05, (0.5, 0.6), 0.3, 0.1, 2), (0.05, (0.5, 0.6), 0.3, 0.0, 4)]
    for scale in (0.2, 1.5):  # gradients of the size of eps: eps and the betas show in the step
        for m, opt in zip(models, (ours, ref)):
            for i, p in enumerate(m.parameters()):
                p.grad = torch.linspace(-scale, scale, p.numel()).reshape(p.shape) * (i + 1)
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)
    assert not torch.equal(next(models[0].parameters()), next(_model().parameters()))  # it did step


def test_poly_with_warmup_decays_over_the_epochs_after_warmup_as_torchs_polynomial_lr():
    """Warm-up, then torch's PolynomialLR(total_iters=epochs - warmup, power) stepped once per epoch from the
    end of the warm-up: the decay reaches 0 at `epochs` and stays there (no negative base to the power)."""
    base, init, warmup, epochs, power = 0.5, 0.05, 2, 10, 2.0
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=base)
    s = EpochSchedule(ScheduleConfig(epochs=epochs, name="poly", power=power, warmup_epochs=warmup,
                                     warmup_lr_init=init), opt)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=base)
    ref = torch.optim.lr_scheduler.PolynomialLR(ref_opt, total_iters=epochs - warmup, power=power)
    assert [s.set(opt, e) for e in range(warmup)] == pytest.approx([0.05, 0.275], rel=1e-12)  # init + e/2 (base - init)
    for e in range(warmup, epochs + 3):
        assert s.set(opt, e) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), e
        ref_opt.step()
        ref.step()
    assert s.set(opt, 6) == pytest.approx(0.125)  # by hand: 0.5 * (1 - 4/8) ** 2


def _steps(opt, params, grads):
    """One optimizer step per list of gradients."""
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def test_rmsprop_sgd_and_adamw_are_torchs_own_with_the_recipe_s_hyperparameters_and_defaults():
    """Oracle: torch.optim.RMSprop(alpha, eps=sqrt(tf_eps), momentum), torch.optim.SGD(momentum, nesterov) and
    torch.optim.AdamW built here by hand, over the same parameters and gradients; weight decay per group.
    The section is frozen, as every config section."""
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        OptimizerConfig(name="sgd", lr=0.05, weight_decay=0.0).lr = 0.1
    grads = [[torch.tensor([0.3, -0.2, 0.05])], [torch.tensor([-0.1, 0.4, 0.2])]]
    cases = [
        (OptimizerConfig(name="rmsprop", lr=0.05, weight_decay=0.01, momentum=0.8, alpha=0.7, tf_eps=0.01),
         lambda ps: torch.optim.RMSprop(ps, lr=0.05, alpha=0.7, eps=0.1, momentum=0.8, weight_decay=0.01)),
        (OptimizerConfig(name="sgd", lr=0.05, weight_decay=0.01, momentum=0.8, nesterov=True),
         lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
        (OptimizerConfig(name="sgd", lr=0.05, weight_decay=0.0),  # the defaults: no momentum, no nesterov
         lambda ps: torch.optim.SGD(ps, lr=0.05)),
        (OptimizerConfig(name="adamw", lr=0.05, weight_decay=0.01),  # the defaults: torch's betas and eps
         lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.01)),
    ]
    for cfg, by_hand in cases:
        ours_p, ref_p = (torch.nn.Parameter(torch.tensor([1.0, 2.0, -1.0])) for _ in range(2))
        ours = build_optimizer(cfg, [{"params": [ours_p], "weight_decay": cfg.weight_decay}])
        ref = by_hand([ref_p])
        assert type(ours) is type(ref), cfg
        _steps(ours, [ours_p], grads)
        _steps(ref, [ref_p], grads)
        assert torch.equal(ours_p, ref_p), cfg
        assert not torch.equal(ours_p, torch.tensor([1.0, 2.0, -1.0])), cfg


def test_rmsprop_tf_follows_tensorflows_rmsprop_formula():
    """TensorFlow's RMSProp (tf.compat.v1.train.RMSPropOptimizer), which the paper's recipe names: the mean
    square starts at 1, ms = decay * ms + (1 - decay) * g^2, mom = momentum * mom + lr * g / sqrt(ms + eps),
    w -= mom, with eps (tf_eps) inside the square root. Computed here in float64 by hand."""
    lr, decay, momentum, eps = 0.1, 0.9, 0.5, 0.01
    cfg = OptimizerConfig(name="rmsprop_tf", lr=lr, weight_decay=0.0, momentum=momentum, alpha=decay, tf_eps=eps)
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    p = torch.nn.Parameter(w0.clone())
    opt = build_optimizer(cfg, [{"params": [p], "weight_decay": 0.0}])
    grads = [torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64), torch.tensor([2.0, 0.1, -0.3], dtype=torch.float64),
             torch.tensor([-1.0, 0.0, 0.3], dtype=torch.float64)]
    w, ms, mom = w0.tolist(), [1.0] * 3, [0.0] * 3
    for g in grads:
        p.grad = g.clone()
        opt.step()
        for i, gi in enumerate(g.tolist()):
            ms[i] = decay * ms[i] + (1 - decay) * gi * gi
            mom[i] = momentum * mom[i] + lr * gi / math.sqrt(ms[i] + eps)
            w[i] -= mom[i]
        assert p.detach().tolist() == pytest.approx(w, rel=1e-12, abs=1e-15)


def test_lr_scale_multiplies_the_lr_of_every_group_and_the_warm_up_start():
    """The global-batch rule: lr_scale multiplies the recipe's LR, a group's own LR (a head at 10x) and
    warmup_lr_init; the schedule then warms up from the scaled start to each scaled group LR."""
    cfg = OptimizerConfig(name="sgd", lr=0.1, weight_decay=0.0, momentum=0.9)
    body, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, [{"params": body.parameters()}, {"params": head.parameters(), "lr": 1.0}], lr_scale=0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.025, 0.25]
    s = EpochSchedule(ScheduleConfig(epochs=10, name="constant", warmup_epochs=2, warmup_lr_init=0.04), opt,
                      lr_scale=0.25)
    s.set(opt, 0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01], rel=1e-12)
    s.set(opt, 1)  # halfway: 0.01 + (base - 0.01) / 2
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.0175, 0.13], rel=1e-12)
    s.set(opt, 2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.25], rel=1e-12)


def test_lr_noise_with_the_default_pct_std_and_seed_is_timms():
    """A recipe that states only lr_noise gets timm's noise (its defaults noise_pct 0.67, noise_std 1.0,
    noise_seed 42): the same LRs as timm's StepLRScheduler built by hand with noise_range_t alone."""
    from timm.scheduler import StepLRScheduler

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.5)
    ours = EpochSchedule(ScheduleConfig(epochs=12, name="step", step_size=3, gamma=0.5, lr_noise=(2, 10)), opt)
    ref_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.5)
    ref = StepLRScheduler(ref_opt, decay_t=3, decay_rate=0.5, noise_range_t=[2, 10])
    got, expected = [], []
    for e in range(12):
        got.append(ours.set(opt, e))
        ref.step(e)
        expected.append(ref_opt.param_groups[0]["lr"])
    assert got == expected
    assert got[:2] == [0.5, 0.5] and got[10:] == [0.5 * 0.5 ** 3] * 2 and got[2:10] != [0.5, 0.5 * 0.5] * 4
    with pytest.raises(ValueError) as err:  # the closed forms have no noise
        EpochSchedule(ScheduleConfig(epochs=12, name="poly", power=1.0, lr_noise=(2, 10)), opt)
    assert str(err.value) == "schedule.lr_noise is only supported with step and cosine, not poly"


def test_a_resumed_run_keeps_the_recipe_lr_as_the_schedule_s_base():
    """The optimizer state in a checkpoint carries the decayed LR of its last epoch; the schedule built on
    the resumed optimizer keeps the recipe's LR as its base (torch's `initial_lr`), so epoch 6 gets the
    uninterrupted run's LR, as torch's MultiStepLR: 0.4 * 0.1 ** 2."""
    def optimizer():
        return build_optimizer(OptimizerConfig(name="sgd", lr=0.4, weight_decay=0.0, momentum=0.9),
                               [{"params": torch.nn.Linear(2, 2).parameters()}])

    cfg = ScheduleConfig(epochs=10, name="multistep", milestones=[2, 5], gamma=0.1)
    first = optimizer()
    sched = EpochSchedule(cfg, first)
    assert [sched.set(first, e) for e in range(5)] == pytest.approx([0.4, 0.4, 0.04, 0.04, 0.04], rel=1e-12)
    resumed = optimizer()
    resumed.load_state_dict(first.state_dict())
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.04)
    assert EpochSchedule(cfg, resumed).set(resumed, 6) == pytest.approx(0.004, rel=1e-12)


def test_multistep_milestones_are_absolute_epochs_also_at_the_end_of_the_warm_up():
    """torch's MultiStepLR counts milestones from epoch 0; a milestone on the first epoch after the warm-up
    applies there. A warm-up with no warmup_lr_init starts at 0 (the default, timm's)."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    s = EpochSchedule(ScheduleConfig(epochs=6, name="multistep", milestones=[2, 4], gamma=0.5, warmup_epochs=2), opt)
    assert [s.set(opt, e) for e in range(6)] == pytest.approx([0.0, 0.5, 0.5, 0.5, 0.25, 0.25], rel=1e-12)


def test_an_iteration_warm_up_of_one_step_is_torchs_linear_lr_over_one_iteration():
    """warmup_iters 1: torch's LinearLR(start_factor, total_iters=1): step 0 at lr x factor, step 1 at lr."""
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.2)
    s = EpochSchedule(ScheduleConfig(epochs=2, name="constant", warmup_iters=1, warmup_factor=0.25), opt)
    assert [s.set(opt, 0, step, 4) for step in range(3)] == pytest.approx([0.05, 0.2, 0.2], rel=1e-12)
    assert s.needs_step_updates(0) and not s.needs_step_updates(1)
    assert s.set(opt, 0, steps_per_epoch=4) == pytest.approx(0.05)  # no step given: the epoch's first
    # the default factor is torchvision's detection reference's 1 / 1000
    d = EpochSchedule(ScheduleConfig(epochs=2, name="constant", warmup_iters=2), opt)
    assert [d.set(opt, 0, step, 4) for step in range(3)] == pytest.approx([0.2e-3, 0.2 * 0.5005, 0.2], rel=1e-12)
