"""The training loop: one loop for teachers, students alone and distilled students.

A run is a list of stages (one for plain or Hinton training; two for FitNets or FSP), each a method
trained for some epochs with its own optimiser and schedule. After every epoch the student is
evaluated, the callbacks see the epoch's record (the metrics file, the progress display) and a
checkpoint holding everything needed to continue is written atomically. ``fit(resume=True)``
continues from it and reaches the same final weights as an uninterrupted run (batches are a pure
function of seed, epoch and step; the RNG state is checkpointed).

Reading order: :meth:`Trainer.fit` → :meth:`Trainer._setup` (each method's set-up and stored
targets) → :meth:`Trainer._run_stage` → :meth:`Trainer._run_epoch` → :meth:`Trainer._step`.
Under torchrun the same loop runs on every rank; the distributed parts are the blocks marked
"Distributed" (see :mod:`distillery.train.distributed` for what is synchronised and how).
"""

from __future__ import annotations

import json
import operator
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial, reduce
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from distillery.cache import CachedTeacher
from distillery.config import DEFAULT_MAX_MB, TrainConfig
from distillery.data import Augment, Batch, BatchLoader, ImageDataset
from distillery.fsio import atomic_write
from distillery.methods.base import Method
from distillery.stored_targets import serve_targets
from distillery.teacher import Teacher, run_student
from distillery.teacher_store import StoredTeacher, StoreSettings, replays_views, soft_target_temperature, store_serves
from distillery.train.callbacks import (
    Callback,
    EpochEvent,
    MetricsFile,
    ProgressDisplay,
    Snapshots,
    StageEvent,
    StepEvent,
)
from distillery.train.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from distillery.train.cost import CostClock, TimedTeacher
from distillery.train.devices import prefer_channels_last
from distillery.train.distributed import DistContext
from distillery.train.distributed import current as current_context
from distillery.train.evaluation import check_output_classes, evaluate, shard
from distillery.train.optim import build_optimizer, build_scheduler
from distillery.train.sanity import SanityChecks
from distillery.train.state import (
    RUN_KIND,
    SNAPSHOT_KIND,
    EpochRecord,
    EpochSums,
    Position,
    restore_rng,
    rng_state,
)

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


@dataclass
class StageRun:
    """Everything one stage trains with, built when the stage starts."""

    stage: Stage
    loader: BatchLoader
    teacher: TimedTeacher | None
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    event: StageEvent

    @property
    def method(self) -> Method:
        return self.stage.method


class Trainer:
    """Trains ``student`` through ``stages``; see the module docstring.

    ``run_dir`` (optional) receives ``checkpoint.pt`` and ``metrics.jsonl``. ``meta`` is stored in
    the checkpoint as is (the model spec and run key, so the run can be rebuilt and recognised).
    ``teacher_cache`` (a folder) turns on the teacher-output cache for the stages where it is exact:
    the method needs only the teacher's logits and the stage does not augment; methods with stored
    feature targets (FSP, FitNets) also keep them there, up to ``teacher_cache_max_mb`` (see
    :mod:`distillery.stored_targets`). ``teacher_store`` (:class:`~distillery.teacher_store.StoreSettings`)
    makes the logit methods' augmented stages replay E stored epochs of views and, with the cache
    on, read the teacher's outputs on them from the teacher store. ``dist`` defaults to the process
    group this process has joined (torchrun), if any; ``sync_batchnorm`` converts the student's
    BatchNorm layers to SyncBatchNorm under DDP (CUDA only). ``snapshot_epochs``: see
    :class:`~distillery.train.callbacks.Snapshots`. ``val_data`` (held-out training
    examples) is evaluated after every epoch too (``val_accuracy``). ``callbacks`` run after the built-in ones
    (progress display, metrics file, snapshots, the cost clock behind :attr:`cost`).
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
        teacher_store: StoreSettings | None = None,
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
        callbacks: Sequence[Callback] = (),
        val_data: ImageDataset | None = None,
    ) -> None:
        if not stages:
            raise ValueError("a run needs at least one stage")
        longest = max(stage.train.epochs for stage in stages)
        if any(not 0 < e <= longest for e in snapshot_epochs):
            raise ValueError(f"snapshot_epochs must lie in (0, {longest}] (the longest stage's epochs), "
                             f"got {list(snapshot_epochs)}")
        self.device = torch.device(device)
        # --- Distributed: who we are; only rank 0 prints, shows progress and writes files.
        self.dist = dist if dist is not None else current_context()
        if sync_batchnorm and self.dist.enabled:
            if self.device.type != "cuda":
                raise ValueError("sync_batchnorm needs device cuda (torch's SyncBatchNorm runs on GPUs only)")
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.student = prefer_channels_last(student.to(self.device), self.device)
        self.teacher = teacher.to(self.device) if teacher is not None else None
        for member in self.teacher.members if self.teacher is not None else ():
            prefer_channels_last(member, self.device)
        self.teacher_cache = Path(teacher_cache) if teacher_cache is not None else None
        self.teacher_cache_max_mb = DEFAULT_MAX_MB if teacher_cache_max_mb is None else teacher_cache_max_mb
        self.teacher_store = teacher_store if teacher_store is not None else StoreSettings()
        self.train_data, self.test_data, self.val_data = train_data, test_data, val_data
        self.stages = list(stages)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.seed, self.amp, self.label = seed, amp and self.device.type == "cuda", label
        self.meta, self.eval_batch_size = dict(meta or {}), eval_batch_size
        self.echo = echo or (lambda line: tqdm.write(line, file=sys.stderr))
        if not self.dist.is_main:
            self.echo = lambda line: None
        self.clock = CostClock()  # where the time goes: Trainer.cost
        self.callbacks = self._builtin_callbacks(progress and self.dist.is_main, snapshot_epochs) + list(callbacks)
        self.history: list[EpochRecord] = []
        self.current: StageRun | None = None  # the stage being trained (the last one after fit)
        self._stop_signal: int | None = None
        self._is_set_up = False

    def _builtin_callbacks(self, progress: bool, snapshot_epochs: Sequence[float]) -> list[Callback]:
        callbacks: list[Callback] = [ProgressDisplay(self.label, self.echo, live=progress),
                                     SanityChecks(self.label, self._probe_batch, self.train_data.num_classes,
                                                  self.echo), self.clock]
        if self.writes_files:
            callbacks.append(MetricsFile(self.run_dir / METRICS_NAME))
            if snapshot_epochs:
                callbacks.append(Snapshots(snapshot_epochs, self._save_snapshot))
        return callbacks

    # ------------------------------------------------------------------ public

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT_NAME if self.run_dir else None

    @property
    def writes_files(self) -> bool:
        return self.run_dir is not None and self.dist.is_main

    @property
    def cost(self) -> dict[str, Any]:
        """This process's cost report: seconds in the teacher, the student's steps, data, evaluation and
        the rest; the teacher stores' size, build and check times; the store's speed-up (see
        :mod:`distillery.train.cost`). It covers what this process ran (not the part before a resume)."""
        return self.clock.report()

    def fit(self, resume: bool = False) -> list[EpochRecord]:
        """Set up every stage's method, run every stage to the end (or continue a checkpointed
        run) and return the history: one :class:`~distillery.train.state.EpochRecord` per epoch."""
        self._setup()
        position, state = Position(), None
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
                resumed = state if (state is not None and s == position.stage) else None
                self._run_stage(s, position if s == position.stage else Position(stage=s), resumed)
        self._save(Position(len(self.stages), 0, 0), complete=True)
        return self.history

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        """Check the network against the data, set up each method, and give the methods that asked
        for them their stored teacher targets (computed once, or read from the cache)."""
        if self._is_set_up:
            return
        self.test_loader = BatchLoader(shard(self.test_data, self.dist), self.eval_batch_size, device=self.device,
                                       keep_normalised=True)
        self.val_loader = None if self.val_data is None else BatchLoader(
            shard(self.val_data, self.dist), self.eval_batch_size, device=self.device, keep_normalised=True)
        example = next(self.test_loader.epoch(0)).inputs[:8]
        check_output_classes(self.student, example, self.train_data.num_classes, self.label)
        for s, stage in enumerate(self.stages):
            stage.method.to(self.device)
            stage.method.setup(self.student, self.teacher, example)
            stage.method.to(self.device)
            request = stage.method.target_request()
            if request is None:
                continue
            loader = self._train_loader(s)
            # Distributed: rank 0 fills the teacher cache first, then the other ranks read it.
            stored = self.dist.main_first(partial(
                serve_targets, request, self.teacher, loader, cache_dir=self.teacher_cache, run_dir=self.run_dir,
                max_mb=self.teacher_cache_max_mb))
            if stored is not None:
                stage.method.use_stored_targets(stored)
        self._is_set_up = True

    def _probe_batch(self) -> Tensor:
        """A few test inputs on the device, for the sanity checks' look at the student's layers."""
        return next(self.test_loader.epoch(0)).inputs[:64]

    def _train_loader(self, s: int) -> BatchLoader:
        """Stage ``s``'s training batches for this rank (also what stored targets are computed from).

        Distributed: ``batch_size`` is global; each rank takes its share of every batch.
        """
        cfg, store = self.stages[s].train, self.teacher_store
        augment = Augment(cfg.augment.crop_padding, cfg.augment.hflip)
        # Stages the teacher store can serve replay its E epochs of views, drawn with its own seed.
        replay = self.teacher is not None and replays_views(self.stages[s].method, augment, store)
        return BatchLoader(
            self.train_data, self._rank_batch_size(cfg.batch_size, s), shuffle=True,
            drop_last=len(self.train_data) >= cfg.batch_size, augment=augment, seed=self.seed + 1000 * s,
            augment_seed=store.seed if replay else None, augment_epochs=store.epochs if replay else None,
            device=self.device, rank=self.dist.rank, world_size=self.dist.world_size,
        )

    def _rank_batch_size(self, batch_size: int, s: int) -> int:
        world = self.dist.world_size
        if batch_size % world:
            raise ValueError(f"stage {s + 1}: batch_size {batch_size} is the global batch and must be divisible "
                             f"by the {world} processes (each takes batch_size / {world})")
        if world > 1 and len(self.train_data) < batch_size:
            raise ValueError(f"stage {s + 1}: {len(self.train_data)} training examples do not fill one global batch "
                             f"of {batch_size} over {world} processes; use a smaller batch_size")
        return batch_size // world

    def _stage_teacher(self, method: Method, loader: BatchLoader) -> TimedTeacher | None:
        """The teacher a stage runs every step, timed by the cost clock: the teacher store's outputs
        on the stage's views when it serves them (see :mod:`distillery.teacher_store`), the cached
        logits when those are exact (the method reads only logits and the stage does not augment),
        else the teacher run on the fly.

        Distributed: rank 0 fills the cache or store first, then the other ranks read it.
        """
        if self.teacher is None or not method.runs_teacher_every_step:
            return None
        teacher, folder, store = self.teacher, self.teacher_cache, self.teacher_store
        if folder is None or method.teacher_layers:
            return self.clock.timed(teacher)
        if store_serves(method, loader, store):
            temperature = soft_target_temperature(method)
            if store.top_k is not None and temperature is None:
                raise ValueError(f"teacher.store_top_k={store.top_k} stores probabilities at one temperature, but "
                                 f"method {method.name!r} reads the teacher's raw or standardised logits, or learns "
                                 "its temperature; unset teacher.store_top_k")
            stored = self.dist.main_first(lambda: StoredTeacher.build(
                teacher, loader, folder, store, temperature=temperature, check_seed=self.seed))
            epochs = next(stage.train.epochs for stage in self.stages if stage.method is method)
            self.echo(f"[{self.label}] {stored.describe(epochs)}")
            return self.clock.timed(stored)
        if loader.augment.active:
            return self.clock.timed(teacher)
        return self.clock.timed(self.dist.main_first(
            lambda: CachedTeacher.build(teacher, self.train_data, folder, self.device)))

    def _start_stage(self, s: int, state: dict[str, Any] | None) -> StageRun:
        """Build stage ``s``'s loader, teacher, optimiser, schedule and loss scaler (restored from
        ``state`` when resuming inside this stage)."""
        stage = self.stages[s]
        cfg, method = stage.train, stage.method
        loader = self._train_loader(s)
        # --- Distributed: the student and method are wrapped together so DDP averages the gradients of both.
        net: nn.Module = _StudentWithMethod(self.student, method)
        if self.dist.enabled:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # feature methods may leave part of the student out of a stage's loss (FitNets stage 1)
                find_unused_parameters=bool(method.student_layers),
            )
        optimizer = build_optimizer(chain(self.student.parameters(), method.parameters()), cfg.optimizer)
        scheduler = build_scheduler(optimizer, cfg.schedule, len(loader), cfg.epochs)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
        event = StageEvent(self, s, len(self.stages), method.name, cfg.epochs, len(loader))
        return StageRun(stage, loader, self._stage_teacher(method, loader), net, optimizer, scheduler, scaler, event)

    # ------------------------------------------------------------------ stages, epochs and steps

    def _run_stage(self, s: int, start: Position, state: dict[str, Any] | None) -> None:
        run = self.current = self._start_stage(s, state)
        sums = EpochSums.from_state(state["epoch_sums"], self.device, self.dist.is_main) if state else EpochSums()
        for callback in self.callbacks:
            callback.on_stage_start(run.event)
        for epoch in range(start.epoch, run.stage.train.epochs):
            first_step = start.step if epoch == start.epoch else 0
            self._run_epoch(run, epoch, first_step, sums if first_step else EpochSums())
        for callback in self.callbacks:
            callback.on_stage_end(run.event)

    def _run_epoch(self, run: StageRun, epoch: int, first_step: int, sums: EpochSums) -> None:
        s, cfg, steps = run.event.stage, run.stage.train, run.event.steps
        self.student.train()
        run.method.train()
        run.method.start_epoch(epoch, cfg.epochs)
        if run.teacher is not None:
            run.teacher.start_epoch(epoch)  # a stored teacher serves (and checks) this epoch's views
        check_every = 1 if self.device.type == "cpu" else 20
        terms: dict[str, Tensor] = {}
        tick = time.perf_counter()
        for step, batch in enumerate(run.loader.epoch(epoch, first_step), start=first_step):
            event = StepEvent(run.event, epoch, step, sums, sums.seconds + time.perf_counter() - tick)
            for callback in self.callbacks:
                callback.on_step_start(event)
            terms, loss, logits = self._step(run, batch)
            sums.add(terms, logits, batch.targets)
            save_now = bool(cfg.checkpoint_every_steps and (step + 1) % cfg.checkpoint_every_steps == 0
                            and step + 1 < steps)
            stop = self._check_step(terms, loss, Position(s, epoch, step), (step + 1) % check_every == 0 or save_now)
            event = StepEvent(run.event, epoch, step, sums, sums.seconds + time.perf_counter() - tick)
            for callback in self.callbacks:
                callback.on_step_end(event)
            if save_now or stop:
                now = time.perf_counter()
                sums.seconds, tick = sums.seconds + now - tick, now
                self._save(Position(s, epoch, step + 1), run, sums)
                if stop:
                    raise TrainingInterrupted(
                        f"[{self.label}] stopped by signal {self._stop_signal or 'on another rank'}; "
                        f"checkpoint saved to {self.checkpoint_path}. Continue with --resume.")
        self._check_finite(terms, Position(s, epoch, steps - 1))
        sums.seconds += time.perf_counter() - tick
        self.dist.broadcast_buffers(run.net)  # rank 0's BatchNorm running statistics everywhere
        record = self._epoch_record(run, epoch, self._reduced(sums))
        self.history.append(record)
        for callback in self.callbacks:
            callback.on_epoch_end(EpochEvent(run.event, epoch, record))
        self._save(Position(s, epoch + 1, 0), run)

    def _step(self, run: StageRun, batch: Batch) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """One optimisation step; returns the loss terms, their sum and the student's logits."""
        teacher_out = run.method.teacher_outputs(run.teacher, batch.inputs, batch.index)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            terms, logits = run.net(batch.inputs, teacher_out, batch.targets, batch.index)
        loss = reduce(operator.add, terms.values())  # not sum(): no extra 0 + ... op in the graph
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if run.stage.train.grad_clip_norm is not None:
            run.scaler.unscale_(run.optimizer)  # clip the true gradients, not the loss-scaled ones
            params = [p for group in run.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, run.stage.train.grad_clip_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        return terms, loss, logits

    # ------------------------------------------------------------------ checks

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

    # ------------------------------------------------------------------ epoch records

    def _reduced(self, sums: EpochSums) -> EpochSums:
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
        return EpochSums(terms, flat[-2].round().long(), int(flat[-1].item()), sums.seconds)

    def _epoch_record(self, run: StageRun, epoch: int, sums: EpochSums) -> EpochRecord:
        test = evaluate(self.student, self.test_loader, dist=self.dist)
        n = max(sums.examples, 1)
        record: dict[str, Any] = {
            "stage": run.event.stage + 1,
            "method": run.method.name,
            "epoch": epoch + 1,
            "lr": run.optimizer.param_groups[0]["lr"],
            "train_loss": sums.mean_loss(),
        }
        record.update({f"train_{k}": v.item() / n for k, v in sums.terms.items()})
        record["train_accuracy"] = (sums.correct.item() / n) if sums.correct is not None else float("nan")
        record["test_accuracy"] = test["accuracy"]
        record["test_loss"] = test["loss"]
        if self.val_loader is not None:  # held-out training examples: for choosing an epoch without the test split
            val = evaluate(self.student, self.val_loader, dist=self.dist)
            record["val_accuracy"], record["val_loss"] = val["accuracy"], val["loss"]
        record["images_per_s"] = sums.examples / max(sums.seconds, 1e-9)
        record["seconds"] = sums.seconds
        return record  # type: ignore[return-value]

    # ------------------------------------------------------------------ persistence

    def _save(self, position: Position, run: StageRun | None = None, sums: EpochSums | None = None, *,
              complete: bool = False) -> None:
        """Write the checkpoint. Under DDP every rank calls this: the epoch sums and each rank's RNG
        state are gathered, rank 0 writes, and the others wait for it at a barrier."""
        if not self.checkpoint_path:
            return
        sums = self._reduced(sums or EpochSums())
        rngs = rng_state(self.dist, self.device)
        if not self.dist.is_main:
            self.dist.barrier()
            return
        state: dict[str, Any] = {
            "kind": RUN_KIND, "meta": self.meta, "student": self.student.state_dict(),
            "methods": [stage.method.state_dict() for stage in self.stages],
            "position": {"stage": position.stage, "epoch": position.epoch, "step": position.step},
            "history": self.history, "complete": complete, "rng": rngs, "epoch_sums": sums.as_state(),
        }
        if not complete and run is not None:
            state.update(optimizer=run.optimizer.state_dict(), scheduler=run.scheduler.state_dict(),
                         scaler=run.scaler.state_dict())
        try:
            save_checkpoint(state, self.checkpoint_path)
        finally:
            self.dist.barrier()

    def _save_snapshot(self, s: int, epoch: float) -> None:
        """The student's weights now, as a checkpoint-like file that :func:`load_weights` reads."""
        assert self.run_dir is not None
        save_checkpoint({"kind": SNAPSHOT_KIND, "meta": {**self.meta, "snapshot_epoch": epoch},
                         "student": self.student.state_dict(), "stage": s + 1, "epoch": epoch},
                        snapshot_path(self.run_dir, epoch, s + 1))

    def _restore(self, state: dict[str, Any]) -> Position:
        load_model_state(self.student, state["student"], str(self.checkpoint_path))
        for stage, method_state in zip(self.stages, state["methods"]):
            stage.method.load_state_dict(method_state)
        self.history = list(state["history"])
        restore_rng(state["rng"], self.dist)
        p = state["position"]
        return Position(p["stage"], p["epoch"], p["step"])

    def _rewrite_metrics(self) -> None:
        """Make metrics.jsonl agree with the checkpoint (drops epochs logged after it was written)."""
        assert self.run_dir is not None
        atomic_write(self.run_dir / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in self.history),
                     what="metrics file")

    @contextmanager
    def _signals_saved(self) -> Iterator[None]:
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
