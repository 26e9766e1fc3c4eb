"""Runs of a reproduction: what each network is trained from, where it lives, and what it costs.

A :class:`RunSpec` is everything that determines one trained network: model, stages (method,
parameters, training settings), data (which subset, which classes left out), seed, and the runs
(or early snapshots of runs) that teach it. Its :attr:`RunSpec.key` hashes all of that, teachers
included through their own keys, and names its folder: ``<out>/runs/<role>-<key>/<role>/``. So a
finished run is found and reused by any later invocation that asks for the same network, and an
unfinished one continues from its checkpoint (``pipeline.train_model`` with ``resume``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillery.config import DataConfig, ModelConfig, RunConfig, TrainConfig, fingerprint
from distillery.data import ImageDataset, load_idx_dataset
from distillery.methods import Teacher, method_class
from distillery.pipeline import TrainedModel, load_trained_model, train_model
from distillery.train import evaluate, load_checkpoint, resolve_device
from distillery.train.loop import CHECKPOINT_NAME, snapshot_path

# ------------------------------------------------------------------ specs


@dataclass(frozen=True)
class DataSpec:
    """Which data a run sees.

    The training subset is the first ``train_size`` examples of a permutation of the training split
    drawn with ``split_seed`` (each seed of an experiment gets its own subset; all settings of one
    seed share it); the next ``val_size`` examples are held out for validation. The test subset
    (``test_size``, None = all) is drawn with seed 0, the same for every seed. ``omit_classes`` are
    removed from the training subset (Hinton's omitted-class transfer set).
    """

    dataset: str = "fashion_mnist"
    root: str | None = None
    train_size: int | None = None
    val_size: int = 0
    test_size: int | None = None
    split_seed: int = 0
    omit_classes: tuple[int, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "root": self.root, "train_size": self.train_size, "val_size": self.val_size,
                "test_size": self.test_size, "split_seed": self.split_seed, "omit_classes": list(self.omit_classes)}


@dataclass(frozen=True)
class Stage:
    """One stage of a run: a registered method, its parameters, the training settings (a TrainConfig dict)."""

    method: str
    params: dict[str, Any]
    train: dict[str, Any]

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.train)


@dataclass(frozen=True)
class TeacherRef:
    """A teaching network: the finished ``run``, or its weights after ``snapshot`` epochs (if given)."""

    run: RunSpec
    snapshot: float | None = None

    @property
    def key(self) -> str:
        return self.run.key if self.snapshot is None else f"{self.run.key}@{self.snapshot:g}"


@dataclass(frozen=True)
class RunSpec:
    """One network to train; ``label`` is for people, everything else goes into :attr:`key`."""

    label: str
    model: dict[str, Any]
    stages: tuple[Stage, ...]
    data: DataSpec
    seed: int
    teachers: tuple[TeacherRef, ...] = ()
    snapshots: tuple[float, ...] = ()
    device: str = field(default="cpu", compare=False)

    @property
    def key(self) -> str:
        return fingerprint({
            "model": ModelConfig.model_validate(self.model).model_dump(mode="json"),
            "stages": [[s.method, s.params, s.train_config().key_fields()] for s in self.stages],
            "data": self.data.as_dict(), "seed": self.seed, "teachers": [t.key for t in self.teachers],
            "snapshots": list(self.snapshots),
        })

    @property
    def role(self) -> str:
        """A folder-safe form of the label, with the seed."""
        slug = re.sub(r"[^A-Za-z0-9.=]+", "_", self.label).strip("_").lower()
        return f"{slug}-s{self.seed}"

    def run_dir(self, out: Path) -> Path:
        return runs_root(out) / f"{self.role}-{self.key}" / self.role

    def describe_stages(self) -> str:
        return " → ".join(f"{s.method}×{s.train.get('epochs', '?')}ep" for s in self.stages)


def model_text(spec: dict[str, Any]) -> str:
    """``resnet8`` or ``mlp(hidden=[800, 800])``: a model spec for reports."""
    args = ", ".join(f"{k}={v}" for k, v in spec.get("kwargs", {}).items())
    return f"{spec['name']}({args})" if args else spec["name"]


def runs_root(out: Path) -> Path:
    return Path(out) / "runs"


# ------------------------------------------------------------------ data


def _take(data: ImageDataset, index: torch.Tensor) -> ImageDataset:
    return ImageDataset(data.images[index], data.labels[index], data.mean, data.std, data.num_classes)


class DataStore:
    """Loads each split once and cuts the subsets :class:`DataSpec` describes."""

    def __init__(self) -> None:
        self._splits: dict[tuple[str, str | None, str], ImageDataset] = {}

    def split(self, spec: DataSpec, name: str) -> ImageDataset:
        key = (spec.dataset, spec.root, name)
        if key not in self._splits:
            self._splits[key] = load_idx_dataset(spec.dataset, name, spec.root)
        return self._splits[key]

    def train_val(self, spec: DataSpec) -> tuple[ImageDataset, ImageDataset | None]:
        full = self.split(spec, "train")
        n = len(full) if spec.train_size is None else spec.train_size
        if n + spec.val_size > len(full):
            raise ValueError(f"{spec.dataset}: {n} training + {spec.val_size} validation examples asked for, "
                             f"but the training split holds {len(full)}")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(spec.split_seed))
        train = _take(full, perm[:n])
        val = _take(full, perm[n:n + spec.val_size]) if spec.val_size else None
        if spec.omit_classes:
            train = train.without_classes(spec.omit_classes)
        return train, val

    def test(self, spec: DataSpec) -> ImageDataset:
        return self.split(spec, "test").subset(spec.test_size, seed=0)

    def pair(self, spec: DataSpec) -> tuple[ImageDataset, ImageDataset]:
        return self.train_val(spec)[0], self.test(spec)


# ------------------------------------------------------------------ running


def run_status(spec: RunSpec, out: Path) -> str:
    """'done' (a finished checkpoint), 'partial' (an unfinished one) or 'todo'."""
    path = spec.run_dir(out) / CHECKPOINT_NAME
    if not path.exists():
        return "todo"
    try:
        return "done" if load_checkpoint(path).get("complete") else "partial"
    except Exception:  # unreadable: training it stops with the checkpoint's error, the file is kept
        return "partial"


class Runner:
    """Trains (or reuses) runs under ``out`` and hands back their networks; counts what it did."""

    def __init__(self, out: str | Path, *, progress: bool = True,
                 echo: Callable[[str], None] = print) -> None:
        self.out = Path(out)
        self.progress = progress
        self.echo = echo
        self.data = DataStore()
        self.counts = {"trained": 0, "reused": 0}
        self._done: dict[str, TrainedModel] = {}

    def result(self, spec: RunSpec) -> TrainedModel:
        """The trained network of ``spec``: from memory, from its finished folder, or trained now."""
        if spec.key in self._done:
            return self._done[spec.key]
        teachers = [self.teacher_model(ref) for ref in spec.teachers]
        status = run_status(spec, self.out)
        self.counts["reused" if status == "done" else "trained"] += 1
        if status != "done":
            self.echo(f"[reproduce] {'continuing' if status == 'partial' else 'training'} {spec.label} "
                      f"(seed {spec.seed}): {spec.describe_stages()}")
        config = RunConfig.model_validate({
            "name": spec.run_dir(self.out).parent.name, "output_dir": str(runs_root(self.out)), "seed": spec.seed,
            "device": spec.device,
            "data": DataConfig(dataset=spec.data.dataset, root=spec.data.root, train_subset=spec.data.train_size,
                               test_subset=spec.data.test_size).model_dump(),
            "teacher": {"model": spec.model}, "student": {"model": spec.model},
        })
        stages = [(s.method, s.params, s.train_config()) for s in spec.stages]
        trained = train_model(
            config, spec.role, ModelConfig.model_validate(spec.model), stages, self.data.pair(spec.data),
            teacher=Teacher(teachers) if teachers else None,
            teacher_key=fingerprint({"teachers": [t.key for t in spec.teachers]}) if teachers else "",
            teacher_cache=self.out / "cache", resume=True, overwrite=True, progress=self.progress,
            snapshot_epochs=spec.snapshots,
        )
        self._done[spec.key] = trained
        return trained

    def teacher_model(self, ref: TeacherRef) -> nn.Module:
        """The network of a teacher reference (trained first if needed), in eval mode."""
        trained = self.result(ref.run)
        if ref.snapshot is None:
            return trained.model
        path = snapshot_path(trained.run_dir, ref.snapshot)
        if not path.exists():
            raise FileNotFoundError(f"{path}: the snapshot after {ref.snapshot:g} epochs of {ref.run.label} is "
                                    f"missing; delete {trained.run_dir} to train that run again")
        model, _ = load_trained_model(path, ModelConfig.model_validate(ref.run.model), self.data.test(ref.run.data))
        return model.to(resolve_device(ref.run.device)).eval()

    def accuracy(self, spec: RunSpec) -> float:
        """Test accuracy (%) at the end of the run's training (its last logged evaluation)."""
        return 100 * self.result(spec).history[-1]["test_accuracy"]

    def evaluate_model(self, model: nn.Module, spec: RunSpec) -> float:
        """Test accuracy (%) of any network on ``spec``'s test set."""
        return 100 * evaluate(model, self.data.test(spec.data), device=resolve_device(spec.device))["accuracy"]


# ------------------------------------------------------------------ cost estimates

# CPU milliseconds per image, one thread (process time, measured with short timings of a few dozen
# to a few hundred batches of 128 on 28×28 inputs; see docs/reproduce.md): (train step, forward).
MS_PER_IMAGE: dict[str, tuple[float, float]] = {
    "mlp_hinton_teacher": (0.256, 0.061),
    "mlp[1200, 1200]": (0.239, 0.058),
    "mlp[800, 800]": (0.104, 0.032),
    "mlp[400, 400]": (0.035, 0.012),
    "cnn16": (0.714, 0.268),
    "cnn8": (0.248, 0.070),
    "resnet8": (1.44, 0.58),
    "resnet14": (2.55, 0.72),
    "resnet20": (3.91, 1.12),
    "resnet26": (5.34, 1.58),
}


# Whole runs through the Trainer (one epoch per stage of quick-budget runs of each experiment) took
# 1.09-1.35x the sum of the parts above (augmentation, checkpoints, logging, Python overhead).
RUN_OVERHEAD = 1.25


def cost_key(model: dict[str, Any]) -> str:
    kwargs = model.get("kwargs", {})
    if model["name"] == "mlp":
        return f"mlp{list(kwargs.get('hidden', (800, 800)))}"
    if model["name"] == "cnn":
        return f"cnn{kwargs.get('width', 16)}"
    return model["name"]


def model_cost(model: dict[str, Any], pixels: int = 28 * 28) -> tuple[float, float] | None:
    """(train, forward) ms per image for ``model``, scaled from 28×28 by pixel count; None if unknown."""
    found = MS_PER_IMAGE.get(cost_key(model))
    if found is None:
        return None
    scale = pixels / (28 * 28)
    return found[0] * scale, found[1] * scale


def estimate_seconds(spec: RunSpec, n_train: int, n_test: int, pixels: int = 28 * 28) -> float | None:
    """Estimated CPU seconds of one run: training steps, teacher passes (on the fly, or once when
    cached/stored, as the Trainer decides), and the per-epoch test evaluation. None if a model's cost is unknown."""
    own = model_cost(spec.model, pixels)
    teachers = [model_cost(t.run.model, pixels) for t in spec.teachers]
    if own is None or any(t is None for t in teachers):
        return None
    teacher_forward = sum(t[1] for t in teachers if t is not None)
    ms = 0.0
    for stage in spec.stages:
        train = stage.train_config()
        cls = method_class(stage.method)
        on_the_fly = cls.needs_teacher and teacher_forward and (
            train.augment.crop_padding > 0 or train.augment.hflip or stage.method in ("fsp", "fitnets"))
        if stage.method == "fsp" and stage.params.get("store_teacher"):
            on_the_fly = False
        per_image = own[0] + (teacher_forward if on_the_fly else 0.0)
        ms += train.epochs * n_train * per_image
        if cls.needs_teacher and not on_the_fly:
            ms += n_train * teacher_forward  # the cache or the stored matrices, once
        ms += train.epochs * n_test * own[1]
    return RUN_OVERHEAD * ms / 1000


def format_minutes(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds / 60:.1f}"


def plan_table(specs: Sequence[RunSpec], out: Path, estimates: dict[str, float | None]) -> str:
    """The plan by setting: how many runs (seeds), their stages, how many are done, estimated minutes."""
    groups: dict[str, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(spec.label, []).append(spec)
    lines = [f"{'runs':>4}  {'done':>4}  {'min/run':>7}  {'min':>6}  setting (stages)"]
    for label, group in groups.items():
        done = sum(run_status(s, out) == "done" for s in group)
        each = [estimates[s.key] for s in group]
        total = None if any(e is None for e in each) else sum(each)  # type: ignore[arg-type]
        lines.append(f"{len(group):>4}  {done:>4}  {format_minutes(each[0]):>7}  {format_minutes(total):>6}  "
                     f"{label} ({group[0].describe_stages()}; seeds {', '.join(str(s.seed) for s in group)})")
    return "\n".join(lines)


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)
