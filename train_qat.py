"""Quantization-aware training (and post-training quantization) of MobileNetV3-Large, int8 on CPU.

    python train_qat.py --recipe recipes/qat/mobilenet_v3_large.yaml [section.key=value ...]
    torchrun --nproc_per_node=8 train_qat.py --recipe recipes/qat/mobilenet_v3_large.yaml
    python train_qat.py --recipe recipes/qat/mobilenet_v3_large_ptq.yaml           # post-training quantization
    python train_qat.py --recipe recipes/qat/mobilenet_v3_large.yaml run.eval_only=true model.weights=RUN/export

QAT as torchvision's reference made the published int8 weights: start from float weights, fuse
Conv+BN(+ReLU) and SE's fc1+ReLU, prepare for QAT with the backend's default qconfig, train with
observers on for epochs 0..num_observer_update_epochs and BN statistics updating for epochs
0..num_batch_norm_update_epochs (models/quantize.py: `phase`), and after each epoch evaluate the
fake-quant model (acc1, acc5) and an int8 CPU conversion of it (int8_acc1, int8_acc5). Checkpoints
hold the QAT (fake-quant) state dict in torchvision's layout; `export/` holds the int8 model as
TorchScript, which reloads in a fresh process (run.eval_only=true model.weights=RUN/export).

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
from torch.utils.data import BatchSampler

from data.classification import (BatchTransform, build_loaders, ClassificationDataConfig, count_images, make_loader,
                                 slow_decode_note, steps_per_epoch)
from engine import distributed, rundir, seeding
from engine.config import RunConfig
from engine.datacheck import check_images
from engine.errors import UserError
from engine.loop import Accumulate, Loop, check_steps, launch, launch_world_size, plan_batch, set_backends
from engine.metrics import evaluate_classifier
from engine.optim import EpochSchedule, OptimizerConfig, ScheduleConfig, build_optimizer, param_groups
from models import build, quantize
from models.weights import fit, read_state
from reproduce.report import write_run_report

# ============================================================================ config


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: Literal["mobilenet_v3_large"]         # the only MobileNetV3 with a published quantized model
    num_classes: int
    dropout: float
    weights: Optional[str] = None               # float weights to start from (required to train or calibrate);
                                                # with run.eval_only: a QAT checkpoint or an int8 export
    bn_momentum: float = 0.01                   # torchvision's


@dataclasses.dataclass(frozen=True)
class QatConfig:
    mode: Literal["qat", "ptq"]                 # quantization-aware training, or post-training quantization
    backend: Literal["qnnpack", "x86", "fbgemm"]  # qconfig and int8 kernels, QAT and PTQ (published: qnnpack)
    se_gate: Literal["float", "fake_quant"]     # SE gate in QAT/PTQ: float = torchvision 2021's functional
                                                # hardsigmoid (the published row); fake_quant = today's module
    num_observer_update_epochs: int             # torchvision's names and semantics: observers update while
    num_batch_norm_update_epochs: int           # epoch <= N (disabled once epoch N has been trained)
    calibration_batches: int = 32               # ptq: training batches (data.batch_size each) observed
    export: bool = True                         # write export/ (the int8 model as TorchScript) after every epoch

    def validate(self):
        for name in ("num_observer_update_epochs", "num_batch_norm_update_epochs"):
            if getattr(self, name) < 0:
                yield name, f"expected an epoch >= 0, got {getattr(self, name)}"
        if self.calibration_batches < 1:
            yield "calibration_batches", f"expected a positive number of batches, got {self.calibration_batches}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    label_smoothing: float
    accumulate: Accumulate = "auto"             # micro-batches per optimizer step; auto: reach run.global_batch
    amp: Literal["none"] = "none"               # fake quantization and its observers run in fp32
    channels_last: bool = False
    cudnn_benchmark: bool = True
    tf32: bool = False


@dataclasses.dataclass(frozen=True)
class ExpectedConfig:
    """The published int8 numbers of the row a recipe reproduces."""

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
    qat: QatConfig
    run: RunConfig
    expected: ExpectedConfig

    def validate(self):
        if self.model.weights is None and not self.run.eval_only:
            yield "model.weights", ("required: QAT and PTQ start from float weights (torchvision's IMAGENET1K_V1 "
                                    "file, or a classification checkpoint of this project)")


def derived(cfg: Config, world_size: int | None = None, n_train: int | None = None) -> dict:
    """Values computed from the recipe (logged; never written back into it)."""
    world = world_size or launch_world_size()
    out: dict = {"mode": cfg.qat.mode}
    q = cfg.qat
    if q.mode == "qat":
        plan = plan_batch(cfg.run, cfg.data.batch_size, cfg.train.accumulate, cfg.optimizer.lr_scaling, world)
        out.update({**plan.describe(), "lr": cfg.optimizer.lr * plan.lr_scale,
                    "observer_update_epochs": _epochs(min(q.num_observer_update_epochs, cfg.schedule.epochs - 1)),
                    "bn_stats_update_epochs": _epochs(min(q.num_batch_norm_update_epochs, cfg.schedule.epochs - 1))})
    else:
        out["calibration_images"] = cfg.data.batch_size * q.calibration_batches
    if n_train is None:
        n_train = count_images(Path(cfg.data.root) / "train")
    if n_train is not None:
        out["train_images"] = n_train
        if q.mode == "qat":
            out["optimizer_steps_per_epoch"] = -(-steps_per_epoch(n_train, world, cfg.data.batch_size)
                                                 // out["accumulate"])
    return out


def _epochs(last: int) -> str:
    return f"0-{last}" if last > 0 else "0"


# ============================================================================ main


def main(cfg: Config) -> dict:
    dist = distributed.init(cfg.run.device)
    device = dist.device
    run = rundir.open_run(cfg, dist, report=write_run_report)
    log = run.log
    seeding.seed_everything(cfg.run.seed + dist.rank)
    set_backends(device, cfg.train.cudnn_benchmark, cfg.train.tf32)
    backend = cfg.qat.backend
    quantize.check_backend(backend)
    torch.backends.quantized.engine = backend   # int8 kernels and weight packing

    train = not cfg.run.eval_only
    train_set, train_loader, val_set, val_loader = build_loaders(cfg.data, cfg.model.num_classes, cfg.run.seed, dist,
                                                                 train=train, check_val=not cfg.run.check_data)
    if train_set is not None and (note := slow_decode_note()):
        log.info(note)
    batch_tf = BatchTransform(cfg.data.mean, cfg.data.std, cfg.train.channels_last).to(device)
    cpu_tf = BatchTransform(cfg.data.mean, cfg.data.std, False)
    if cfg.run.check_data:
        items = {p: (ds, i) for ds in (train_set, val_set) if ds is not None  # a shard set's names are no files
                 for i, (p, _) in enumerate(ds.samples)}
        check_images(list(items), lambda p: items[p][0].load(items[p][1]),
                     cfg.data.workers, log)

    if cfg.run.eval_only:
        return evaluate_weights(cfg, dist, run, val_loader, batch_tf, cpu_tf, len(val_set))

    model = build_model(cfg)
    load_float_weights(model, cfg.model.weights)
    if cfg.qat.mode == "ptq":
        return post_training_quantization(cfg, dist, run, model, train_set, val_loader, batch_tf, cpu_tf)

    # ---------------------------------------------------------------- QAT model, optimizer, schedule, loop
    quantize.prepare_qat(model, backend, cfg.qat.se_gate)
    model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
    plan = plan_batch(cfg.run, cfg.data.batch_size, cfg.train.accumulate, cfg.optimizer.lr_scaling,
                      dist.world_size)
    check_steps(train_loader.batch_sampler, len(train_set), plan)  # an epoch without a step: exit 2
    groups = param_groups(model, cfg.optimizer.weight_decay, cfg.optimizer.norm_weight_decay)
    optimizer = build_optimizer(cfg.optimizer, groups, lr_scale=plan.lr_scale)
    schedule = EpochSchedule(cfg.schedule, optimizer, lr_scale=plan.lr_scale)
    train_model = model
    if dist.distributed:
        train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    loop = Loop(cfg, dist, run, model, optimizer, schedule, plan, train_model=train_model, amp=cfg.train.amp)
    loop.resume()
    facts = derived(cfg, dist.world_size, len(train_set))
    run.start(facts)
    log.info(f"QAT {cfg.model.name} ({backend}) from {cfg.model.weights}: {len(train_set)} train / "
             f"{len(val_set)} val images; " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    log.info(plan.summary(cfg.optimizer.lr))

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    q = cfg.qat
    metrics: dict = {}
    for epoch in loop.epochs():
        # The phase is a function of the epoch alone, so a resumed run (mid-epoch too) trains exactly
        # as an uninterrupted one; torchvision's reference re-enables observers for an epoch on resume.
        trained = quantize.phase(epoch, q.num_observer_update_epochs, q.num_batch_norm_update_epochs)
        quantize.set_phase(model, trained)
        stats = train_one_epoch(train_model, criterion, loop, train_loader, batch_tf, device, epoch)
        # The flags torchvision's script saves after this epoch (its checks run after training).
        quantize.set_phase(model, quantize.phase(epoch + 1, q.num_observer_update_epochs,
                                                 q.num_batch_norm_update_epochs))
        sync_buffers(model, dist)
        metrics, int8_model = evaluate_qat(model, val_loader, batch_tf, cpu_tf, device, backend, dist)
        if dist.is_main and q.export:
            quantize.export_int8(int8_model, run.out_dir / "export", backend, cfg.data.val_crop, {
                "epoch": epoch, "int8_acc1": metrics["int8_acc1"], "int8_acc5": metrics["int8_acc5"],
                "num_classes": cfg.model.num_classes, "val_resize": cfg.data.val_resize,
                "mean": list(cfg.data.mean), "std": list(cfg.data.std)})
        stats.update(observers=int(trained.observers), bn_stats=int(trained.bn_stats))
        log.info(f"epoch {epoch}: fake-quant Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f} | "
                 f"int8 ({backend}) Acc@1 {metrics['int8_acc1']:.3f} Acc@5 {metrics['int8_acc5']:.3f} | "
                 f"loss {stats['train_loss']:.4f} lr {stats['lr']:.5g} observers {'on' if trained.observers else 'off'} "
                 f"BN stats {'updating' if trained.bn_stats else 'frozen'} {stats['images_per_s']:.1f} img/s")
        loop.end_epoch(epoch, metrics, stats)
    loop.finish()
    return metrics


# ---------------------------------------------------------------- builders


def build_model(cfg: Config) -> nn.Module:
    """The quantizable MobileNetV3-Large (QuantStub/DeQuantStub, FloatFunctional, non-inplace ReLU), float."""
    return build("quantizable_mobilenet_v3_large", num_classes=cfg.model.num_classes, dropout=cfg.model.dropout,
                 norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=cfg.model.bn_momentum))


def _read_state(path: str) -> dict[str, torch.Tensor]:
    try:
        return read_state(path)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UserError(f"model.weights: {exc}") from None


def load_float_weights(model: nn.Module, path: str) -> None:
    state = _read_state(path)
    if quantize.is_qat_state_dict(state):
        raise UserError(f"model.weights: {path} holds a QAT (fake-quant) model, not float weights; continue "
                        "its run with run.resume=auto (same run.output_dir) or evaluate it with run.eval_only=true")
    try:
        fit(model, state, path, "MobileNetV3-Large (float, before fusion)")
    except ValueError as exc:
        raise UserError(f"model.weights: {exc}") from None


def load_qat_weights(model: nn.Module, path: str, se_gate: str) -> None:
    """A QAT state dict (ours, or torchvision's published quantized weights, whose 2021 layout has no
    SE-gate observer: models/quantizable.py) into a QAT-prepared model, through the modules' load hooks."""
    try:
        fit(model, _read_state(path), path, f"the QAT-prepared MobileNetV3-Large (qat.se_gate={se_gate})")
    except ValueError as exc:
        hint = ("\n  (a file without SE-gate observers, such as torchvision's 2021 quantized weights, loads "
                "with qat.se_gate=float; one with them with qat.se_gate=fake_quant)"
                if "scale_activation" in str(exc) else "")
        raise UserError(f"model.weights: {exc}{hint}") from None


def sync_buffers(model: nn.Module, dist: distributed.DistState) -> None:
    """Rank 0's buffers everywhere (observer ranges, BN statistics): each rank's last forward updated its
    own, and the checkpoint and export are rank 0's, so every rank evaluates the model that is saved."""
    if dist.distributed:
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)


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


def evaluate(model, loader, batch_tf, device, dist: distributed.DistState) -> dict:
    """Acc@1/Acc@5 over every validation image exactly once (engine.metrics, shared with classification)."""
    return evaluate_classifier(model, loader, batch_tf, device, dist)


def evaluate_qat(model, val_loader, batch_tf, cpu_tf, device, backend: str, dist) -> tuple[dict, nn.Module]:
    """The fake-quant model on the training device, then an int8 CPU conversion of it."""
    with quantize.observers_frozen(model):
        metrics = evaluate(model, val_loader, batch_tf, device, dist)
    int8_model = quantize.convert_int8(model, backend)
    with quantize.engine(backend):
        int8 = evaluate(int8_model, val_loader, cpu_tf, torch.device("cpu"), dist)
    metrics.update(int8_acc1=int8["acc1"], int8_acc5=int8["acc5"])
    return metrics, int8_model


def evaluate_weights(cfg: Config, dist, run, val_loader, batch_tf, cpu_tf, n_val: int) -> dict:
    """run.eval_only: an int8 export (evaluated as loaded), or a QAT checkpoint (fake-quant and int8)."""
    weights, log = cfg.model.weights, run.log
    if weights is None:
        raise UserError("run.eval_only=true needs model.weights: an int8 export (RUN/export) or a QAT checkpoint")
    export_file = quantize.export_file(weights)
    if export_file is not None:
        try:
            int8_model, meta = quantize.load_int8(export_file)
        except ValueError as exc:
            raise UserError(f"model.weights: {exc}") from None
        with quantize.engine(meta["backend"]):
            m = evaluate(int8_model, val_loader, cpu_tf, torch.device("cpu"), dist)
        metrics = {"int8_acc1": m["acc1"], "int8_acc5": m["acc5"], "val_images": m["val_images"]}
        what = f"int8 export ({meta['backend']}, TorchScript)"
    else:
        model = build_model(cfg)
        state = _read_state(weights)
        if not quantize.is_qat_state_dict(state):
            raise UserError(f"model.weights: {weights} holds float weights; evaluate them with train_classification.py, "
                            "or quantize them with qat.mode=ptq")
        quantize.prepare_qat(model, cfg.qat.backend, cfg.qat.se_gate)
        load_qat_weights(model, weights, cfg.qat.se_gate)
        model.to(dist.device)
        metrics, _ = evaluate_qat(model, val_loader, batch_tf, cpu_tf, dist.device, cfg.qat.backend, dist)
        what = f"QAT checkpoint, converted to int8 ({cfg.qat.backend})"
    log.info(f"eval {weights} [{what}] on {n_val} images: int8 Acc@1 {metrics['int8_acc1']:.3f} "
             f"(published {_fmt(cfg.expected.acc1)})  int8 Acc@5 {metrics['int8_acc5']:.3f} "
             f"(published {_fmt(cfg.expected.acc5)})"
             + (f"; fake-quant Acc@1 {metrics['acc1']:.3f} Acc@5 {metrics['acc5']:.3f}" if "acc1" in metrics else ""))
    run.write_eval({"weights": weights, **metrics})
    return metrics


def post_training_quantization(cfg: Config, dist, run, model, train_set, val_loader, batch_tf, cpu_tf) -> dict:
    """torchvision's PTQ: fuse, default qconfig, calibrate on the first calibration_batches x batch_size
    training images (folder order, training transform of epoch 0, as its Subset(range(n)) did), convert."""
    log, backend = run.log, cfg.qat.backend
    facts = derived(cfg, dist.world_size, len(train_set))
    run.start(facts)
    model.to(dist.device)
    float_metrics = evaluate(model, val_loader, batch_tf, dist.device, dist)
    model.cpu()
    quantize.prepare_ptq(model, backend, cfg.qat.se_gate)
    n = min(len(train_set), cfg.data.batch_size * cfg.qat.calibration_batches)
    keys = [(0, i) for i in range(n)]  # (epoch, index): ImageFolder's per-sample-seeded training transform
    loader = make_loader(train_set, BatchSampler(keys, cfg.data.batch_size, False), cfg.data.workers, False)
    with quantize.engine(backend):
        seen = quantize.calibrate(model, (cpu_tf(images, erase) for images, _, erase in loader))
    int8_model = quantize.convert_int8(model, backend)
    with quantize.engine(backend):
        m = evaluate(int8_model, val_loader, cpu_tf, torch.device("cpu"), dist)
    metrics = {"int8_acc1": m["acc1"], "int8_acc5": m["acc5"], "val_images": m["val_images"],
               "float_acc1": float_metrics["acc1"], "float_acc5": float_metrics["acc5"], "calibration_images": seen}
    if dist.is_main and cfg.qat.export:
        quantize.export_int8(int8_model, run.out_dir / "export", backend, cfg.data.val_crop, {
            "mode": "ptq", "int8_acc1": metrics["int8_acc1"], "int8_acc5": metrics["int8_acc5"],
            "num_classes": cfg.model.num_classes, "val_resize": cfg.data.val_resize,
            "mean": list(cfg.data.mean), "std": list(cfg.data.std)})
    log.info(f"PTQ ({backend}) of {cfg.model.weights}, calibrated on {seen} training images: int8 Acc@1 "
             f"{metrics['int8_acc1']:.3f} (published {_fmt(cfg.expected.acc1)}) Acc@5 {metrics['int8_acc5']:.3f} "
             f"(published {_fmt(cfg.expected.acc5)}); float Acc@1 {metrics['float_acc1']:.3f} "
             f"Acc@5 {metrics['float_acc5']:.3f}" + (f"; export: {run.out_dir / 'export'}" if cfg.qat.export else ""))
    run.write_eval({"weights": cfg.model.weights, "mode": "ptq", **metrics})
    return metrics


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    launch(Config, main, derived)
