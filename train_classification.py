"""ImageNet classification of MobileNetV3-Large/Small, as torchvision trained the published weights.

    python train_classification.py --recipe recipes/large.yaml [section.key=value ...]
    torchrun --nproc_per_node=8 train_classification.py --recipe recipes/large.yaml
    python train_classification.py --recipe recipes/large.yaml run.eval_only=true model.weights=W.pth

Reads top to bottom: Config, main, train_one_epoch, evaluate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.classification import (BatchTransform, ClassificationDataConfig, DataError, EpochSampler, ImageFolder,
                                 TrainTransform, count_images, eval_transform, make_loader, steps_per_epoch)
from engine import checkpoint, distributed, runlog, seeding
from engine.config import RunConfig, cli, save_config, to_dict
from engine.metrics import topk_correct
from engine.optim import EpochSchedule, OptimizerConfig, ScheduleConfig, build_optimizer, param_groups
from models import build, load_weights

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
    process group, the world size is torchrun's WORLD_SIZE, else the recipe's run.world_size, else 1."""
    world = world_size or int(os.environ.get("WORLD_SIZE", 0)) or cfg.run.world_size or 1
    out = {"world_size": world, "global_batch": cfg.data.batch_size * world,
           "torch_rmsprop_eps": cfg.optimizer.torch_eps() if cfg.optimizer.name == "rmsprop" else None}
    if n_train is None:  # --print-config: count the training images when the data is at hand
        n_train = count_images(Path(cfg.data.root) / "train")
    if n_train is not None:
        out["train_images"] = n_train
        out["steps_per_epoch"] = steps_per_epoch(n_train, world, cfg.data.batch_size)
    return out


# ============================================================================ main


class NonFiniteLoss(RuntimeError):
    pass


def main(cfg: Config) -> dict:
    dist = distributed.init(cfg.run.device)
    device = dist.device
    out_dir = Path(cfg.run.output_dir)
    log = runlog.RunLog(out_dir, dist.is_main)
    seeding.seed_everything(cfg.run.seed + dist.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    channels_last = True if cfg.train.channels_last is None else cfg.train.channels_last
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.train.amp]

    # ---------------------------------------------------------------- data
    root = Path(cfg.data.root)
    val_set = ImageFolder(root / "val", eval_transform(cfg.data), cfg.run.seed, train=False)
    val_loader = make_loader(val_set, EpochSampler(len(val_set), dist.rank, dist.world_size, cfg.run.seed, False),
                             cfg.data.batch_size, cfg.data.workers, device.type == "cuda")
    batch_tf = BatchTransform(cfg.data.mean, cfg.data.std, channels_last).to(device)
    if not cfg.run.eval_only:
        train_set = ImageFolder(root / "train", TrainTransform(cfg.data), cfg.run.seed, train=True)
        if train_set.classes != val_set.classes:
            raise DataError(f"{root}: train/ and val/ have different class folders")
        train_sampler = EpochSampler(len(train_set), dist.rank, dist.world_size, cfg.run.seed, True)
        train_loader = make_loader(train_set, train_sampler, cfg.data.batch_size, cfg.data.workers,
                                   device.type == "cuda")
    if len(val_set.classes) > cfg.model.num_classes:
        raise DataError(f"{root}: {len(val_set.classes)} classes on disk but model.num_classes is "
                        f"{cfg.model.num_classes}")

    # ---------------------------------------------------------------- model, optimizer, schedule
    model = build(cfg.model.name, num_classes=cfg.model.num_classes, width_mult=cfg.model.width_mult,
                  dropout=cfg.model.dropout, stochastic_depth=cfg.model.stochastic_depth,
                  norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=cfg.model.bn_momentum))
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    if cfg.run.eval_only:
        metrics = evaluate(model, val_loader, batch_tf, device, amp_dtype, dist)
        log.info(f"eval {cfg.model.weights or '(random init)'} on {len(val_set)} images: "
                 f"Acc@1 {metrics['acc1']:.3f} (published {_fmt(cfg.expected.acc1)})  "
                 f"Acc@5 {metrics['acc5']:.3f} (published {_fmt(cfg.expected.acc5)})")
        if dist.is_main:
            checkpoint.atomic_write_text(out_dir / "eval.json", json.dumps(
                {"weights": cfg.model.weights, **metrics, "expected": to_dict(cfg.expected)}, indent=2) + "\n")
        distributed.shutdown()
        return metrics

    ema = None
    if cfg.train.ema_decay is not None:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
    optimizer = build_optimizer(cfg.optimizer, param_groups(model, cfg.optimizer.weight_decay,
                                                            cfg.optimizer.norm_weight_decay))
    schedule = EpochSchedule(cfg.schedule, optimizer)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    facts = derived(cfg, dist.world_size, len(train_set))

    # ---------------------------------------------------------------- run directory and resume
    ckpt_dir = out_dir / "checkpoints"
    start_epoch, history = 0, []
    resume_path = _resume_path(cfg.run.resume, ckpt_dir)
    if resume_path is not None:
        state = checkpoint.load(resume_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and "model_ema" in state:
            ema.module.load_state_dict(state["model_ema"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        rngs = state["rng"]
        if len(rngs) == dist.world_size:
            seeding.set_rng_state(rngs[dist.rank])
        else:
            log.info(f"warning: checkpoint was written by {len(rngs)} processes, this run has {dist.world_size}: "
                     "data order and augmentation resume exactly, dropout/stochastic-depth draws do not")
            seeding.seed_everything(cfg.run.seed + 1000 * start_epoch + dist.rank)
        log.truncate_after(state["epoch"])
        log.info(f"resumed from {resume_path} (epoch {state['epoch']} done); continuing at epoch {start_epoch}")
        changed = _changed_keys(state.get("config", {}), to_dict(cfg))
        if changed:
            log.info(f"note: the recipe differs from the checkpoint's in: {', '.join(changed)}")
    elif cfg.run.resume == "auto":
        log.info(f"run.resume=auto: no checkpoint in {ckpt_dir}, starting from scratch")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        log.write_env({**runlog.environment(dist.world_size, device), "derived": facts})
    log.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
             f"{len(train_set)} train / {len(val_set)} val images, {len(train_set.classes)} classes; "
             + ", ".join(f"{k} {v}" for k, v in facts.items() if v is not None))
    if cfg.run.world_size is not None and cfg.run.world_size != dist.world_size:
        log.info(f"warning: the recipe was tuned for {cfg.run.world_size} processes x {cfg.data.batch_size} = "
                 f"global batch {cfg.run.world_size * cfg.data.batch_size}; this run has {dist.world_size} "
                 f"(global batch {facts['global_batch']}): results will differ from the published ones")
    if cfg.optimizer.name == "rmsprop" and cfg.optimizer.tf_eps is not None:
        log.info(f"rmsprop: tf_eps {cfg.optimizer.tf_eps} -> torch eps sqrt(tf_eps) = {cfg.optimizer.torch_eps():.6g}")

    train_model = model
    if cfg.train.compile:
        train_model = torch.compile(model)
    if dist.distributed:
        train_model = DistributedDataParallel(train_model, device_ids=[device] if device.type == "cuda" else None)

    # ---------------------------------------------------------------- loop
    if start_epoch >= cfg.schedule.epochs:
        log.info(f"all {cfg.schedule.epochs} epochs are done in {out_dir}; nothing to train")
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.schedule.epochs):
        lr = schedule.set(optimizer, epoch)
        train_sampler.set_epoch(epoch)
        stats = train_one_epoch(train_model, criterion, optimizer, train_loader, batch_tf, device, amp_dtype, scaler,
                                ema, cfg, epoch, dist)
        metrics = evaluate(model, val_loader, batch_tf, device, amp_dtype, dist)
        if ema is not None:
            metrics.update({f"{k}_ema": v for k, v in
                            evaluate(ema.module, val_loader, batch_tf, device, amp_dtype, dist).items()})
        history.append({"epoch": epoch, **metrics})
        row = {"epoch": epoch, **metrics, "lr": lr, **stats}
        log.metrics(row)
        log.scalars(epoch, {k: v for k, v in row.items() if k != "epoch"})
        log.info(f"epoch {epoch}: Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} "
                 f"loss {stats['train_loss']:.4f} lr {lr:.5g} {stats['images_per_s']:.1f} img/s "
                 f"data-wait {100 * stats['data_wait']:.0f}%")
        _save(model, optimizer, ema, scaler, cfg, epoch, metrics, history, ckpt_dir, dist)
    log.close()
    distributed.shutdown()
    return metrics


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _resume_path(resume: str | None, ckpt_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        last = ckpt_dir / "last.pt"
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"run.resume: {path} does not exist")
    return path


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def _save(model, optimizer, ema, scaler, cfg: Config, epoch: int, metrics: dict, history: list,
          ckpt_dir: Path, dist: distributed.DistState) -> None:
    rng = seeding.rng_state()
    rngs = [rng]
    if dist.distributed:
        rngs = [None] * dist.world_size
        torch.distributed.all_gather_object(rngs, rng)
    if not dist.is_main:
        return
    state = checkpoint.new(model.state_dict(), optimizer=optimizer.state_dict(), epoch=epoch, metrics=metrics,
                           history=history, config=to_dict(cfg), rng=rngs)
    if ema is not None:
        state["model_ema"] = ema.module.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    epoch_path = ckpt_dir / f"epoch_{epoch:03d}.pt"
    checkpoint.save(state, epoch_path)
    checkpoint.link_or_save(epoch_path, ckpt_dir / "last.pt", state)
    checkpoint.prune(ckpt_dir, cfg.run.keep_checkpoints)


# ============================================================================ one epoch


def train_one_epoch(model, criterion, optimizer, loader, batch_tf, device, amp_dtype, scaler, ema, cfg: Config,
                    epoch: int, dist: distributed.DistState) -> dict:
    model.train()
    total = len(loader)
    progress = runlog.Progress(f"epoch {epoch}", total, cfg.run.print_freq, dist.is_main)
    check_every = 1 if device.type == "cpu" else cfg.run.print_freq  # a host sync per check on GPUs
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)
    n_images, wait = 0, 0.0
    start = tick = time.perf_counter()
    for step, (images, targets, erase) in enumerate(loader):
        wait += time.perf_counter() - tick
        images = batch_tf(images.to(device, non_blocking=True), erase)
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if cfg.train.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None and (step + 1) % cfg.train.ema_every == 0:
            ema.update(model.module if hasattr(model, "module") else model)
        loss = loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        loss_sum += loss
        n_images += images.shape[0]
        if (step + 1) % check_every == 0 or step + 1 == total:
            _check_finite(first_bad, epoch, cfg)
        if progress.due(step):  # .item() syncs with the device: only when a line is printed
            progress.update(step, loss=loss.item(), lr=optimizer.param_groups[0]["lr"],
                            img_s=n_images * dist.world_size / (time.perf_counter() - start))
        tick = time.perf_counter()
    elapsed = time.perf_counter() - start
    sums = distributed.all_reduce_sum(torch.stack([loss_sum, torch.tensor(total, dtype=torch.float64,
                                                                              device=device)]), dist)
    return {"train_loss": (sums[0] / sums[1]).item(), "images_per_s": n_images * dist.world_size / elapsed,
            "data_wait": wait / elapsed}


def _check_finite(first_bad: torch.Tensor, epoch: int, cfg: Config) -> None:
    bad = int(first_bad.item())
    if bad >= 0:
        last = Path(cfg.run.output_dir) / "checkpoints" / "last.pt"
        kept = f"the last good checkpoint {last} is intact" if last.exists() else "no checkpoint was written yet"
        raise NonFiniteLoss(f"training loss is not finite at epoch {epoch}, step {bad}: stopping ({kept}). "
                            "Lower optimizer.lr, check the data, or try train.amp=none.")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ============================================================================ evaluation


@torch.no_grad()
def evaluate(model, loader, batch_tf, device, amp_dtype, dist: distributed.DistState) -> dict:
    """Acc@1/Acc@5 over every validation image exactly once, reduced across ranks."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top1, top5, images
    for images, targets in loader:
        images = batch_tf(images.to(device, non_blocking=True))
        targets = targets.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(images)
        counts[:2] += topk_correct(logits.float(), targets, (1, 5))
        counts[2] += targets.numel()
    counts = distributed.all_reduce_sum(counts, dist)
    n = counts[2].item()
    return {"acc1": 100.0 * counts[0].item() / n, "acc5": 100.0 * counts[1].item() / n, "val_images": int(n)}


def run(argv: list[str] | None = None) -> None:
    cfg = cli(Config, argv, derived=derived)
    try:
        main(cfg)
    except (DataError, NonFiniteLoss, FileNotFoundError, ValueError, KeyError) as exc:
        message = str(exc).strip()
        if "Original Traceback" in message:  # raised in a loader worker: keep the worker's own message
            message = message.splitlines()[-1].split(": ", 1)[-1]
        print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run()
