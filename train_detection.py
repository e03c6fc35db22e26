"""COCO detection with Faster R-CNN MobileNetV3-Large FPN, as torchvision trained the published weights.

    python train_detection.py --recipe recipes/detection/fasterrcnn_mobilenet_v3_large_fpn.yaml \
        data.root=/data/coco model.backbone_weights=mobilenet_v3_large-8738ca79.pth [section.key=value ...]
    torchrun --nproc_per_node=8 train_detection.py \
        --recipe recipes/detection/fasterrcnn_mobilenet_v3_large_fpn.yaml
    python train_detection.py --recipe recipes/detection/fasterrcnn_mobilenet_v3_large_fpn.yaml \
        run.eval_only=true model.weights=fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth

Reads top to bottom: Config, main, train_one_epoch, evaluate. The model is models/detection.py (torchvision's
FasterRCNN on this project's MobileNetV3, torchvision's state-dict layout); the data is data/detection.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.utils import draw_bounding_boxes

from data.classification import decode, decode_bytes
from data.detection import (CocoDetection, DetectionDataConfig, bbox_metrics, coco_bbox_stats,
                            coco_ground_truth, detection_rows, gather_rows, make_eval_loader,
                            make_train_loader, read_annotations, split_paths, to_device, to_results)
from engine import checkpoint, distributed, rundir, seeding
from engine.config import RunConfig
from engine.datacheck import check_images, check_val_images
from engine.errors import DataError
from engine.loop import (AMP_DTYPES, Accumulate, Loop, check_steps, launch, launch_world_size, plan_batch,
                         set_backends)
from engine.optim import EpochSchedule, OptimizerConfig, ScheduleConfig, build_optimizer, param_groups
from models import build, load_weights
from reproduce.report import write_run_report

# ============================================================================ config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: Literal["fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"]
    num_classes: int                            # 91: COCO category ids 1..90 and background 0
    backbone_weights: Optional[str]             # ImageNet classification weights (torchvision's file or a
                                                # checkpoint of train_classification.py; classifier ignored)
    trainable_layers: int                       # top stages of the backbone's 6 that train
    frozen_bn: bool                             # backbone BatchNorm as FrozenBatchNorm2d
    backbone_bn_eps: float                      # the frozen BatchNorm's eps: torchvision's detectors use 1e-5
                                                # although the ImageNet classifier trained with 0.001
    min_size: int                               # GeneralizedRCNNTransform: shorter side resized to this ...
    max_size: int                               # ... unless the longer side would exceed this
    rpn_pre_nms_top_n_train: int
    rpn_post_nms_top_n_train: int
    rpn_pre_nms_top_n_test: int
    rpn_post_nms_top_n_test: int
    rpn_score_thresh: float
    box_batch_size_per_image: int               # RoIs sampled per training image for the box head (512)
    box_score_thresh: float
    box_detections_per_img: int
    weights: Optional[str] = None               # whole-detector weights to start from (or, with
                                                # run.eval_only, to evaluate)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    accumulate: Accumulate = "auto"             # micro-batches per optimizer step; auto: run.global_batch
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    cudnn_benchmark: bool = False               # off: every aspect-ratio group and image size is a new shape
    tf32: bool = False
    clip_grad_norm: Optional[float] = None      # not in the published recipe (null); the toy run's guard
    draw_images: int = 4                        # val images drawn with predictions in TensorBoard each epoch
    draw_score_thresh: float = 0.5              # boxes drawn from this score


@dataclasses.dataclass(frozen=True)
class ExpectedConfig:
    """The published number of the row a recipe reproduces (printed beside ours)."""

    bbox_map: Optional[float] = None            # COCO val2017 box mAP@[.5:.95], percent
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    data: DetectionDataConfig
    optimizer: OptimizerConfig
    schedule: ScheduleConfig
    train: TrainConfig
    run: RunConfig
    expected: ExpectedConfig


# Keys that change what is drawn in TensorBoard, not what is computed: a resume may change them freely.
OPERATIONAL = frozenset({"train.draw_images", "train.draw_score_thresh"})


def derived(cfg: Config, world_size: int | None = None, n_train: int | None = None) -> dict:
    """Values computed from the recipe (logged; never written back into it). Without a running
    process group, the world size is this launch's (torchrun's WORLD_SIZE, srun's SLURM_NTASKS, or 1)."""
    world = world_size or launch_world_size()
    plan = plan_batch(cfg.run, cfg.data.batch_size, cfg.train.accumulate, cfg.optimizer.lr_scaling, world)
    out = {**plan.describe(), "lr": cfg.optimizer.lr * plan.lr_scale}
    if n_train is None:  # --print-config: count the usable training images when the data is at hand
        ann_file, _ = split_paths(cfg.data.root, "train")
        if ann_file.is_file():
            n_train = sum(read_annotations(ann_file, cfg.data.box_margin).usable)
    if n_train is not None:
        micro = -(-n_train // world) // cfg.data.batch_size  # grouped batches per rank (a short rest dropped)
        steps = -(-micro // plan.accumulate)
        out.update(train_images=n_train, optimizer_steps_per_epoch=steps,
                   warmup_steps=min(cfg.schedule.warmup_iters, steps - 1) if cfg.schedule.warmup_iters else 0)
    return out


# ============================================================================ main


def main(cfg: Config) -> dict:
    dist = distributed.init(cfg.run.device)
    device = dist.device
    # refuses a foreign run directory (or one another run holds) before any write
    run = rundir.open_run(cfg, dist, OPERATIONAL, report=write_run_report)
    log = run.log
    seeding.seed_everything(cfg.run.seed + dist.rank)
    set_backends(device, cfg.train.cudnn_benchmark, cfg.train.tf32)
    amp_dtype = AMP_DTYPES[cfg.train.amp]

    # ---------------------------------------------------------------- data (every check before any write)
    train_set, train_loader, val_set, val_loader = build_data(cfg, dist, train=not cfg.run.eval_only)
    if cfg.run.check_data:  # decode every image and compare its size with the annotation file's
        items = {p: (ds, i) for ds in (train_set, val_set) if ds is not None
                 for i, p in enumerate(ds.paths())}
        check_images(list(items), lambda path: items[path][0].load(items[path][1]), cfg.data.workers, log)
    gt = coco_ground_truth(val_set.ann_file) if dist.is_main else None
    draw_ids = list(val_loader.sampler)[:cfg.train.draw_images] if dist.is_main else []

    # ---------------------------------------------------------------- model
    model = build_model(cfg, backbone=not cfg.run.eval_only)
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout)

    if cfg.run.eval_only:
        metrics, results, _ = evaluate(model, val_loader, val_set, gt, device, amp_dtype, dist)
        _write_detections(run.out_dir / "detections" / "eval.json", results, dist)
        log.info(f"eval {cfg.model.weights or '(no model.weights)'} on {metrics['val_images']} images: "
                 f"box mAP {_fmt(metrics['bbox_map'], 2)} (published {_fmt(cfg.expected.bbox_map)})")
        run.write_eval({"weights": cfg.model.weights, **metrics})
        return metrics

    # ---------------------------------------------------------------- optimizer, schedule, loop
    plan = plan_batch(cfg.run, cfg.data.batch_size, cfg.train.accumulate, cfg.optimizer.lr_scaling,
                      dist.world_size)
    check_steps(train_loader.batch_sampler, len(train_set), plan)  # an epoch without a step: exit 2
    optimizer, schedule = build_optimizer_and_schedule(cfg, model, plan)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    train_model = model
    if dist.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    loop = Loop(cfg, dist, run, model, optimizer, schedule, plan, train_model=train_model, amp=cfg.train.amp,
                scaler=scaler, clip_grad_norm=cfg.train.clip_grad_norm)
    loop.resume()
    facts = derived(cfg, dist.world_size, len(train_set))
    run.start(facts)
    log.info(f"{cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters "
             f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable), "
             f"{len(train_set)} train / {len(val_set)} val images; "
             + ", ".join(f"{k} {v}" for k, v in facts.items() if v is not None))
    log.info(plan.summary(cfg.optimizer.lr))

    # ---------------------------------------------------------------- loop
    metrics: dict = {}
    for epoch in loop.epochs():
        stats = train_one_epoch(train_model, loop, train_loader, device, epoch)
        metrics, results, drawn = evaluate(model, val_loader, val_set, gt, device, amp_dtype, dist, draw_ids,
                                           cfg.train.draw_score_thresh)
        _write_detections(run.out_dir / "detections" / f"epoch_{epoch:03d}.json", results, dist)
        run.log.images(epoch, drawn)
        published = _fmt(cfg.expected.bbox_map)
        log.info(f"epoch {epoch}: box mAP {_fmt(metrics['bbox_map'], 2)} (published {published}) "
                 f"loss {stats['train_loss']:.4f} lr {stats['lr']:.5g} {stats['images_per_s']:.1f} img/s "
                 f"data-wait {100 * stats['data_wait']:.0f}%")
        loop.end_epoch(epoch, metrics, stats)
    loop.finish()
    return metrics


# ---------------------------------------------------------------- builders (main's parts; the tests use them)


def build_data(cfg: Config, dist: distributed.DistState, train: bool = True):
    """(train_set, train_loader, val_set, val_loader); the train pair is (None, None) when not training.
    Every annotation file and image folder, and the val images' headers and sizes, are checked here,
    before the run writes anything."""
    d, pin = cfg.data, dist.device.type == "cuda"
    val_set = CocoDetection(d.root, "val", train=False, hflip=0.0, seed=cfg.run.seed, box_margin=d.box_margin,
                            data_format=d.format)
    val_loader = make_eval_loader(val_set, dist.rank, dist.world_size, d.workers, pin)
    train_set = train_loader = None
    if train:
        train_set = CocoDetection(d.root, "train", train=True, hflip=d.hflip, seed=cfg.run.seed,
                                  box_margin=d.box_margin, data_format=d.format)
        train_loader = make_train_loader(train_set, d.batch_size, d.aspect_ratio_group_factor, dist.rank,
                                         dist.world_size, cfg.run.seed, d.workers, pin)
    for ds in (train_set, val_set):
        too_big = sorted(c for c in ds.ann.categories if c >= cfg.model.num_classes) if ds is not None else []
        if too_big:
            raise DataError(f"{ds.ann_file}: category ids {too_big[:5]} do not fit model.num_classes "
                            f"{cfg.model.num_classes} (labels are COCO category ids; 91 covers COCO's 1..90)")
    if not cfg.run.check_data:  # --check-data decodes them all, and lists the training set's problems too
        shards = val_set.shards  # a shard set's samples open by name, not as files
        decoder = decode if shards is None else lambda p: decode_bytes(shards.read(shards.index_of(p)), p)
        check_val_images(val_set.paths(), val_set.sizes(), val_set.ann_file, decoder, d.workers, dist,
                         open_file=open if shards is None else shards.open)
    return train_set, train_loader, val_set, val_loader


def build_model(cfg: Config, backbone: bool = True) -> torch.nn.Module:
    """The recipe's detector. The ImageNet weights go into the backbone unless whole-detector weights
    (model.weights) replace everything anyway, or `backbone` is False (evaluation)."""
    m = cfg.model
    backbone_weights = m.backbone_weights if backbone and m.weights is None else None
    model = build(m.name, num_classes=m.num_classes, backbone_weights=backbone_weights,
                  trainable_layers=m.trainable_layers, frozen_bn=m.frozen_bn, min_size=m.min_size,
                  max_size=m.max_size, rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train,
                  rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
                  rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test,
                  rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
                  rpn_score_thresh=m.rpn_score_thresh, box_batch_size_per_image=m.box_batch_size_per_image,
                  box_score_thresh=m.box_score_thresh, box_detections_per_img=m.box_detections_per_img)
    if m.frozen_bn:  # FrozenBatchNorm2d reads its eps at every forward; the builder leaves torchvision's 1e-5
        for module in model.backbone.body.modules():
            if isinstance(module, FrozenBatchNorm2d):
                module.eps = m.backbone_bn_eps
    if m.weights is not None:
        load_weights(model, m.weights)
    return model


def build_optimizer_and_schedule(cfg: Config, model: torch.nn.Module, plan):
    """The reference: SGD over the parameters that require grad, one weight decay for all of them;
    MultiStepLR per epoch with the epoch-0 LinearLR warm-up (engine.optim.EpochSchedule)."""
    groups = param_groups(model, cfg.optimizer.weight_decay, cfg.optimizer.norm_weight_decay)
    optimizer = build_optimizer(cfg.optimizer, groups, lr_scale=plan.lr_scale)
    return optimizer, EpochSchedule(cfg.schedule, optimizer, lr_scale=plan.lr_scale)


def _fmt(v: float | None, decimals: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{decimals}f}"


def _write_detections(path: Path, results: list[dict] | None, dist: distributed.DistState) -> None:
    if dist.is_main:
        checkpoint.atomic_write_text(path, json.dumps(results) + "\n")


# ============================================================================ one epoch


def train_one_epoch(model, loop: Loop, loader, device: torch.device, epoch: int) -> dict:
    model.train()
    for images, targets in loop.batches(loader, epoch):
        images, targets = to_device(images, targets, device)
        with loop.forward():
            parts = model(images, targets)  # loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg
            loss = sum(parts.values())
        loop.backward(loss, images=len(images), logs=parts)
    return loop.epoch_stats()


# ============================================================================ evaluation


@torch.no_grad()
def evaluate(model, loader, dataset: CocoDetection, gt, device, amp_dtype, dist: distributed.DistState,
             draw_ids: list[int] = (), draw_thresh: float = 0.5) -> tuple[dict, list[dict] | None, dict]:
    """COCO bbox metrics over every val image exactly once; detections gathered to rank 0.

    Returns (metrics on every rank, the COCO results list on rank 0 (None elsewhere), the drawn images).
    """
    model.eval()
    rows, drawn = [], {}
    draw = set(draw_ids)
    for index, (images, targets) in zip(loader.sampler, loader):
        x, _ = to_device(images, None, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model(x)
        for target, output, image in zip(targets, outputs, images):
            rows.append(detection_rows(target["image_id"], output))
            if index in draw:
                drawn[f"val/{target['image_id']}"] = draw_predictions(image, output, dataset.ann.categories,
                                                                      draw_thresh)
    n_images = int(distributed.all_reduce_sum(torch.tensor(float(len(rows)), device=device), dist).item())
    all_rows = gather_rows(rows, dist.world_size)
    results, stats = None, None
    if dist.is_main:
        results = to_results(all_rows)
        stats = coco_bbox_stats(gt, results)
    stats = distributed.all_gather_object(stats, dist)[0]
    return {**bbox_metrics(stats), "val_images": n_images}, results, drawn


def draw_predictions(image: torch.Tensor, output: dict, categories: dict[int, str],
                     thresh: float) -> torch.Tensor:
    """uint8 (3, H, W) with the boxes scoring >= thresh drawn, labelled 'name score'."""
    keep = output["scores"] >= thresh
    if not keep.any():
        return image
    boxes, labels, scores = (output[k][keep].float().cpu() for k in ("boxes", "labels", "scores"))
    text = [f"{categories.get(int(c), int(c))} {s:.2f}" for c, s in zip(labels.tolist(), scores.tolist())]
    return draw_bounding_boxes(image, boxes, labels=text, width=2)


if __name__ == "__main__":
    launch(Config, main, derived)
