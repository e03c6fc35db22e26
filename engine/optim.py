"""Optimizers and LR schedules shared by the train scripts (sections `optimizer` and `schedule`).

RMSprop and the epsilon question: TensorFlow adds eps inside the square root, PyTorch outside, so
a TF recipe's eps (the paper's 1e-3) becomes sqrt(1e-3) = 0.0316 for torch.optim.RMSprop. A recipe
states `tf_eps` and we convert (and log it); `rmsprop_tf` instead runs timm's RMSpropTF, which puts
eps inside the root like TensorFlow, with `tf_eps` as is.

Schedules are timm's (StepLRScheduler, CosineLRScheduler), stepped once per epoch with the epoch
number, so their whole state is a function of the epoch and resuming needs nothing else.
LR noise (timm's semantics, made explicit): within epochs [lr_noise[0], lr_noise[1]) the epoch's
LR is multiplied by (1 + n), n ~ Normal(0, lr_noise_std) redrawn until |n| < lr_noise_pct (a
truncated, not clipped, normal), drawn from a generator seeded with lr_noise_seed + epoch: the same
noise on every run and every rank. Unlike timm's CLI we never read range values below 1 as
fractions of the run; both ends are epochs. Warmup precedes the decay (decay counts from its end).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["rmsprop", "rmsprop_tf", "sgd", "adamw"]
    lr: float
    weight_decay: float
    momentum: float = 0.0                          # rmsprop, rmsprop_tf, sgd
    norm_weight_decay: Optional[float] = None      # for norm weights and all biases; None = weight_decay
    alpha: Optional[float] = None                  # rmsprop smoothing constant (TF's "decay")
    tf_eps: Optional[float] = None                 # rmsprop: TensorFlow's epsilon; torch uses sqrt(tf_eps)
    eps: Optional[float] = None                    # PyTorch's eps, used as is (not with tf_eps)
    nesterov: bool = False                         # sgd
    betas: tuple[float, float] = (0.9, 0.999)      # adamw
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # when a run's global batch differs from the
                                                   # recipe's run.global_batch: scale lr (and warm-up start
                                                   # values) by global/tuned, or its square root

    def validate(self):
        if self.lr <= 0 or not math.isfinite(self.lr):
            yield "lr", f"expected a positive learning rate, got {self.lr}"
        if self.weight_decay < 0:
            yield "weight_decay", f"expected >= 0, got {self.weight_decay}"
        if not 0 <= self.momentum < 1:
            yield "momentum", f"expected a momentum in [0, 1), got {self.momentum}"
        if self.alpha is not None and not 0 < self.alpha < 1:
            yield "alpha", f"expected a smoothing constant in (0, 1), got {self.alpha}"
        if not all(0 <= b < 1 for b in self.betas):
            yield "betas", f"expected two values in [0, 1), got {list(self.betas)}"
        if self.name in ("rmsprop", "rmsprop_tf"):
            if self.alpha is None:
                yield "alpha", f"required for {self.name} (TF's rmsprop decay, 0.9 in the published recipe)"
            if (self.tf_eps is None) == (self.eps is None):
                yield "tf_eps", f"{self.name} needs exactly one of tf_eps (TensorFlow's value) or eps (PyTorch's)"
        elif self.tf_eps is not None:
            yield "tf_eps", f"only meaningful for rmsprop/rmsprop_tf, not {self.name}"
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            yield "nesterov", "needs name: sgd and momentum > 0"

    def torch_eps(self) -> float:
        """The eps handed to the optimizer implementation."""
        if self.name == "rmsprop":
            return math.sqrt(self.tf_eps) if self.tf_eps is not None else self.eps
        if self.name == "rmsprop_tf":
            return self.tf_eps if self.tf_eps is not None else self.eps ** 2
        return self.eps if self.eps is not None else 1e-8


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    epochs: int
    name: Literal["step", "cosine", "multistep", "poly", "constant"]
    step_size: Optional[int] = None                # step: epochs between decays
    gamma: Optional[float] = None                  # step/multistep: decay factor
    milestones: Optional[list[int]] = None         # multistep
    power: Optional[float] = None                  # poly
    min_lr: float = 0.0                            # cosine
    warmup_epochs: int = 0
    warmup_lr_init: float = 0.0
    lr_noise: Optional[tuple[float, float]] = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0
    lr_noise_seed: int = 42
    warmup_iters: int = 0                          # epoch-0 warm-up over min(warmup_iters, steps/epoch - 1)
    warmup_factor: float = 0.001                   # optimizer steps, from lr x warmup_factor (torchvision's
                                                   # detection LinearLR); applies on top of the schedule
    per_iteration: bool = False                    # evaluate the schedule at fractional epochs every
                                                   # optimizer step (segmentation's per-iteration poly)

    def validate(self):
        if self.epochs <= 0:
            yield "epochs", f"expected a positive number of epochs, got {self.epochs}"
        need = {"step": ("step_size", "gamma"), "multistep": ("milestones", "gamma"), "poly": ("power",)}
        for field in need.get(self.name, ()):
            if getattr(self, field) is None:
                yield field, f"required for schedule name: {self.name}"
        if self.warmup_epochs < 0 or self.warmup_iters < 0:
            yield "warmup_epochs" if self.warmup_epochs < 0 else "warmup_iters", "expected >= 0"
        if not 0 < self.warmup_factor <= 1:
            yield "warmup_factor", f"expected a factor in (0, 1], got {self.warmup_factor}"
        if self.lr_noise is not None and self.per_iteration:
            yield "per_iteration", "LR noise is drawn per epoch: use per_iteration: false with lr_noise"
        if self.lr_noise is not None and not self.lr_noise[0] < self.lr_noise[1]:
            yield "lr_noise", f"expected [start_epoch, end_epoch) with start < end, got {list(self.lr_noise)}"


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: Optional[float]) -> list[dict]:
    """One group, or two when norm weights and biases (every 1-d parameter) get their own decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if norm_weight_decay is None or norm_weight_decay == weight_decay:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": norm_weight_decay}]


def build_optimizer(cfg: OptimizerConfig, groups: list[dict], lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The recipe's optimizer over `groups`; a group may carry its own "lr" (e.g. a head at 10x).
    lr_scale multiplies every LR (the global-batch rule of engine.loop.plan_batch)."""
    lr = cfg.lr * lr_scale
    groups = [{**g, "lr": g["lr"] * lr_scale} if "lr" in g else g for g in groups]
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=cfg.alpha, eps=cfg.torch_eps(), momentum=cfg.momentum)
    if cfg.name == "rmsprop_tf":
        from timm.optim import RMSpropTF

        return RMSpropTF(groups, lr=lr, alpha=cfg.alpha, eps=cfg.torch_eps(), momentum=cfg.momentum)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.torch_eps())
    raise AssertionError(cfg.name)  # the config's Literal rules this out


class EpochSchedule:
    """Sets every group's LR for an optimizer step: `set(optimizer, epoch, step, steps_per_epoch)`.

    step/cosine (with optional LR noise) delegate to timm; multistep/poly/constant are closed
    forms. Stateless by design: the LR depends on (epoch, step) alone, so resume is exact. Epoch-wise
    schedules ignore `step` unless `per_iteration` (then the epoch is epoch + step / steps_per_epoch)
    or the epoch-0 iteration warm-up (`warmup_iters`) applies. Steps are optimizer steps, so gradient
    accumulation does not stretch a per-iteration schedule.
    """

    def __init__(self, cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, lr_scale: float = 1.0):
        self.cfg = cfg
        self.warmup_lr_init = cfg.warmup_lr_init * lr_scale
        self.base = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
        for g, b in zip(optimizer.param_groups, self.base):
            g.setdefault("initial_lr", b)
        self._timm = None
        noise = dict(noise_range_t=list(cfg.lr_noise) if cfg.lr_noise else None, noise_pct=cfg.lr_noise_pct,
                     noise_std=cfg.lr_noise_std, noise_seed=cfg.lr_noise_seed)
        if cfg.name == "step":
            from timm.scheduler import StepLRScheduler

            self._timm = StepLRScheduler(optimizer, decay_t=cfg.step_size, decay_rate=cfg.gamma,
                                         warmup_t=cfg.warmup_epochs, warmup_lr_init=self.warmup_lr_init,
                                         warmup_prefix=True, **noise)
        elif cfg.name == "cosine":
            from timm.scheduler import CosineLRScheduler

            self._timm = CosineLRScheduler(optimizer, t_initial=cfg.epochs - cfg.warmup_epochs, lr_min=cfg.min_lr,
                                           warmup_t=cfg.warmup_epochs, warmup_lr_init=self.warmup_lr_init,
                                           warmup_prefix=True, **noise)
        elif cfg.lr_noise is not None:
            raise ValueError(f"schedule.lr_noise is only supported with step and cosine, not {cfg.name}")

    def lrs(self, epoch: float) -> list[float]:
        cfg = self.cfg
        if epoch < cfg.warmup_epochs:
            f = epoch / cfg.warmup_epochs
            return [self.warmup_lr_init + f * (b - self.warmup_lr_init) for b in self.base]
        if cfg.name == "multistep":
            factor = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        elif cfg.name == "poly":
            factor = max(0.0, 1 - (epoch - cfg.warmup_epochs) / (cfg.epochs - cfg.warmup_epochs)) ** cfg.power
        else:
            factor = 1.0
        return [b * factor for b in self.base]

    def needs_step_updates(self, epoch: int) -> bool:
        """Whether the LR changes within this epoch (else one set() per epoch suffices)."""
        return self.cfg.per_iteration or (epoch == 0 and self.cfg.warmup_iters > 0)

    def set(self, optimizer: torch.optim.Optimizer, epoch: int, step: int = 0,
            steps_per_epoch: int | None = None) -> float:
        """Set the LR of optimizer step `step` (0-based, within `epoch`); returns the first group's."""
        t = epoch + step / steps_per_epoch if self.cfg.per_iteration and steps_per_epoch else epoch
        if self._timm is not None:  # timm's public per-epoch step: base LR, warmup/decay, then noise
            self._timm.step(t)
        else:
            for g, lr in zip(optimizer.param_groups, self.lrs(t)):
                g["lr"] = lr
        if epoch == 0 and steps_per_epoch:
            # torchvision's detection reference: LinearLR(start_factor, total_iters=min(1000, iters - 1))
            # stepped after every iteration of epoch 0, multiplying the epoch's LR (warmup_iters 0: none).
            total = min(self.cfg.warmup_iters, steps_per_epoch - 1)
            if total > 0:
                f = self.cfg.warmup_factor + (1 - self.cfg.warmup_factor) * min(step, total) / total
                for g in optimizer.param_groups:
                    g["lr"] *= f
        return optimizer.param_groups[0]["lr"]
