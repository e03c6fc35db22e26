"""Semantic segmentation on COCO with the 20 VOC categories: LR-ASPP, DeepLabV3 and FCN on a dilated
MobileNetV3-Large, as torchvision trained the published COCO_WITH_VOC_LABELS_V1 weights.

    python train_segmentation.py --recipe recipes/segmentation/lraspp_mobilenet_v3_large.yaml \
        data.root=/data/coco model.backbone_weights=mobilenet_v3_large-8738ca79.pth [section.key=value ...]
    torchrun --nproc_per_node=8 train_segmentation.py --recipe recipes/segmentation/lraspp_mobilenet_v3_large.yaml
    python train_segmentation.py --recipe recipes/segmentation/lraspp_mobilenet_v3_large.yaml run.eval_only=true \
        model.weights=lraspp_mobilenet_v3_large-d234d4ea.pth [data.eval_size=320]

Reads top to bottom: Config, main, train_one_epoch, evaluate. The models are models/segmentation.py
(torchvision's heads on this project's MobileNetV3, torchvision's state-dict layout); the data and
its transforms are data/segmentation.py; the metric is engine/confusion.py.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler

from data.classification import BatchTransform, EpochSampler, decode, decode_bytes, make_loader
from data.segmentation import (IGNORE_INDEX, NUM_CLASSES, VOC_CLASSES, CocoVoc, EvalTransform,
                               SegmentationDataConfig, SizeGroupedBatches, TrainTransform, cached_image_count,
                               overlay)
from engine import distributed, rundir, seeding
from engine.config import RunConfig
from engine.confusion import confusion_matrix, segmentation_scores
from engine.datacheck import check_images, check_single_image_batch, check_val_images
from engine.loop import (AMP_DTYPES, Accumulate, EpochBatches, Loop, check_steps, launch, launch_world_size,
                         plan_batch, set_backends)
from engine.optim import EpochSchedule, OptimizerConfig, ScheduleConfig, build_optimizer, param_groups
from models import build, load_weights
from reproduce.report import write_run_report

# ============================================================================ config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: Literal["lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_mobilenet_v3_large"]
    num_classes: int                            # 21: background + the 20 VOC categories
    aux_loss: bool                              # FCN head on block4 (OS 8), trained with train.aux_weight
    backbone_weights: Optional[str]             # ImageNet weights (torchvision's file or a checkpoint of
                                                # train_classification.py; classifier ignored); loaded into
                                                # the dilated backbone (dilation has no weights)
    weights: Optional[str] = None               # whole-model weights to start from or (run.eval_only) evaluate
    bn_momentum: Optional[float] = None         # None: torchvision's (0.01 backbone, 0.1 heads); short
                                                # (toy) runs need faster running statistics

    def validate(self):
        if self.aux_loss and self.name == "lraspp_mobilenet_v3_large":
            yield "aux_loss", "LR-ASPP has no auxiliary head (torchvision's builder takes no aux_loss)"
        if self.num_classes != NUM_CLASSES:
            yield "num_classes", f"the COCO->VOC data has {NUM_CLASSES} classes, got {self.num_classes}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    sync_bn: bool                               # SyncBatchNorm when distributed (CUDA; the published runs)
    aux_weight: float                           # loss = out + aux_weight * aux (0.5 published)
    aux_lr_mult: float                          # the aux head's LR = lr x this (10 published)
    accumulate: Accumulate = "auto"             # micro-batches per optimizer step; auto: meet run.global_batch
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = True                  # faster for depthwise nets (CPU measured, see README)
    cudnn_benchmark: bool = False               # off: evaluation sees many image sizes
    tf32: bool = False
    draw_images: int = 4                        # val images drawn with predictions in TensorBoard each epoch

    def validate(self):
        if self.aux_weight < 0:
            yield "aux_weight", f"expected >= 0, got {self.aux_weight}"
        if self.aux_lr_mult <= 0:
            yield "aux_lr_mult", f"expected > 0, got {self.aux_lr_mult}"


@dataclasses.dataclass(frozen=True)
class ExpectedConfig:
    """The published numbers of the row a recipe reproduces (printed beside ours)."""

    miou: Optional[float] = None                # percent, COCO val2017, 21 classes
    pixel_acc: Optional[float] = None           # global pixel accuracy, percent
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: SegmentationDataConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    train: TrainConfig
    run: RunConfig
    expected: ExpectedConfig



def derived(cfg: Config, world_size: int | None = None, n_train: int | None = None) -> dict:
    """Values computed from the recipe (logged; never written back into it). Without a process group the
    world size is the launch's (torchrun's WORLD_SIZE, srun's SLURM_NTASKS, or 1)."""
    world = world_size or launch_world_size()
    plan = plan_batch(cfg.run, cfg.data.batch_size, cfg.train.accumulate, cfg.optimizer.lr_scaling, world)
    lr = cfg.optimizer.lr * plan.lr_scale
    out = {**plan.describe(), "lr": lr, "aux_lr": lr * cfg.train.aux_lr_mult if cfg.model.aux_loss else None}
    if n_train is None:  # --print-config: the count an earlier run cached (COCO's file takes ~20 s to parse)
        n_train = cached_image_count(cfg.data.root, "train", cfg.data.cache_dir())
    if n_train is not None:
        micro = (-(-n_train // world)) // cfg.data.batch_size  # per rank; the last short batch is dropped
        out.update(train_images=n_train, optimizer_steps_per_epoch=-(-micro // plan.accumulate))
    return out


# ============================================================================ main


def main(cfg: Config) -> dict:
    dist = distributed.init(cfg.run.device)
    run = rundir.open_run(cfg, dist, report=write_run_report)  # refuses a foreign run directory before anything is written
    log, device = run.log, dist.device
    seeding.seed_everything(cfg.run.seed + dist.rank)
    set_backends(device, cfg.train.cudnn_benchmark, cfg.train.tf32)
    amp_dtype = AMP_DTYPES[cfg.train.amp]

    # ---------------------------------------------------------------- data (every check before any write)
    train_set, train_loader, val_set, val_loader = build_data(cfg, dist, train=not cfg.run.eval_only)
    batch_tf = BatchTransform(cfg.data.mean, cfg.data.std, cfg.train.channels_last).to(device)
    if cfg.run.check_data:  # decode and size-check every image, and fill the mask cache, before training
        items = {str(ds.image_dir / im[1]): (ds, i) for ds in (train_set, val_set) if ds is not None
                 for i, im in enumerate(ds.images)}
        check_images(list(items), lambda path: items[path][0].load(items[path][1]), cfg.data.workers, log)
    if train_set is not None and cfg.data.batch_size == 1:  # the last short batch is dropped: only this
        check_single_image_batch(
            lambda: build_model(dataclasses.replace(cfg.model, weights=None), backbone=False),
            (3, cfg.data.crop_size, cfg.data.crop_size),
            "data.batch_size 1: every training batch holds 1 image per process",
            "choose data.batch_size 2 or more (the published runs use 4 per process)")
    draw_ids = [i for b in val_loader.batch_sampler for _, i in b][:cfg.train.draw_images] if dist.is_main else []

    # ---------------------------------------------------------------- model
    model = build_model(cfg.model, backbone=not cfg.run.eval_only)
    model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)

    if cfg.run.eval_only:
        metrics, drawn = evaluate(model, val_loader, val_set, batch_tf, device, amp_dtype, dist, draw_ids)
        _tensorboard(run, 0, metrics, drawn)
        log.info(f"eval {cfg.model.weights or '(no model.weights)'} on {metrics['val_images']} images at short side "
                 f"{cfg.data.eval_size}: {_summary(metrics, cfg.expected)}")
        run.write_eval({"weights": cfg.model.weights, "eval_size": cfg.data.eval_size, **metrics})
        return metrics

    # ---------------------------------------------------------------- optimizer, schedule, loop
    plan = plan_batch(cfg.run, cfg.data.batch_size, cfg.train.accumulate, cfg.optimizer.lr_scaling, dist.world_size)
    check_steps(train_loader.batch_sampler, len(train_set), plan)  # an epoch without a step: exit 2
    train_model = model
    if dist.distributed:
        if cfg.train.sync_bn and device.type == "cuda":  # in place: same parameters, same state-dict keys
            train_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif cfg.train.sync_bn:
            log.info("warning: train.sync_bn needs CUDA; this CPU run keeps per-process BatchNorm statistics")
        train_model = DistributedDataParallel(train_model, device_ids=[device] if device.type == "cuda" else None)
    optimizer, schedule = build_optimizer_and_schedule(cfg, model, plan)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    loop = Loop(cfg, dist, run, model, optimizer, schedule, plan, train_model=train_model, amp=cfg.train.amp,
                scaler=scaler)
    loop.resume()
    facts = derived(cfg, dist.world_size, len(train_set))
    run.start(facts)
    log.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
             f"{len(train_set)} train / {len(val_set)} val images; {plan.summary(cfg.optimizer.lr)}; "
             f"{facts['optimizer_steps_per_epoch']} optimizer steps per epoch"
             + (f"; aux head lr {facts['aux_lr']:g}" if cfg.model.aux_loss else ""))

    metrics: dict = {}
    for epoch in loop.epochs():
        stats = train_one_epoch(train_model, loop, train_loader, batch_tf, device, epoch, cfg.train.aux_weight)
        metrics, drawn = evaluate(model, val_loader, val_set, batch_tf, device, amp_dtype, dist, draw_ids)
        _tensorboard(run, epoch, metrics, drawn)
        log.info(f"epoch {epoch}: {_summary(metrics, cfg.expected)} loss {stats['train_loss']:.4f} "
                 f"lr {stats['lr']:.5g} {stats['images_per_s']:.1f} img/s data-wait {100 * stats['data_wait']:.0f}%")
        loop.end_epoch(epoch, metrics, stats)
    loop.finish()
    return metrics


# ---------------------------------------------------------------- builders (main's parts, also used by the tests)


def build_data(cfg: Config, dist: distributed.DistState, train: bool = True):
    """(train_set, train_loader, val_set, val_loader); the train pair is (None, None) when not training.
    The val images' headers and sizes are checked here, before training (engine.datacheck)."""
    d, pin = cfg.data, dist.device.type == "cuda"
    val_set = CocoVoc(d.root, "val", EvalTransform(d.eval_size), cfg.run.seed, d.cache_dir(), d.format)
    val_batches = SizeGroupedBatches(val_set.sizes(), d.eval_size, d.eval_batch_size, dist.rank, dist.world_size)
    val_loader = make_loader(val_set, val_batches, d.workers, pin)
    train_set = train_loader = None
    if train:
        train_set = CocoVoc(d.root, "train", TrainTransform(d.crop_size, d.short_side, d.hflip), cfg.run.seed,
                            d.cache_dir(), d.format)
        sampler = EpochSampler(len(train_set), dist.rank, dist.world_size, cfg.run.seed, True)
        # drop_last, as the reference's training loader: every optimizer step sees a full batch
        train_loader = make_loader(train_set, EpochBatches(batch_sampler=BatchSampler(sampler, d.batch_size, True)),
                                   d.workers, pin)
    if not cfg.run.check_data:  # --check-data decodes them all, and lists the training set's problems too
        shards = val_set.shards  # a shard set's samples open by name, not as files
        decoder = decode if shards is None else lambda p: decode_bytes(shards.read(shards.index_of(p)), p)
        check_val_images(val_set.paths(), val_set.sizes(), val_set.ann_file, decoder, d.workers, dist,
                         open_file=open if shards is None else shards.open)
    return train_set, train_loader, val_set, val_loader


def build_model(m: ModelConfig, backbone: bool = True) -> nn.Module:
    """The recipe's model. ImageNet weights go into the backbone unless whole-model weights (model.weights)
    replace everything anyway, or `backbone` is False (evaluation)."""
    kwargs = {} if m.name == "lraspp_mobilenet_v3_large" else {"aux_loss": m.aux_loss}
    backbone_weights = m.backbone_weights if backbone and m.weights is None else None
    model = build(m.name, num_classes=m.num_classes, backbone_weights=backbone_weights, **kwargs)
    if m.weights is not None:
        load_weights(model, m.weights)
    if m.bn_momentum is not None:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = m.bn_momentum
    return model


def build_optimizer_and_schedule(cfg: Config, model: nn.Module, plan):
    """The reference's groups: backbone and head at lr, the aux head at lr x aux_lr_mult; one weight decay.
    The schedule scales each group's own base LR, so the aux head stays at 10x along the poly decay."""
    o = cfg.optimizer
    aux = getattr(model, "aux_classifier", None)
    main_part = nn.ModuleList([model.backbone, model.classifier])
    groups = param_groups(main_part, o.weight_decay, o.norm_weight_decay)
    if aux is not None:
        groups += [{**g, "lr": o.lr * cfg.train.aux_lr_mult} for g in param_groups(aux, o.weight_decay,
                                                                                  o.norm_weight_decay)]
    optimizer = build_optimizer(o, groups, lr_scale=plan.lr_scale)
    return optimizer, EpochSchedule(cfg.schedule, optimizer, lr_scale=plan.lr_scale)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def _summary(metrics: dict, expected: ExpectedConfig) -> str:
    return (f"mIoU {metrics['miou']:.2f} (published {_fmt(expected.miou)}) pixel acc {metrics['pixel_acc']:.2f} "
            f"(published {_fmt(expected.pixel_acc)})")


def _tensorboard(run, epoch: int, metrics: dict, drawn: dict[str, torch.Tensor]) -> None:
    """Per-class IoU scalars and the drawn val images (the Loop writes the other scalars)."""
    run.log.scalars(epoch, {f"iou/{name}": v for name, v in zip(VOC_CLASSES, metrics["iou"]) if v is not None})
    run.log.images(epoch, drawn)


# ============================================================================ one epoch


def segmentation_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor,
                      aux_weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reference's criterion: cross entropy (ignore 255) on "out", plus aux_weight x that of "aux"."""
    parts = {f"loss_{k}": F.cross_entropy(v, target, ignore_index=IGNORE_INDEX) for k, v in outputs.items()}
    loss = parts["loss_out"] + aux_weight * parts["loss_aux"] if "loss_aux" in parts else parts["loss_out"]
    return loss, parts


def train_one_epoch(model, loop: Loop, loader, batch_tf, device, epoch: int, aux_weight: float) -> dict:
    model.train()
    for images, masks in loop.batches(loader, epoch):
        x = batch_tf(images.to(device, non_blocking=True))          # uint8 (N, H, W, 3) -> normalized float
        target = masks.to(device, non_blocking=True).long()        # uint8 until here
        with loop.forward():
            loss, parts = segmentation_loss(model(x), target, aux_weight)
        loop.backward(loss, images=x.shape[0], logs=parts if len(parts) > 1 else None)
    return loop.epoch_stats()


# ============================================================================ evaluation


@torch.no_grad()
def evaluate(model, loader, dataset: CocoVoc, batch_tf, device, amp_dtype, dist: distributed.DistState,
             draw_ids: list[int] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """The confusion matrix over every val image exactly once (at the resized resolution, as published),
    reduced across ranks, and the mean cross-entropy of its counted pixels; and the drawn images
    (image | ground truth | prediction) of `draw_ids`."""
    model.eval()
    mat = torch.zeros((NUM_CLASSES, NUM_CLASSES), dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_images, drawn, draw = 0, {}, set(draw_ids)
    for keys, (images, masks) in zip(loader.batch_sampler, loader):
        x = batch_tf(images.to(device, non_blocking=True))
        target = masks.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x)["out"]
        pred = logits.argmax(1)
        mat += confusion_matrix(target, pred, NUM_CLASSES)
        loss_sum += F.cross_entropy(logits.float(), target.long(), ignore_index=IGNORE_INDEX, reduction="sum").double()
        n_images += len(keys)
        for j, (_, index) in enumerate(keys):
            if index in draw:
                plain = images[j].permute(2, 0, 1)
                drawn[f"val/{dataset.images[index][0]}"] = torch.cat(
                    [plain, overlay(images[j], masks[j]), overlay(images[j], pred[j])], dim=2)
    mat = distributed.all_reduce_sum(mat, dist)
    loss, count = distributed.all_reduce_sum(torch.stack([loss_sum, torch.tensor(n_images, dtype=torch.float64,
                                                                                 device=device)]), dist).tolist()
    return {**segmentation_scores(mat), "val_loss": loss / max(int(mat.sum().item()), 1),
            "val_images": int(count)}, drawn


if __name__ == "__main__":
    launch(Config, main, derived)
