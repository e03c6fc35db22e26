"""ImageNet classification of MobileNetV3-Large/Small, as torchvision trained the published weights.

    python train_classification.py --recipe recipes/large.yaml [section.key=value ...]
    torchrun --nproc_per_node=8 train_classification.py --recipe recipes/large.yaml
    python train_classification.py --recipe recipes/large.yaml run.eval_only=true model.weights=W.pth

Reads top to bottom: Config, main, train_one_epoch, evaluate.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.classification import (BatchTransform, ClassificationDataConfig, build_loaders, count_images,
                                 slow_decode_note, steps_per_epoch)
from engine import distributed, rundir, seeding
from engine.config import RunConfig
from engine.datacheck import check_images, check_single_image_batch
from engine.loop import (AMP_DTYPES, Accumulate, Loop, check_steps, launch, launch_world_size, plan_batch,
                         set_backends)
from engine.metrics import evaluate_classifier
from engine.optim import EpochSchedule, OptimizerConfig, ScheduleConfig, build_optimizer, param_groups
from models import build, load_weights
from reproduce.report import write_run_report

# ============================================================================ config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: Literal["mobilenet_v3_large", "mobilenet_v3_small"]
    num_classes: int
    dropout: float
    width_mult: float = 1.0
    stochastic_depth: float = 0.0               # drop prob. of the deepest residual branch (linear in depth)
    bn_momentum: float = 0.01                   # torchvision's; short (toy) runs need faster running stats
    weights: Optional[str] = None               # start from (or, with run.eval_only, evaluate) these weights


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    label_smoothing: float
    ema_decay: Optional[float] = None           # EMA of weights, evaluated beside the raw model
    ema_every: int = 1                          # optimizer steps between EMA updates
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: Optional[bool] = None        # None: on (faster for depthwise nets on CPU and CUDA)
    compile: bool = False                       # torch.compile the model
    cudnn_benchmark: bool = True
    clip_grad_norm: Optional[float] = None
    accumulate: Accumulate = "auto"             # micro-batches per optimizer step; auto: reach run.global_batch
    tf32: bool = False                          # TF32 matmuls/convs on Ampere+ GPUs (not the fp32 of the
                                                # published V100-era runs; faster)


@dataclasses.dataclass(frozen=True)
class ExpectedConfig:
    """The published numbers of the row a recipe reproduces (printed beside ours)."""

    acc1: Optional[float] = None
    acc5: Optional[float] = None
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: ClassificationDataConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    train: TrainConfig
    run: RunConfig
    expected: ExpectedConfig


def derived(cfg: Config, world_size: int | None = None, n_train: int | None = None) -> dict:
    """Values computed from the recipe (logged; never written back into it). Without a running
    process group, the world size is this launch's (torchrun's WORLD_SIZE, srun's SLURM_NTASKS, or 1)."""
    world = world_size or launch_world_size()
    plan = plan_batch(cfg.run, cfg.data.batch_size, cfg.train.accumulate, cfg.optimizer.lr_scaling, world)
    out = {**plan.describe(), "lr": cfg.optimizer.lr * plan.lr_scale,
           "torch_rmsprop_eps": cfg.optimizer.torch_eps() if cfg.optimizer.name == "rmsprop" else None}
    if n_train is None:  # --print-config: count the training images when the data is at hand
        n_train = count_images(Path(cfg.data.root) / "train")
    if n_train is not None:
        out["train_images"] = n_train
        micro = steps_per_epoch(n_train, world, cfg.data.batch_size)
        out["optimizer_steps_per_epoch"] = -(-micro // plan.accumulate)
    return out


# ============================================================================ main


def main(cfg: Config) -> dict:
    dist = distributed.init(cfg.run.device)
    device = dist.device
    run = rundir.open_run(cfg, dist, report=write_run_report)
    log = run.log
    seeding.seed_everything(cfg.run.seed + dist.rank)
    set_backends(device, cfg.train.cudnn_benchmark, cfg.train.tf32)
    channels_last = True if cfg.train.channels_last is None else cfg.train.channels_last

    # ---------------------------------------------------------------- data
    train_set, train_loader, val_set, val_loader = build_loaders(cfg.data, cfg.model.num_classes, cfg.run.seed, dist,
                                                                 train=not cfg.run.eval_only,
                                                                 check_val=not cfg.run.check_data)
    if train_set is not None and (note := slow_decode_note()):
        log.info(note)
    batch_tf = BatchTransform(cfg.data.mean, cfg.data.std, channels_last).to(device)
    if cfg.run.check_data:
        items = {p: (ds, i) for ds in (train_set, val_set) if ds is not None  # a shard set's names are no files
                 for i, (p, _) in enumerate(ds.samples)}
        check_images(list(items), lambda p: items[p][0].load(items[p][1]),
                     cfg.data.workers, log)
    per_process = -(-len(train_set) // dist.world_size) if train_set is not None else 0
    if per_process % cfg.data.batch_size == 1:  # kept, as torchvision's reference keeps a short last batch
        check_single_image_batch(
            lambda: build_model(cfg), (3, cfg.data.crop_size, cfg.data.crop_size),
            f"{train_set.split_dir}: {len(train_set)} images over {dist.world_size} process(es) in batches "
            f"of data.batch_size {cfg.data.batch_size} leave a last batch of 1 image per process each epoch",
            "choose a data.batch_size that leaves no short batch or one of 2 or more images")

    # ---------------------------------------------------------------- model
    model = build_model(cfg)
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    amp_dtype = AMP_DTYPES[cfg.train.amp]

    if cfg.run.eval_only:
        metrics = evaluate(model, val_loader, batch_tf, device, amp_dtype, dist)
        log.info(f"eval {cfg.model.weights or '(random init)'} on {len(val_set)} images: "
                 f"Acc@1 {metrics['acc1']:.3f} (published {_fmt(cfg.expected.acc1)})  "
                 f"Acc@5 {metrics['acc5']:.3f} (published {_fmt(cfg.expected.acc5)})")
        run.write_eval({"weights": cfg.model.weights, **metrics})
        return metrics

    # ---------------------------------------------------------------- optimizer, schedule, loop
    plan = plan_batch(cfg.run, cfg.data.batch_size, cfg.train.accumulate, cfg.optimizer.lr_scaling,
                      dist.world_size)
    check_steps(train_loader.batch_sampler, len(train_set), plan)  # an epoch without a step: exit 2
    optimizer, schedule = build_optimizer_and_schedule(cfg, model, plan)
    ema = None
    if cfg.train.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    train_model = torch.compile(model) if cfg.train.compile else model
    if dist.distributed:
        train_model = DistributedDataParallel(train_model, device_ids=[device] if device.type == "cuda" else None)
    loop = Loop(cfg, dist, run, model, optimizer, schedule, plan, train_model=train_model, amp=cfg.train.amp,
                scaler=scaler, ema=ema, ema_every=cfg.train.ema_every, clip_grad_norm=cfg.train.clip_grad_norm)
    loop.resume()
    facts = derived(cfg, dist.world_size, len(train_set))
    run.start(facts)
    log.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
             f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes; "
             + ", ".join(f"{k} {v}" for k, v in facts.items() if v is not None and k != "batch_plan"))
    log.info(plan.summary(cfg.optimizer.lr))
    if cfg.optimizer.name == "rmsprop" and cfg.optimizer.tf_eps is not None:
        log.info(f"rmsprop: tf_eps {cfg.optimizer.tf_eps} -> torch eps sqrt(tf_eps) = {cfg.optimizer.torch_eps():.6g}")

    # ---------------------------------------------------------------- loop
    criterion = build_criterion(cfg)
    metrics: dict = {}
    for epoch in loop.epochs():
        stats = train_one_epoch(train_model, criterion, loop, train_loader, batch_tf, device, epoch)
        metrics = evaluate(model, val_loader, batch_tf, device, amp_dtype, dist)
        if ema is not None:
            metrics.update({f"{k}_ema": v for k, v in
                            evaluate(ema.module, val_loader, batch_tf, device, amp_dtype, dist).items()})
        log.info(f"epoch {epoch}: Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} "
                 f"loss {stats['train_loss']:.4f} lr {stats['lr']:.5g} {stats['images_per_s']:.1f} img/s "
                 f"data-wait {100 * stats['data_wait']:.0f}%")
        loop.end_epoch(epoch, metrics, stats)
    loop.finish()
    return metrics


# ---------------------------------------------------------------- builders (main's parts, also used by the tests)


def build_model(cfg: Config) -> nn.Module:
    return build(cfg.model.name, num_classes=cfg.model.num_classes, width_mult=cfg.model.width_mult,
                 dropout=cfg.model.dropout, stochastic_depth=cfg.model.stochastic_depth,
                 norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=cfg.model.bn_momentum))


def build_optimizer_and_schedule(cfg: Config, model: nn.Module, plan):
    groups = param_groups(model, cfg.optimizer.weight_decay, cfg.optimizer.norm_weight_decay)
    optimizer = build_optimizer(cfg.optimizer, groups, lr_scale=plan.lr_scale)
    return optimizer, EpochSchedule(cfg.schedule, optimizer, lr_scale=plan.lr_scale)


def build_criterion(cfg: Config) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ============================================================================ one epoch


def train_one_epoch(model, criterion, loop: Loop, loader, batch_tf, device, epoch: int) -> dict:
    model.train()
    for images, targets, erase in loop.batches(loader, epoch):
        images = batch_tf(images.to(device, non_blocking=True), erase)
        targets = targets.to(device, non_blocking=True)
        with loop.forward():
            loss = criterion(model(images), targets)
        loop.backward(loss, images=images.shape[0])
    return loop.epoch_stats()


# ============================================================================ evaluation


def evaluate(model, loader, batch_tf, device, amp_dtype, dist: distributed.DistState) -> dict:
    """Acc@1/Acc@5 and val loss over every validation image exactly once (engine.metrics, shared with QAT)."""
    return evaluate_classifier(model, loader, batch_tf, device, dist, amp_dtype)


if __name__ == "__main__":
    launch(Config, main, derived)
