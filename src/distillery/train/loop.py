"""The training loop: one loop for teachers, students alone and distilled students.

A run is a list of stages (one for plain or Hinton training; two for FitNets or FSP), each a method
trained for some epochs with its own optimiser and schedule. After every epoch the student is
evaluated, the metrics are appended to ``metrics.jsonl`` and a checkpoint holding everything needed
to continue is written atomically. ``fit(resume=True)`` continues from it and reaches the same
final weights as an uninterrupted run (batches are a pure function of seed, epoch and step; the RNG
state is checkpointed).

Under torchrun the same loop runs on every rank; the distributed parts are the blocks marked
"Distributed" (see :mod:`distillery.train.distributed` for what is synchronised and how).
"""

from __future__ import annotations

import json
import math
import operator
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial, reduce
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from distillery.cache import CachedTeacher
from distillery.config import TrainConfig
from distillery.data import Augment, Batch, BatchLoader, ImageDataset
from distillery.losses import ensemble_probs
from distillery.methods.base import Method, Teacher, run_student
from distillery.train import distributed
from distillery.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from distillery.train.distributed import DistContext
from distillery.train.optim import build_optimizer, build_scheduler

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


def snapshot_path(run_dir: str | Path, epoch: float, stage: int = 1) -> Path:
    """Where :class:`Trainer` keeps the weights reached after ``epoch`` (may be fractional) of ``stage``."""
    return Path(run_dir) / f"snapshot-stage{stage}-epoch{epoch:g}.pt"


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the run stopped and kept its last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can be resumed."""


@dataclass
class Stage:
    """One stage of training: a method, trained with the settings of ``train``."""

    method: Method
    train: TrainConfig


@dataclass
class Position:
    stage: int = 0
    epoch: int = 0
    step: int = 0


@dataclass
class _EpochSums:
    terms: dict[str, Tensor] = field(default_factory=dict)
    correct: Tensor | None = None
    examples: int = 0
    seconds: float = 0.0


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed torch's CPU and CUDA generators; optionally allow only deterministic kernels."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """The torch device for a config value, with a clear error when it is not available here.

    Under torchrun, ``cuda`` means this process's GPU, ``cuda:LOCAL_RANK``.
    """
    device = torch.device(distributed.rank_device(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; use device: cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available on this machine; use device: cpu")
    return device


def prefer_channels_last(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Store a convolutional network's 4-D weights channels-last (NHWC) when running on the CPU.

    On CPU, oneDNN's NHWC convolutions are measurably faster for the CIFAR/MNIST-size networks
    here (ResNet-8 training step ~20 % less time, SmallCNN ~30 %, ResNet-20 inference ~20 %, one
    thread; see ``distillery bench``). Networks without ``Conv2d`` are returned unchanged. Converts
    in place (like ``.to``); results agree with the default layout up to float rounding.
    """
    if torch.device(device).type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageDataset | BatchLoader, batch_size: int = 1000,
             device: torch.device | str | None = None, dist: DistContext | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``data`` (in eval mode).

    With ``dist``, ``data`` is this rank's shard of the test set (see :func:`shard`): the sums and
    counts are added over ranks, so every rank returns the metrics of the whole test set.
    """
    if isinstance(data, ImageDataset):
        device = device or next(model.parameters()).device
        data = BatchLoader(data, batch_size, device=device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=data.device, dtype=torch.float64)  # kept on the device: no sync per batch
    hits = torch.zeros((), device=data.device, dtype=torch.long)
    count = 0
    for batch in data.epoch(0):
        logits = model(batch.inputs).float()
        loss_sum += F.cross_entropy(logits, batch.targets, reduction="sum")
        hits += (logits.argmax(-1) == batch.targets).sum()
        count += len(batch.targets)
    model.train(was_training)
    sums = torch.stack([loss_sum, hits.double(), torch.tensor(float(count), dtype=torch.float64,
                                                                  device=data.device)])
    if dist is not None:
        dist.all_reduce_sum(sums)
    loss, correct, n = sums.tolist()
    return {"accuracy": correct / n, "loss": loss / n}


def shard(data: ImageDataset, dist: DistContext) -> ImageDataset:
    """This rank's share of an evaluation set: examples rank, rank + world_size, ... (no padding,
    so no example is counted twice when the sums are added over ranks)."""
    if not dist.enabled:
        return data
    if len(data) < dist.world_size:
        raise ValueError(f"the test set has {len(data)} examples, fewer than the {dist.world_size} ranks")
    return ImageDataset(data.images[dist.rank :: dist.world_size], data.labels[dist.rank :: dist.world_size],
                        data.mean, data.std, data.num_classes)


@torch.no_grad()
def _check_output_classes(model: nn.Module, example: Tensor, num_classes: int, label: str) -> None:
    """The trained network needs an output per class of the data (cross-entropy would fail obscurely)."""
    was_training = model.training
    model.eval()
    outputs = model(example[:2]).shape[-1]
    model.train(was_training)
    if outputs < num_classes:
        raise ValueError(f"[{label}] the network outputs {outputs} classes but the data has {num_classes} classes; "
                         "build it for the dataset's classes")


class _StudentWithMethod(nn.Module):
    """The student and the method as one module, so DistributedDataParallel synchronises the
    gradients of both (a method may hold learnable parts, such as a FitNets regressor)."""

    def __init__(self, student: nn.Module, method: Method) -> None:
        super().__init__()
        self.student = student
        self.method = method

    def forward(self, inputs: Tensor, teacher_out: Any, targets: Tensor,
                index: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        student_out = run_student(self.student, inputs, self.method.student_layers)
        return self.method(student_out, teacher_out, targets, index), student_out.logits


@torch.no_grad()
def evaluate_ensemble(models: Sequence[nn.Module], data: ImageDataset | BatchLoader, batch_size: int = 1000,
                      device: torch.device | str | None = None) -> dict[str, Any]:
    """Accuracy and loss of the ensemble that averages its members' probabilities, and of each member.

    The ensemble predicts p = (1/M) Σ_m softmax(z_m) (:func:`distillery.losses.ensemble_probs` at
    T = 1); its loss is the mean −log p_y. Returns ``{"ensemble": {...}, "members": [{...}, ...]}``,
    each with ``accuracy`` and ``loss``. Reports use this for every ensemble figure.
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    if isinstance(data, ImageDataset):
        device = device or next(models[0].parameters()).device
        data = BatchLoader(data, batch_size, device=device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    n_models = len(models)
    loss = torch.zeros(n_models + 1, device=data.device)
    correct = torch.zeros(n_models + 1, device=data.device, dtype=torch.long)
    for batch in data.epoch(0):
        logits = torch.stack([m(batch.inputs).float() for m in models])  # M×N×K
        probs = torch.cat([torch.softmax(logits, -1), ensemble_probs(logits).unsqueeze(0)])  # (M+1)×N×K
        p_true = probs.gather(-1, batch.targets.view(1, -1, 1).expand(n_models + 1, -1, 1)).squeeze(-1)
        loss += -torch.log(p_true.clamp_min(1e-12)).sum(-1)
        correct += (probs.argmax(-1) == batch.targets).sum(-1)
    for m, mode in zip(models, modes):
        m.train(mode)
    n = len(data.order(0))
    rows = [{"accuracy": correct[i].item() / n, "loss": loss[i].item() / n} for i in range(n_models + 1)]
    return {"ensemble": rows[-1], "members": rows[:-1]}


class Trainer:
    """Trains ``student`` through ``stages``; see the module docstring.

    ``run_dir`` (optional) receives ``checkpoint.pt`` and ``metrics.jsonl``. ``meta`` is stored in
    the checkpoint as is (the model spec and config fingerprint, so the run can be rebuilt and
    recognised). ``teacher_cache`` (a folder) turns on the teacher-output cache for the stages where
    it is exact: the method needs only the teacher's logits and the stage does not augment; methods
    with stored feature targets (FSP, FitNets) also keep them there, up to ``teacher_cache_max_mb``
    (see :mod:`distillery.methods.stored`).
    ``dist`` defaults to the process group this process has joined (torchrun), if any;
    ``sync_batchnorm`` converts the student's BatchNorm layers to SyncBatchNorm under DDP (CUDA only).
    ``snapshot_epochs`` keeps, besides the checkpoint, the weights reached after each of these epochs
    of every stage (fractions allowed: 0.05 is the step nearest 5 % of the first epoch, at least
    one step) in :func:`snapshot_path` files, loadable like a checkpoint (early, poorly trained
    teachers for Defective KD; learning-curve probes).
    """

    def __init__(
        self,
        student: nn.Module,
        train_data: ImageDataset,
        test_data: ImageDataset,
        stages: Sequence[Stage],
        *,
        teacher: Teacher | None = None,
        teacher_cache: str | Path | None = None,
        teacher_cache_max_mb: float | None = None,
        run_dir: str | Path | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        amp: bool = False,
        eval_batch_size: int = 1000,
        meta: dict[str, Any] | None = None,
        label: str = "train",
        progress: bool = True,
        echo: Callable[[str], None] | None = None,
        dist: DistContext | None = None,
        sync_batchnorm: bool = False,
        snapshot_epochs: Sequence[float] = (),
    ) -> None:
        if not stages:
            raise ValueError("a run needs at least one stage")
        longest = max(stage.train.epochs for stage in stages)
        if any(not 0 < e <= longest for e in snapshot_epochs):
            raise ValueError(f"snapshot_epochs must lie in (0, {longest}] (the longest stage's epochs), "
                             f"got {list(snapshot_epochs)}")
        self.snapshot_epochs = tuple(snapshot_epochs)
        self.device = torch.device(device)
        # --- Distributed: who we are; only rank 0 prints, shows progress and writes files.
        self.dist = dist if dist is not None else distributed.current()
        if sync_batchnorm and self.dist.enabled:
            if self.device.type != "cuda":
                raise ValueError("sync_batchnorm needs device cuda (torch's SyncBatchNorm runs on GPUs only)")
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.student = prefer_channels_last(student.to(self.device), self.device)
        self.teacher = teacher.to(self.device) if teacher is not None else None
        for member in self.teacher.members if self.teacher is not None else ():
            prefer_channels_last(member, self.device)
        self.teacher_cache = Path(teacher_cache) if teacher_cache is not None else None
        self.train_data = train_data
        self.stages = list(stages)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed = seed
        self.amp = amp and self.device.type == "cuda"
        self.meta = dict(meta or {})
        self.label = label
        self.progress = progress and self.dist.is_main
        self.echo = echo or (lambda line: tqdm.write(line, file=sys.stderr))
        if not self.dist.is_main:
            self.echo = lambda line: None
        self.test_loader = BatchLoader(shard(test_data, self.dist), eval_batch_size, device=self.device,
                                       keep_normalised=True)
        self.history: list[dict[str, Any]] = []
        self._stop_signal: int | None = None
        example = next(self.test_loader.epoch(0)).inputs[:8]
        _check_output_classes(self.student, example, train_data.num_classes, label)
        for s, stage in enumerate(self.stages):
            stage.method.to(self.device)
            stage.method.setup(self.student, self.teacher, example)
            stage.method.to(self.device)
            # Distributed: rank 0 fills the teacher cache first, then the other ranks read it.
            self.dist.main_first(partial(stage.method.prepare, self.teacher, self._train_loader(s), self.teacher_cache,
                                         run_dir=self.run_dir, max_mb=teacher_cache_max_mb))

    # ------------------------------------------------------------------ public

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir else None

    @property
    def writes_files(self) -> bool:
        return self.run_dir is not None and self.dist.is_main

    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Run every stage to the end (or continue a checkpointed run) and return the history."""
        position = Position()
        state = None
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            state = load_checkpoint(self.checkpoint_path, map_location=self.device)
            position = self._restore(state)
            if state.get("complete"):
                return self.history
            self.echo(f"[{self.label}] resuming at stage {position.stage + 1}, epoch {position.epoch + 1}, "
                      f"step {position.step}")
        elif self.dist.rank > 0:
            # Distributed: DDP gives every rank rank 0's initial weights; dropout masks should differ
            # per rank, so each rank > 0 draws from its own stream (checkpointed per rank).
            torch.manual_seed(torch.initial_seed() + self.dist.rank)
        if self.writes_files:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._rewrite_metrics()
        with self._signals_saved():
            for s in range(position.stage, len(self.stages)):
                resume_state = state if (state is not None and s == position.stage) else None
                start = position if s == position.stage else Position(stage=s)
                self._run_stage(s, start, resume_state)
        self._save(Position(len(self.stages), 0, 0), complete=True)
        return self.history

    # ------------------------------------------------------------------ stages and steps

    def _run_stage(self, s: int, start: Position, state: dict[str, Any] | None) -> None:
        stage = self.stages[s]
        cfg = stage.train
        method = stage.method
        loader = self._train_loader(s)
        teacher = self._stage_teacher(method, loader)
        # --- Distributed: the student and method are wrapped together so DDP averages the gradients of both.
        self._net: nn.Module = _StudentWithMethod(self.student, method)
        if self.dist.enabled:
            self._net = nn.parallel.DistributedDataParallel(
                self._net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # feature methods may leave part of the student out of a stage's loss (FitNets stage 1)
                find_unused_parameters=bool(method.student_layers),
            )
        self._optimizer = build_optimizer(chain(self.student.parameters(), method.parameters()), cfg.optimizer)
        self._scheduler = build_scheduler(self._optimizer, cfg.schedule, len(loader), cfg.epochs)
        self._grad_clip_norm = cfg.grad_clip_norm
        self._scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        sums = _EpochSums()
        if state is not None:
            self._optimizer.load_state_dict(state["optimizer"])
            self._scheduler.load_state_dict(state["scheduler"])
            self._scaler.load_state_dict(state["scaler"])
            sums = _EpochSums({k: v.to(self.device) for k, v in state["epoch_sums"]["terms"].items()},
                              state["epoch_sums"]["correct"], state["epoch_sums"]["examples"],
                              state["epoch_sums"]["seconds"])
            if not self.dist.is_main:  # the checkpoint holds the sums of all ranks; count them once
                sums = _EpochSums({k: torch.zeros_like(v) for k, v in sums.terms.items()},
                                  None if sums.correct is None else torch.zeros_like(sums.correct), 0, sums.seconds)
        check_every = 1 if self.device.type == "cpu" else 20
        snapshots = {max(1, round(e * len(loader))): e for e in self.snapshot_epochs if e <= cfg.epochs}
        terms: dict[str, Tensor] = {}
        for epoch in range(start.epoch, cfg.epochs):
            first_step = start.step if epoch == start.epoch else 0
            if first_step == 0:
                sums = _EpochSums()
            self.student.train()
            method.train()
            bar = tqdm(total=len(loader), initial=first_step, disable=not self.progress, leave=False,
                       desc=f"{self.label} [{method.name}] stage {s + 1}/{len(self.stages)} "
                            f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", file=sys.stderr)
            tick = time.perf_counter()
            for step, batch in enumerate(loader.epoch(epoch, first_step), start=first_step):
                terms, loss, logits = self._step(method, batch, teacher)
                for name, value in terms.items():  # one in-place op per term and step (no sync)
                    if name in sums.terms:
                        sums.terms[name].add_(value.detach(), alpha=len(batch.targets))
                    else:
                        sums.terms[name] = value.detach() * len(batch.targets)
                hits = (logits.detach().argmax(-1) == batch.targets).sum()
                sums.correct = hits if sums.correct is None else sums.correct + hits
                sums.examples += len(batch.targets)
                interval = cfg.checkpoint_every_steps
                save_now = bool(interval and (step + 1) % interval == 0 and step + 1 < len(loader))
                stop = self._check_step(terms, loss, Position(s, epoch, step),
                                        (step + 1) % check_every == 0 or save_now)
                bar.update(1)
                if epoch * len(loader) + step + 1 in snapshots and self.writes_files:
                    self._save_snapshot(s, snapshots[epoch * len(loader) + step + 1])
                if (step + 1) % 20 == 0 and self.progress:
                    elapsed = sums.seconds + time.perf_counter() - tick
                    total = sum(v for v in sums.terms.values()).item() / sums.examples
                    bar.set_postfix(loss=f"{total:.4f}", img_s=f"{sums.examples / max(elapsed, 1e-9):.0f}")
                if save_now or stop:
                    now = time.perf_counter()
                    sums.seconds += now - tick
                    tick = now
                    self._save(Position(s, epoch, step + 1), sums=sums)
                    if stop:
                        bar.close()
                        raise TrainingInterrupted(
                            f"[{self.label}] stopped by signal {self._stop_signal or 'on another rank'}; "
                            f"checkpoint saved to {self.checkpoint_path}. Continue with --resume."
                        )
            bar.close()
            self._check_finite(terms, Position(s, epoch, len(loader) - 1))
            sums.seconds += time.perf_counter() - tick
            self.dist.broadcast_buffers(self._net)  # rank 0's BatchNorm running statistics everywhere
            record = self._epoch_record(s, epoch, self._reduced(sums))
            self.history.append(record)
            self._append_metrics(record)
            self.echo(
                f"[{self.label}] stage {s + 1} ({method.name}) epoch {epoch + 1}/{cfg.epochs}: "
                f"loss {record['train_loss']:.4f}  test acc {record['test_accuracy']:.4f}  "
                f"{record['images_per_s']:.0f} img/s"
            )
            self._save(Position(s, epoch + 1, 0))

    def _train_loader(self, s: int) -> BatchLoader:
        """Stage ``s``'s training batches for this rank (also handed to ``method.prepare`` before training).

        Distributed: ``batch_size`` is global; each rank takes its share of every batch.
        """
        cfg = self.stages[s].train
        return BatchLoader(
            self.train_data, self._rank_batch_size(cfg.batch_size, s), shuffle=True,
            drop_last=len(self.train_data) >= cfg.batch_size,
            augment=Augment(cfg.augment.crop_padding, cfg.augment.hflip), seed=self.seed + 1000 * s,
            device=self.device, rank=self.dist.rank, world_size=self.dist.world_size,
        )

    def _stage_teacher(self, method: Method, loader: BatchLoader) -> Teacher | CachedTeacher | None:
        """The teacher for a stage: served from the cache when that is exact, else run on the fly.

        Distributed: rank 0 fills the cache first, then the other ranks read it.
        """
        if self.teacher is None or not method.needs_teacher:
            return None
        if self.teacher_cache is None or method.teacher_layers or loader.augment.active:
            return self.teacher
        teacher, folder = self.teacher, self.teacher_cache
        return self.dist.main_first(lambda: CachedTeacher.build(teacher, self.train_data, folder, self.device))

    def _step(self, method: Method, batch: Batch, teacher: Teacher | CachedTeacher | None,
              ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One optimisation step; returns the loss terms, their sum and the student's logits."""
        teacher_out = method.teacher_outputs(teacher, batch.inputs, batch.index)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            terms, logits = self._net(batch.inputs, teacher_out, batch.targets, batch.index)
        loss = reduce(operator.add, terms.values())  # not sum(): no extra 0 + ... op in the graph
        self._optimizer.zero_grad(set_to_none=True)
        self._scaler.scale(loss).backward()
        if self._grad_clip_norm is not None:
            self._scaler.unscale_(self._optimizer)  # clip the true gradients, not the loss-scaled ones
            params = [p for group in self._optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self._grad_clip_norm)
        self._scaler.step(self._optimizer)
        self._scaler.update()
        self._scheduler.step()
        return terms, loss, logits

    def _rank_batch_size(self, batch_size: int, s: int) -> int:
        world = self.dist.world_size
        if batch_size % world:
            raise ValueError(f"stage {s + 1}: batch_size {batch_size} is the global batch and must be divisible "
                             f"by the {world} processes (each takes batch_size / {world})")
        if world > 1 and len(self.train_data) < batch_size:
            raise ValueError(f"stage {s + 1}: {len(self.train_data)} training examples do not fill one global batch "
                             f"of {batch_size} over {world} processes; use a smaller batch_size")
        return batch_size // world

    def _check_step(self, terms: dict[str, Tensor], loss: Tensor, at: Position, check: bool) -> bool:
        """NaN/inf check and stop-signal check of one step; True if the run must checkpoint and stop.

        In one process the signal flag is read every step and the loss (a device sync) at ``check``
        steps. Under DDP both happen only at ``check`` steps, in one all-reduce, so that every rank
        stops (or raises) at the same step even when only one of them got the signal or the NaN.
        """
        if not self.dist.enabled:
            if check:
                self._check_finite(terms, at, loss)
            return self._stop_signal is not None
        return check and self._check_finite(terms, at, loss)

    def _check_finite(self, terms: dict[str, Tensor], at: Position, loss: Tensor | None = None) -> bool:
        """Raise :class:`NonFiniteLossError` if a loss term (or their sum ``loss``) is NaN or infinite;
        return whether a stop signal arrived (under DDP: on any rank, both learnt in one all-reduce).

        With ``loss`` given, one check of the sum stands for all terms (a sum of finite terms is
        finite unless it overflows); the terms are looked at only when it fails.
        """
        bad: dict[str, Tensor] = {}
        if loss is None or not torch.isfinite(loss):
            bad = {name: value for name, value in terms.items() if not torch.isfinite(value).all()}
            if not bad and loss is not None:
                bad = {"total (the sum of the terms)": loss}
        stop = self._stop_signal is not None
        if self.dist.enabled:  # --- Distributed: a NaN or a signal on any rank concerns every rank
            flags = torch.tensor([float(bool(bad)), float(stop)], device=self.device)
            any_bad, stop = (bool(f) for f in self.dist.all_reduce_max(flags).tolist())
            if any_bad and not bad:
                raise NonFiniteLossError(f"[{self.label}] a loss term became NaN or infinite on another rank at "
                                         f"stage {at.stage + 1}, epoch {at.epoch + 1}, step {at.step + 1}")
        for name, value in bad.items():
            kept = f"; the last good checkpoint is kept at {self.checkpoint_path}" if self.checkpoint_path else ""
            raise NonFiniteLossError(
                f"[{self.label}] loss term {name!r} is {value.item()} at stage {at.stage + 1}, "
                f"epoch {at.epoch + 1}, step {at.step + 1}{kept}. Lower the learning rate or check the data."
            )
        return stop

    def _reduced(self, sums: _EpochSums) -> _EpochSums:
        """The epoch sums of all ranks (this rank's own in one process)."""
        if not self.dist.enabled:
            return sums
        names = sorted(sums.terms)
        correct = sums.correct if sums.correct is not None else 0
        flat = torch.stack([sums.terms[k].double() for k in names]
                           + [torch.as_tensor(correct, device=self.device).double(),
                              torch.tensor(float(sums.examples), device=self.device, dtype=torch.float64)])
        self.dist.all_reduce_sum(flat)
        terms = {k: flat[i] for i, k in enumerate(names)}
        return _EpochSums(terms, flat[-2].round().long(), int(flat[-1].item()), sums.seconds)

    def _epoch_record(self, s: int, epoch: int, sums: _EpochSums) -> dict[str, Any]:
        test = evaluate(self.student, self.test_loader, dist=self.dist)
        n = max(sums.examples, 1)
        record: dict[str, Any] = {
            "stage": s + 1,
            "method": self.stages[s].method.name,
            "epoch": epoch + 1,
            "lr": self._optimizer.param_groups[0]["lr"],
            "train_loss": sum(v for v in sums.terms.values()).item() / n,
        }
        record.update({f"train_{k}": v.item() / n for k, v in sums.terms.items()})
        record["train_accuracy"] = (sums.correct.item() / n) if sums.correct is not None else math.nan
        record["test_accuracy"] = test["accuracy"]
        record["test_loss"] = test["loss"]
        record["images_per_s"] = sums.examples / max(sums.seconds, 1e-9)
        record["seconds"] = sums.seconds
        return record

    # ------------------------------------------------------------------ persistence

    def _save(self, position: Position, *, complete: bool = False, sums: _EpochSums | None = None) -> None:
        """Write the checkpoint. Under DDP every rank calls this: the epoch sums and each rank's RNG
        state are gathered, rank 0 writes, and the others wait for it at a barrier."""
        if not self.checkpoint_path:
            return
        sums = self._reduced(sums or _EpochSums())
        rank_rngs = [t.cpu() for t in self.dist.all_gather(torch.get_rng_state().to(self.device))]  # nccl: on GPU
        if not self.dist.is_main:
            self.dist.barrier()
            return
        state: dict[str, Any] = {
            "kind": "distillery-run",
            "meta": self.meta,
            "student": self.student.state_dict(),
            "methods": [stage.method.state_dict() for stage in self.stages],
            "position": {"stage": position.stage, "epoch": position.epoch, "step": position.step},
            "history": self.history,
            "complete": complete,
            "rng": {"cpu": torch.get_rng_state(), "cpu_ranks": rank_rngs,
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "epoch_sums": {"terms": dict(sums.terms), "correct": sums.correct, "examples": sums.examples,
                           "seconds": sums.seconds},
        }
        if not complete:
            state["optimizer"] = self._optimizer.state_dict()
            state["scheduler"] = self._scheduler.state_dict()
            state["scaler"] = self._scaler.state_dict()
        try:
            save_checkpoint(state, self.checkpoint_path)
        finally:
            self.dist.barrier()

    def _save_snapshot(self, s: int, epoch: float) -> None:
        """The student's weights now, as a checkpoint-like file that :func:`load_weights` reads."""
        assert self.run_dir is not None
        save_checkpoint({"kind": "distillery-snapshot", "meta": {**self.meta, "snapshot_epoch": epoch},
                         "student": self.student.state_dict(), "stage": s + 1, "epoch": epoch},
                        snapshot_path(self.run_dir, epoch, s + 1))

    def _restore(self, state: dict[str, Any]) -> Position:
        source = str(self.checkpoint_path)
        load_model_state(self.student, state["student"], source)
        for stage, method_state in zip(self.stages, state["methods"]):
            stage.method.load_state_dict(method_state)
        self.history = list(state["history"])
        rank_rngs = state["rng"].get("cpu_ranks", [])
        own = rank_rngs[self.dist.rank] if len(rank_rngs) == self.dist.world_size else state["rng"]["cpu"]
        torch.set_rng_state(own.cpu())
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        p = state["position"]
        return Position(p["stage"], p["epoch"], p["step"])

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if self.writes_files:
            with open(self.run_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _rewrite_metrics(self) -> None:
        """Make metrics.jsonl agree with the checkpoint (drops epochs logged after it was written)."""
        assert self.run_dir is not None
        path = self.run_dir / METRICS_NAME
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        tmp.replace(path)

    @contextmanager
    def _signals_saved(self):
        """On SIGINT/SIGTERM, finish the current step, save a checkpoint and stop."""
        if threading.current_thread() is not threading.main_thread() or not self.checkpoint_path:
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self._stop_signal is not None:  # a second signal: stop at once
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
