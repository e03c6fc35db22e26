"""The training-loop machinery every train_*.py shares; the scripts keep their own loop bodies.

A script builds its data, model and optimizer, then hands them to a `Loop`, which owns what would
otherwise be copied into four scripts:
- the batch plan (`plan_batch`): processes x per-process batch x accumulation = the recipe's
  `run.global_batch`, or the LR scaled by rule when a user chooses another global batch;
- gradient accumulation: one optimizer step per N micro-batches, the loss scaled by 1/N, DDP's
  all-reduce only on the last micro-batch (`no_sync`), GradScaler and clipping once per step, EMA
  per optimizer step, per-iteration LR counted in optimizer steps. An epoch's last group may be
  short (its micro-batch count is not a multiple of N): it is stepped, its loss scaled by 1/size,
  the same on every rank (samplers give every rank the same number of batches);
- exact resume: checkpoints carry model, optimizer, EMA, scaler, every rank's RNG state, the
  position (epoch, optimizer step) and the epoch's running sums; the loader skips what was done;
- preemption (engine.preemption): a signal stops all ranks at the same optimizer-step boundary
  with a mid-epoch checkpoint, or, when it arrives during evaluation, right after the epoch's
  checkpoint; the run exits with 128 + the signal number;
- the divergence guard: a non-finite loss, or one above `run.divergence_factor` x the run's
  starting loss (its first optimizer step's, averaged over ranks), stops the run naming epoch and
  step; the last good checkpoint is kept;
- metrics.jsonl rows, TensorBoard scalars, progress lines and report.md.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, Sampler

from engine import checkpoint, distributed, preemption, seeding
from engine.config import ConfigError, RunConfig, cli, to_dict
from engine.errors import Diverged, Preempted, UserError

Accumulate = Union[Literal["auto"], int]
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ============================================================================ batch plan


class BatchPlan:
    """Processes x per-process batch x accumulation steps, and the LR factor that goes with it."""

    def __init__(self, world_size: int, batch_size: int, accumulate: int, tuned_global_batch: int | None,
                 lr_scaling: str, tuned_world_size: int | None = None):
        self.world_size, self.batch_size, self.accumulate = world_size, batch_size, accumulate
        self.tuned_global_batch, self.lr_scaling = tuned_global_batch, lr_scaling
        self.tuned_world_size = tuned_world_size

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size * self.accumulate

    @property
    def matches_recipe(self) -> bool:
        return self.tuned_global_batch is None or self.global_batch == self.tuned_global_batch

    @property
    def lr_scale(self) -> float:
        if self.matches_recipe or self.lr_scaling == "none":
            return 1.0
        ratio = self.global_batch / self.tuned_global_batch
        return ratio if self.lr_scaling == "linear" else math.sqrt(ratio)

    def describe(self) -> dict[str, Any]:
        return {"processes": self.world_size, "batch_per_process": self.batch_size,
                "accumulate": self.accumulate, "global_batch": self.global_batch,
                "recipe_global_batch": self.tuned_global_batch, "lr_scaling": self.lr_scaling,
                "lr_scale": self.lr_scale}

    def summary(self, lr: float) -> str:
        text = (f"global batch {self.global_batch} = {self.world_size} processes x {self.batch_size} images "
                f"x {self.accumulate} accumulation steps")
        tuned = f"{self.tuned_world_size} processes" if self.tuned_world_size else "an unstated process count"
        if self.matches_recipe:
            return text + (f" (the recipe's, tuned on {tuned})" if self.tuned_global_batch else "")
        rule = {"none": "lr not scaled (optimizer.lr_scaling=none)",
                "linear": f"lr scaled linearly: {lr:g} x {self.lr_scale:.4g} = {lr * self.lr_scale:.6g}",
                "sqrt": f"lr scaled by the square root: {lr:g} x {self.lr_scale:.4g} = {lr * self.lr_scale:.6g}"}
        return (f"warning: {text}, but the recipe was tuned for a global batch of {self.tuned_global_batch} "
                f"on {tuned}; "
                f"{rule[self.lr_scaling]}: results will differ from the published ones")


def launch_world_size() -> int:
    """The process count of this launch before any process group exists (torchrun, srun, or 1)."""
    import os

    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def plan_batch(run: RunConfig, batch_size: int, accumulate: Accumulate, lr_scaling: str,
               world_size: int) -> BatchPlan:
    """Accumulation steps that make world_size x batch_size x N equal run.global_batch ("auto"), or N
    as given. A global batch that "auto" cannot meet exactly is a ConfigError saying what would."""
    tuned = run.global_batch
    if accumulate != "auto":
        if accumulate < 1:
            raise ConfigError([f"train.accumulate: expected 'auto' or a count >= 1, got {accumulate}"])
        return BatchPlan(world_size, batch_size, accumulate, tuned, lr_scaling, run.world_size)
    if tuned is None:
        return BatchPlan(world_size, batch_size, 1, None, lr_scaling, run.world_size)
    per_step = world_size * batch_size
    if tuned % per_step == 0:
        return BatchPlan(world_size, batch_size, tuned // per_step, tuned, lr_scaling, run.world_size)
    hint = []
    if tuned % world_size == 0:
        sizes = [b for b in range(1, tuned // world_size + 1) if (tuned // world_size) % b == 0]
        hint.append(f"with {world_size} processes, data.batch_size one of {_few(sizes)}")
    worlds = [w for w in range(1, tuned // batch_size + 1) if tuned % (w * batch_size) == 0] \
        if tuned % batch_size == 0 else []
    if worlds:
        hint.append(f"with data.batch_size={batch_size}, a process count of {_few(worlds)}")
    hint.append("or an explicit train.accumulate=N with optimizer.lr_scaling=linear|sqrt|none")
    raise ConfigError([f"train.accumulate=auto: the recipe's global batch (run.global_batch={tuned}) is not a "
                       f"multiple of {world_size} processes x data.batch_size {batch_size} = {per_step}; "
                       f"it would be met exactly {'; '.join(hint)}"])


def check_steps(batches: EpochBatches, n_images: int, plan: BatchPlan) -> None:
    """An epoch of `batches` (the training loader's batch sampler) must take at least one optimizer step:
    a ConfigError (exit 2, before the run writes anything) naming the images, batch and processes."""
    if batches.total() == 0:
        raise ConfigError([f"data.batch_size={plan.batch_size}: {n_images} usable training images over "
                           f"{plan.world_size} process{'es' if plan.world_size != 1 else ''} give no batch per "
                           "process (an incomplete batch is dropped), so an epoch would take no optimizer step; "
                           "lower data.batch_size, use fewer processes or add training images"])


def _few(values: list[int]) -> str:
    return ", ".join(map(str, values if len(values) <= 12 else values[:6] + ["..."] + values[-3:]))


# ============================================================================ resumable batches


class EpochBatches(Sampler):
    """The batches of an epoch, resumable mid-epoch: `set_epoch(epoch, skip)` skips the first `skip`
    batches (their indices are drawn, their images are never loaded). Wraps a sampler + batch size
    (batches as DataLoader would make them, last one short) or a batch sampler (e.g. aspect-ratio
    grouping); the wrapped object's own set_epoch is called, so its order is a function of the epoch."""

    def __init__(self, sampler: Sampler | None = None, batch_size: int | None = None, *,
                 batch_sampler: Sampler | None = None):
        if (batch_sampler is None) == (sampler is None):
            raise ValueError("EpochBatches takes a sampler and batch_size, or a batch_sampler")
        self.inner = batch_sampler if batch_sampler is not None else BatchSampler(sampler, batch_size, False)
        self.sampler = sampler if sampler is not None else getattr(batch_sampler, "sampler", None)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.skip = skip
        for obj in {id(o): o for o in (self.inner, self.sampler) if o is not None}.values():
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def total(self) -> int:
        return len(self.inner)

    def __len__(self) -> int:
        return len(self.inner) - self.skip

    def __iter__(self) -> Iterator[list]:
        return itertools.islice(iter(self.inner), self.skip, None)


# ============================================================================ the loop


class Loop:
    def __init__(self, cfg: Any, dist: distributed.DistState, run, model: nn.Module,
                 optimizer: torch.optim.Optimizer, schedule, plan: BatchPlan, *, train_model: nn.Module | None = None,
                 amp: str = "none", scaler: torch.amp.GradScaler | None = None, ema: nn.Module | None = None,
                 ema_every: int = 1, clip_grad_norm: float | None = None,
                 save_extra: Callable[[], dict] | None = None):
        self.cfg, self.dist, self.run, self.log = cfg, dist, run, run.log
        self.model, self.train_model = model, train_model if train_model is not None else model
        self.optimizer, self.schedule, self.plan = optimizer, schedule, plan
        self.amp_dtype = AMP_DTYPES[amp]
        self.scaler, self.ema, self.ema_every, self.clip = scaler, ema, ema_every, clip_grad_norm
        self.save_extra = save_extra
        self.device = dist.device
        self.epochs_total = cfg.schedule.epochs
        self.history: list[dict] = []
        self.start_epoch, self.start_micro = 0, 0
        self.global_step = 0                       # optimizer steps since the run began
        self.loss_reference: float | None = None   # the divergence guard's reference: the first step's loss
        self._resumed_images: int | None = None   # training images when the mid-epoch checkpoint was written
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._preempt = preemption.Preemption(dist.distributed)
        self._check_every = 1 if self.device.type == "cpu" else cfg.run.print_freq  # .item() syncs a GPU

    # ---------------------------------------------------------------- resume
    def resume(self) -> None:
        """Restore everything from run.state (the checkpoint open_run chose), if there is one."""
        state = self.run.state
        if state is None:
            self.log.truncate_after(-1)  # rows of a run that never reached its first checkpoint
            return
        self.model.load_state_dict(state["model"])
        # The recipe's hyperparameters win over the restored ones (weight decay, momentum, ...): with
        # run.allow_changes a changed value really takes effect; otherwise they are equal anyway.
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, values in zip(self.optimizer.param_groups, fresh):
            group.update(values)
        if self.ema is not None and "model_ema" in state:
            self.ema.module.load_state_dict(state["model_ema"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        pos = state.get("position", {"epoch": state["epoch"] + 1, "micro": 0})
        self.start_epoch, self.start_micro = pos["epoch"], pos["micro"]
        self.global_step = state.get("global_step", 0)
        self.loss_reference = state.get("loss_reference")
        self.history = list(state.get("history", []))
        if self.start_micro:
            self._epoch_sums = {k: v.to(self.device) for k, v in state["epoch_sums"].items()}
            self._resumed_lr = state["epoch_lr"]
            self._resumed_images = state.get("train_images")
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            seeding.set_rng_state(rngs[self.dist.rank])
        else:
            self.log.info(f"warning: the checkpoint was written by {len(rngs)} processes, this run has "
                          f"{self.dist.world_size}: data order and augmentation resume exactly, dropout and "
                          "stochastic-depth draws do not")
            seeding.seed_everything(self.cfg.run.seed + 1000 * self.start_epoch + self.dist.rank)
        self.log.truncate_after(self.start_epoch - 1)
        if not self.start_micro and state.get("row"):
            self.log.ensure_row(state["row"])
        where = f"epoch {self.start_epoch}" + (f", micro-batch {self.start_micro}" if self.start_micro else "")
        self.log.info(f"resumed from {self.run.resume_path} (epoch {state['epoch']} done); continuing at {where}")
        if self.run.changes and self.dist.is_main:
            self.log.metrics({"row": "recipe change", "epoch": self.start_epoch,
                              "changes": {k: {"old": a, "new": b} for k, (a, b) in self.run.changes.items()}})

    # ---------------------------------------------------------------- epochs and batches
    def epochs(self) -> Iterator[int]:
        if self.start_epoch >= self.epochs_total:
            self.log.info(f"all {self.epochs_total} epochs are done in {self.run.out_dir}; nothing to train")
        return iter(range(self.start_epoch, self.epochs_total))

    def batches(self, loader, epoch: int) -> Iterator[Any]:
        """The epoch's micro-batches, from the resume position on. Sets the LR schedule, counts data wait."""
        sampler = loader.batch_sampler
        if not isinstance(sampler, EpochBatches):
            raise TypeError("build the training DataLoader with batch_sampler=engine.loop.EpochBatches(...)")
        if not preemption.covers(loader):
            raise TypeError("build every DataLoader with engine.preemption.data_loader (the workers' signals)")
        skip = self.start_micro if epoch == self.start_epoch else 0
        self._train_images = len(loader.dataset)
        if self._resumed_images not in (None, self._train_images):  # set by a mid-epoch resume only
            raise UserError(f"{self.run.resume_path} stopped in the middle of epoch {epoch} with "
                            f"{self._resumed_images} training images, but the dataset now has {self._train_images}: "
                            "the epoch cannot continue where it stopped. Restore the dataset, or resume from the "
                            f"last epoch checkpoint (run.resume={self.run.ckpt_dir}/epoch_NNN.pt)")
        sampler.set_epoch(epoch, skip)
        self._begin_epoch(epoch, sampler.total(), skip)
        tick = time.perf_counter()
        for batch in loader:
            self._wait += time.perf_counter() - tick
            yield batch
            tick = time.perf_counter()

    def _begin_epoch(self, epoch: int, micro_total: int, skip: int) -> None:
        counts = torch.tensor([micro_total, -micro_total], dtype=torch.int64, device=self.device)
        distributed.all_reduce_max(counts, self.dist)
        if counts[0].item() != -counts[1].item():
            raise UserError(f"epoch {epoch}: the ranks have different numbers of batches "
                            f"({-counts[1].item()} to {counts[0].item()}); the training sampler must pad shards")
        n = self.plan.accumulate
        self.epoch, self.micro_total = epoch, micro_total
        self.steps_per_epoch = math.ceil(micro_total / n)
        self.micro = skip
        # groups already stepped: a stop comes after a step, so `skip` ends a group; the epoch's last
        # group may be short, so a stop after it (skip == micro_total) has stepped ceil(skip / n) times
        self.step = -(-skip // n)
        if not self._epoch_sums:
            z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
            self._epoch_sums = {"loss": z(), "micro": z()}
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        self._images, self._wait = 0, 0.0
        self._start = time.perf_counter()
        self.epoch_lr = self.schedule.set(self.optimizer, epoch, self.step, self.steps_per_epoch)
        if skip:  # the LR of the epoch's first step, as the uninterrupted run records it
            self.epoch_lr = self._resumed_lr
        self._progress = _progress(epoch, self.steps_per_epoch, self.cfg.run.print_freq, self.log.enabled)

    def _group_size(self) -> int:
        """Micro-batches in the current optimizer step's group (the epoch's last may be short)."""
        n = self.plan.accumulate
        start = self.step * n
        return min(n, self.micro_total - start)

    def _last_in_group(self) -> bool:
        return self.micro - self.step * self.plan.accumulate == self._group_size() - 1

    @contextlib.contextmanager
    def _sync_context(self):
        if isinstance(self.train_model, DistributedDataParallel) and not self._last_in_group():
            with self.train_model.no_sync():
                yield
        else:
            yield

    @contextlib.contextmanager
    def forward(self):
        """Around the forward pass: DDP's no_sync on all but a group's last micro-batch, and autocast."""
        with self._sync_context():
            if self.amp_dtype is None:
                yield
            else:
                with torch.autocast(self.device.type, dtype=self.amp_dtype):
                    yield

    def backward(self, loss: torch.Tensor, images: int, logs: dict[str, torch.Tensor] | None = None) -> bool:
        """Backward of one micro-batch; steps the optimizer after a group's last. True when it stepped."""
        size = self._group_size()
        last = self._last_in_group()
        with self._sync_context():
            scaled = loss / size
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        loss = loss.detach().to(torch.float64)
        self._group_loss = loss / size if self.micro == self.step * self.plan.accumulate \
            else self._group_loss + loss / size
        sums = self._epoch_sums
        sums["loss"] += loss
        sums["micro"] += 1
        for k, v in (logs or {}).items():
            key = f"log:{k}"
            sums[key] = sums.get(key, torch.zeros((), dtype=torch.float64, device=self.device)) + v.detach().double()
        self._images += images
        self.micro += 1
        if not last:
            return False
        self._optimizer_step()
        return True

    def _optimizer_step(self) -> None:
        opt, scaler = self.optimizer, self.scaler
        if scaler is not None and self.clip is not None:
            scaler.unscale_(opt)
        if self.clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.global_step += 1
        if self.ema is not None and self.step % self.ema_every == 0:
            self.ema.update(self.model)
        self._guard()
        if self._progress.due(self.step - 1):
            self._progress.update(self.step - 1, loss=self._group_loss.item(), lr=opt.param_groups[0]["lr"],
                                  img_s=self._images * self.dist.world_size / (time.perf_counter() - self._start))
        signum = self._preempt.agreed()
        if signum:
            self._stop(signum)
        if self.step < self.steps_per_epoch and self.schedule.needs_step_updates(self.epoch):
            self.schedule.set(opt, self.epoch, self.step, self.steps_per_epoch)

    # ---------------------------------------------------------------- divergence guard
    def _guard(self) -> None:
        loss, step = self._group_loss, self.step - 1
        factor = self.cfg.run.divergence_factor
        bad = ~torch.isfinite(loss)
        if self.loss_reference is not None and factor is not None:
            bad = bad | (loss > factor * self.loss_reference)
        self._first_bad = torch.where((self._first_bad < 0) & bad, step, self._first_bad)
        if self.loss_reference is None:  # the run's first optimizer step: the loss at the start
            ref = distributed.all_reduce_sum(loss.clone(), self.dist) / self.dist.world_size
            self.loss_reference = ref.item()
        if self.step % self._check_every == 0 or self.step == self.steps_per_epoch:
            first_bad = distributed.all_reduce_max(self._first_bad.clone(), self.dist).item()
            if first_bad >= 0:
                self._diverged(int(first_bad))

    def _diverged(self, step: int) -> None:
        last = self.run.ckpt_dir / "last.pt"
        kept = f"the last good checkpoint {last} is intact" if last.exists() else "no checkpoint was written yet"
        what = "is not finite" if self.loss_reference is None or self.cfg.run.divergence_factor is None else \
            (f"is not finite or above {self.cfg.run.divergence_factor:g} x the starting loss "
             f"{self.loss_reference:.4g} (run.divergence_factor)")
        raise Diverged(f"training loss {what} at epoch {self.epoch}, step {step}: stopping ({kept}). "
                       "Lower optimizer.lr, check the data, or try train.amp=none.")

    # ---------------------------------------------------------------- epoch end, checkpoints
    def epoch_stats(self) -> dict[str, float]:
        """The epoch's mean train loss (and of each logged part) over every rank, throughput, data wait."""
        keys = sorted(self._epoch_sums)
        sums = distributed.all_reduce_sum(torch.stack([self._epoch_sums[k] for k in keys]), self.dist).tolist()
        totals = dict(zip(keys, sums))
        elapsed = time.perf_counter() - self._start
        micro = max(totals["micro"], 1.0)
        out = {"train_loss": totals["loss"] / micro, "lr": self.epoch_lr,
               "images_per_s": self._images * self.dist.world_size / max(elapsed, 1e-9),
               "data_wait": self._wait / max(elapsed, 1e-9), "optimizer_steps": self.step}
        out.update({k[4:]: v / micro for k, v in totals.items() if k.startswith("log:")})
        self._epoch_sums = {}
        self.log.info(f"epoch {self.epoch}: {self.step} optimizer steps done; evaluating")
        return out

    def end_epoch(self, epoch: int, metrics: dict[str, Any], stats: dict[str, Any]) -> None:
        """Write the epoch's checkpoint, then record the epoch (metrics.jsonl, TensorBoard): a row never
        exists without its checkpoint (the checkpoint carries the row, and a resume writes a missing
        one). A signal received during the evaluation stops the run here, with nothing lost."""
        self.history.append({"epoch": epoch, **metrics})
        row = {"epoch": epoch, **metrics, **stats}
        self._save(epoch, {"epoch": epoch + 1, "micro": 0}, metrics, row)
        self.start_micro = 0
        self.log.metrics(row)
        self.log.scalars(epoch, {k: v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))})
        signum = self._preempt.agreed()
        if signum:
            self._stop(signum, evaluated=True)

    def _save(self, done_epoch: int, position: dict, metrics: dict | None,
              row: dict | None = None) -> Path | None:
        """The checkpoint (main process); a full disk is one message saying the previous one is intact."""
        try:
            return self._write_checkpoint(done_epoch, position, metrics, row)
        except checkpoint.NoSpace as exc:
            last = self.run.ckpt_dir / "last.pt"
            kept = f"the previous checkpoint {last} is intact" if last.exists() else "no checkpoint was written yet"
            raise UserError(f"{exc}; {kept}") from None

    def _write_checkpoint(self, done_epoch: int, position: dict, metrics: dict | None,
                          row: dict | None) -> Path | None:
        rngs = distributed.all_gather_object(seeding.rng_state(), self.dist)
        if not self.dist.is_main:
            return None
        state = checkpoint.new(self.model.state_dict(), optimizer=self.optimizer.state_dict(), epoch=done_epoch,
                               position=position, global_step=self.global_step, metrics=metrics or {},
                               history=self.history, config=to_dict(self.cfg), rng=rngs,
                               batch_plan=self.plan.describe(), loss_reference=self.loss_reference)
        if self.ema is not None:
            state["model_ema"] = self.ema.module.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.save_extra is not None:
            state.update(self.save_extra())
        ckpt_dir = self.run.ckpt_dir
        if position["micro"]:  # mid-epoch: last.pt only; the epoch files stay what averaging expects
            state["epoch_sums"] = {k: v.cpu() for k, v in self._epoch_sums.items()}
            state["epoch_lr"] = self.epoch_lr
            state["train_images"] = self._train_images
            checkpoint.save(state, ckpt_dir / "last.pt")
            return ckpt_dir / "last.pt"
        state["row"] = row  # its metrics.jsonl row, for a resume that finds the row missing
        path = ckpt_dir / f"epoch_{done_epoch:03d}.pt"
        checkpoint.save(state, path)
        checkpoint.link_or_save(path, ckpt_dir / "last.pt", state)
        checkpoint.prune(ckpt_dir, self.cfg.run.keep_checkpoints)
        return path

    def _stop(self, signum: int, evaluated: bool = False) -> None:
        """Stop for a signal: mid-epoch, with a checkpoint of the position; after an epoch's evaluation
        (`evaluated`), its checkpoint is already written."""
        import signal as _signal

        name = _signal.Signals(signum).name
        if evaluated:
            where = f"at the end of epoch {self.epoch} (after its evaluation): its checkpoint"
        else:
            self._save(self.epoch - 1, {"epoch": self.epoch, "micro": self.micro}, None)
            where = f"at epoch {self.epoch}, optimizer step {self.step}/{self.steps_per_epoch}:"
        note = preemption.requeue_if_slurm(signum) if self.dist.is_main else None
        msg = (f"stopped by {name} {where} {self.run.ckpt_dir / 'last.pt'} written; the same command resumes "
               "exactly" + (f" ({note})" if note else ""))
        self.log.info(msg)
        self.log.close()
        raise Preempted(signum, msg)

    def finish(self) -> None:
        """report.md, close the logs, restore signal handlers."""
        self._preempt.restore()
        self.log.close()
        if self.history:
            self.run.write_report()
        self.run.release()


def _progress(epoch: int, total: int, every: int, enabled: bool):
    from engine.runlog import Progress

    return Progress(f"epoch {epoch}", total, every, enabled)


# ============================================================================ backends and entry point


def set_backends(device: torch.device, cudnn_benchmark: bool, tf32: bool) -> None:
    """cuDNN autotuning and TF32. TF32 (A100 and newer) runs float32 matmuls/convolutions with a
    10-bit mantissa: faster, but not the fp32 the V100-era recipes were trained in, so it is a
    recipe switch (train.tf32, off for exact reproduction)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def launch(cls: type, main: Callable[[Any], Any], derived: Callable[[Any], dict] | None = None,
           argv: list[str] | None = None) -> None:
    """A script's entry point: parse the CLI (exit 2 on configuration problems), run main(cfg), turn a
    user-facing error into one message and exit status 1, a preemption into 128 + signal."""
    cfg = cli(cls, argv, derived=derived)
    prog = Path(sys.argv[0]).name
    try:
        main(cfg)
    except ConfigError as exc:
        print(f"{prog}: {len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''} with the configuration:",
              file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        sys.exit(2)
    except Preempted:
        raise
    except (UserError, FileNotFoundError, ValueError, KeyError) as exc:
        message = str(exc).strip()
        if "Original Traceback" in message:  # raised in a loader worker: keep the worker's whole error
            # "Type: text" and every line after it, which follow the last traceback's (indented) frames
            lines = message.splitlines()
            tb = max(i for i, line in enumerate(lines) if line.endswith("Traceback (most recent call last):"))
            start = next((i for i in range(tb + 1, len(lines)) if not lines[i][:1].isspace()), len(lines) - 1)
            message = "\n".join([lines[start].split(": ", 1)[-1], *lines[start + 1:]]).strip()
        if isinstance(exc, KeyError):  # str(KeyError("k")) is "'k'"; other messages may end in a quote
            message = message.strip("'\"")
        # a file name that is not UTF-8 holds surrogate escapes: shown as \udcXX whatever the stream's errors
        print(f"{prog}: error: {message.encode(errors='backslashreplace').decode()}", file=sys.stderr)
        sys.exit(1)
    finally:
        distributed.shutdown()
