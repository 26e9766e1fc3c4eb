"""Train or reuse the networks :class:`~distillery.spec.RunSpec` objects describe — the one entry point.

:meth:`Runner.train` trains a run's teachers first (each is a run too, or a checkpoint file), loads
its data once per split, decides what to do with its folder (reuse a finished run of the same key,
continue an unfinished one, refuse a folder of other settings unless asked to move it aside) and
hands the rest to the :class:`~distillery.train.Trainer`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distillery.data import BatchLoader, ImageDataset, stratified_split
from distillery.data.sources import DataSource, PythonSource, load_data
from distillery.deploy.export import export_model
from distillery.fsio import LOCK_NAME, FolderLock, atomic_write
from distillery.models.registry import AllowCode, CodePolicy
from distillery.networks import build_model, load_trained_model
from distillery.spec import SPEC_FORMAT, DataSpec, RunSpec, TeacherRef
from distillery.teacher import Teacher
from distillery.train import Callback, Trainer, distributed, load_checkpoint, resolve_device, seed_everything
from distillery.train.loop import CHECKPOINT_NAME, snapshot_path
from distillery.train.state import EpochRecord
from distillery.train.tensorboard import TensorBoardLogger

WEIGHTS_NAME = "model.safetensors"  # the trained network alone, loadable without distillery
COST_NAME = "cost.json"  # seconds in the teacher, the student, data and evaluation (Trainer.cost)


def _read_cost(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save_weights(model: nn.Module, spec: RunSpec, data: ImageDataset, path: Path) -> None:
    """The network's weights as safetensors beside its checkpoint (its model spec in the header),
    verified against the network on a few test inputs, for programs that do not use distillery."""
    inputs = next(BatchLoader(data.subset(min(64, len(data))), 64).epoch(0)).inputs
    meta = {"model": spec.model.model_dump(mode="json"), "num_classes": data.num_classes, "run_key": spec.key}
    export_model(model, inputs[:2], path, "safetensors", verify_inputs=inputs, metadata=meta)


class RunFolderError(ValueError):
    """An output folder holds a run that must not be silently reused or overwritten."""


@dataclass
class TrainedModel:
    """A trained network with its run's history (one record per epoch) and folder."""

    spec: RunSpec
    model: nn.Module
    history: list[EpochRecord]
    run_dir: Path | None
    cost: dict | None = None  # where the training time went (Trainer.cost), kept in cost.json beside the checkpoint

    @property
    def role(self) -> str:
        return self.spec.label

    @property
    def test_accuracy(self) -> float:
        """The last evaluation's top-1 accuracy (a fraction), NaN when the history is empty."""
        return self.history[-1]["test_accuracy"] if self.history else float("nan")


class DataStore:
    """Loads each data source once and cuts the subsets a :class:`DataSpec` describes.

    ``allow_code``: the user's consent to call the Dataset factory of a ``python`` source.
    """

    def __init__(self, allow_code: AllowCode | CodePolicy = False) -> None:
        self.allow_code = CodePolicy.of(allow_code)
        self._loaded: dict[str, tuple[ImageDataset, ImageDataset]] = {}

    def split(self, spec: DataSpec, name: str) -> ImageDataset:
        """The whole ``train`` or ``test`` split of the spec's source."""
        source = spec.data_source
        key = source.model_dump_json()
        if key not in self._loaded:
            self._loaded[key] = load_data(source, seed=0, allow_code=self._permits(source))
        return self._loaded[key][0 if name == "train" else 1]

    def _permits(self, source: DataSource) -> bool:
        targets = [t for t in (getattr(source, "train", None), getattr(source, "test", None))
                   if isinstance(source, PythonSource) and t]
        return bool(targets) and all(self.allow_code.permits(t.partition(":")[0]) for t in targets)

    def train_val(self, spec: DataSpec) -> tuple[ImageDataset, ImageDataset | None]:
        """The training subset (classes omitted) and the held-out validation examples (None if none)."""
        full = self.split(spec, "train")
        n = len(full) if spec.train_size is None else spec.train_size
        if n + spec.val_size > len(full):
            raise ValueError(f"{spec.name}: {n} training + {spec.val_size} validation examples asked for "
                             f"(data.train_subset), but the training split holds {len(full)}")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(spec.split_seed))
        train = full.take(perm[:n]) if spec.train_size is not None or spec.val_size else full
        val = full.take(perm[n:n + spec.val_size]) if spec.val_size else None
        if spec.omit_classes:
            train = train.without_classes(spec.omit_classes)
        return train, val

    def test(self, spec: DataSpec) -> ImageDataset:
        full = self.split(spec, "test")
        if spec.test_size is not None and spec.test_size > len(full):
            raise ValueError(f"{spec.name}: a test subset of {spec.test_size} examples asked for (data.test_subset), "
                             f"but the test split holds {len(full)}")
        return full.subset(spec.test_size, seed=spec.test_seed)

    def pair(self, spec: DataSpec) -> tuple[ImageDataset, ImageDataset]:
        """What a run trains on and is evaluated on: the training subset and the test subset, or, with
        ``validation_fraction``, the rest of the training subset and its stratified held-out part. The
        samples of both must have one shape."""
        train = self.train_val(spec)[0]
        if spec.validation_fraction:
            return stratified_split(train, spec.validation_fraction, spec.split_seed)
        test = self.test(spec)
        if train.inputs.shape[1:] != test.inputs.shape[1:]:
            raise ValueError(f"{spec.name}: training samples are {tuple(train.inputs.shape[1:])} but test samples "
                             f"{tuple(test.inputs.shape[1:])}; both splits need samples of one shape")
        return train, test


def prepare_run_dir(run_dir: Path, key: str, *, resume: bool, overwrite: bool) -> str:
    """Decide what to do with ``run_dir``: 'new', 'reuse' (finished, same settings) or 'resume'.

    A folder with files but no checkpoint (a run killed before its first checkpoint) is restarted
    by ``resume``; a checkpoint of another key, or of an earlier run format, needs ``overwrite``,
    which moves the folder aside.
    """
    path = run_dir / CHECKPOINT_NAME
    if not path.exists():
        if run_dir.exists() and any(p.name != LOCK_NAME for p in run_dir.iterdir()) and not (overwrite or resume):
            raise RunFolderError(f"{run_dir} exists and holds files but no checkpoint; pass --resume to start it "
                                 "again there, --overwrite to move it aside, or choose another --set name=...")
        return "new"
    state = load_checkpoint(path)
    meta = state.get("meta", {})
    same = meta.get("fingerprint") == key and meta.get("format") == SPEC_FORMAT
    if same and state.get("complete"):
        return "reuse"
    if same and resume:
        return "resume"
    if not overwrite:
        if meta.get("format") != SPEC_FORMAT:
            what = "a run made by an earlier version of distillery (its settings cannot be compared with these)"
        else:
            what = "an unfinished run of these settings" if same else "a run made from other settings"
        advice = "pass --resume to continue it, or " if same else ""
        raise RunFolderError(f"{run_dir} holds {what}; {advice}pass --overwrite to move it aside and start "
                             "again, or choose another --set name=...")
    backup = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    backup.mkdir()
    for item in run_dir.iterdir():  # the folder itself, and the lock this process holds in it, stay
        if item.name != LOCK_NAME:
            shutil.move(str(item), backup / item.name)
    return "new"


def default_folder(root: Path) -> Callable[[RunSpec], Path]:
    """Folders by key, for runs without one of their own: ``<root>/runs/<label>-s<seed>-<key>/<label>-s<seed>``."""
    def folder(spec: RunSpec) -> Path:
        slug = re.sub(r"[^A-Za-z0-9.=]+", "_", spec.label).strip("_").lower() + f"-s{spec.seed}"
        return Path(root) / "runs" / f"{slug}-{spec.key}" / slug

    return folder


class Runner:
    """Trains (or reuses) runs and hands back their networks; counts what it did.

    ``folder_for`` places runs that have no ``folder`` of their own (see :func:`default_folder`).
    ``callbacks`` are given to every run's trainer. A finished run is announced as reused.
    ``allow_code`` is the user's consent to import the ``package.module:callable`` models named.
    Each run holds its folder's lock while it decides on and trains in it: a second process on the
    same folder is refused with a message naming the first.
    """

    def __init__(self, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                 echo: Callable[[str], None] = print, folder_for: Callable[[RunSpec], Path] | None = None,
                 data: DataStore | None = None, callbacks: Sequence[Callback] = (),
                 allow_code: AllowCode | CodePolicy = False) -> None:
        self.resume, self.overwrite, self.progress, self.echo = resume, overwrite, progress, echo
        self.allow_code = allow_code
        self.folder_for = folder_for
        self.data = data if data is not None else DataStore(allow_code)
        self.callbacks = tuple(callbacks)
        self.counts = {"trained": 0, "reused": 0}
        self._done: dict[str, TrainedModel] = {}

    def folder(self, spec: RunSpec) -> Path:
        if spec.folder is not None:
            return Path(spec.folder)
        if self.folder_for is None:
            raise ValueError(f"run {spec.label!r} has no folder and this runner places none")
        return self.folder_for(spec)

    def train(self, spec: RunSpec) -> TrainedModel:
        """The trained network of ``spec``: from memory, from its finished folder, or trained now."""
        if spec.key in self._done:
            return self._done[spec.key]
        train_data, test_data = self.data.pair(spec.data)
        # a validation slice beside the test split is evaluated every epoch (with validation_fraction it *is* the test)
        has_slice = spec.data.val_size and not spec.data.validation_fraction
        val_data = self.data.train_val(spec.data)[1] if has_slice else None
        teachers = [self.teacher_model(ref, train_data) for ref in spec.teachers]
        device = resolve_device(spec.device)  # bad input fails before any folder is touched
        seed_everything(spec.seed, spec.deterministic)
        model = build_model(spec.model, train_data, allow_code=self.allow_code)
        run_dir = self.folder(spec)
        with self._folder_lock(run_dir, spec):
            history, action, cost = self._fit(spec, model, run_dir, device, teachers, train_data, test_data,
                                              val_data)
            model.eval()
            if distributed.current().is_main and action != "reuse":
                atomic_write(run_dir / COST_NAME, json.dumps(cost, indent=1), what="cost report")
            if distributed.current().is_main and not (run_dir / WEIGHTS_NAME).exists():
                save_weights(model, spec, test_data, run_dir / WEIGHTS_NAME)
        trained = TrainedModel(spec, model, history, run_dir, _read_cost(run_dir / COST_NAME))
        self.counts["reused" if action == "reuse" else "trained"] += 1
        if action == "reuse":
            self.echo(f"{spec.label}: reusing {run_dir}, {100 * trained.test_accuracy:.2f} %")
        self._done[spec.key] = trained
        return trained

    def _folder_lock(self, run_dir: Path, spec: RunSpec) -> contextlib.AbstractContextManager:
        """This run folder's lock (rank 0 only: the other ranks of a torchrun job write nothing)."""
        if not distributed.current().is_main:
            return contextlib.nullcontext()
        run_dir.mkdir(parents=True, exist_ok=True)
        return FolderLock(run_dir, f"training {spec.label}")

    def _fit(self, spec: RunSpec, model: nn.Module, run_dir: Path, device: torch.device, teachers: list[nn.Module],
             train_data: ImageDataset, test_data: ImageDataset, val_data: ImageDataset | None,
             ) -> tuple[list[EpochRecord], str, dict]:
        # Distributed: rank 0 alone inspects (and may move aside) the folder; every rank gets its decision.
        action = distributed.current().on_main(
            lambda: prepare_run_dir(run_dir, spec.key, resume=self.resume, overwrite=self.overwrite))
        trainer = Trainer(
            model, train_data, test_data, [stage.build() for stage in spec.stages],
            teacher=Teacher(teachers) if teachers else None,
            teacher_cache=spec.cache.folder, teacher_cache_max_mb=spec.cache.max_mb, teacher_store=spec.cache.store,
            run_dir=run_dir,
            device=device, seed=spec.seed, amp=spec.amp, eval_batch_size=spec.eval_batch_size, label=spec.label,
            progress=self.progress, sync_batchnorm=spec.sync_batchnorm, snapshot_epochs=spec.snapshots,
            callbacks=[*self.callbacks, *self._loggers(spec, run_dir)],
            val_data=val_data,
            meta={"model": spec.model.model_dump(mode="json"), "fingerprint": spec.key, "format": SPEC_FORMAT,
                  "role": spec.label, "dataset": spec.data.name, "num_classes": train_data.num_classes},
        )
        history = trainer.fit(resume=action in ("reuse", "resume"))
        return history, action, trainer.cost

    @staticmethod
    def _loggers(spec: RunSpec, run_dir: Path) -> list[Callback]:
        """The optional loggers a run asked for (``logging.tensorboard``)."""
        return [TensorBoardLogger(run_dir / "tensorboard")] if spec.tensorboard else []

    def teacher_model(self, ref: TeacherRef, data: ImageDataset) -> nn.Module:
        """The network of a teacher reference (trained first if needed), in eval mode on its device."""
        if ref.checkpoint is not None:
            model, _ = load_trained_model(ref.checkpoint, ref.model, data, allow_code=self.allow_code)
            return model.eval()
        assert ref.run is not None
        trained = self.train(ref.run)
        if ref.snapshot is None:
            return trained.model
        path = snapshot_path(trained.run_dir, ref.snapshot)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the snapshot after {ref.snapshot:g} epochs of {ref.run.label} is "
                                    f"missing; delete {trained.run_dir} to train that run again")
        model, _ = load_trained_model(path, ref.run.model, data, allow_code=self.allow_code)
        return model.to(resolve_device(ref.run.device)).eval()
