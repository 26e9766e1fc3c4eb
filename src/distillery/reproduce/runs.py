"""Runs of a reproduction: how an experiment names its runs, where they live, and what they cost.

Experiments describe each network as a :class:`~distillery.spec.RunSpec` (:func:`run_spec` and
:func:`stage` build them from plain names and settings) and train them with an
:class:`ExperimentRunner`, the package's :class:`~distillery.runner.Runner` with every run in
``<out>/runs/<label>-s<seed>-<key>/<label>-s<seed>/`` and continued or reused across invocations.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from distillery.config import ModelConfig, TrainConfig
from distillery.methods import create_method, parse_method_spec
from distillery.runner import Runner, TrainedModel, default_folder
from distillery.spec import DataSpec, RunSpec, StageSpec, TeacherRef
from distillery.train import evaluate, load_checkpoint, resolve_device
from distillery.train.loop import CHECKPOINT_NAME

__all__ = ["DataSpec", "ExperimentRunner", "RunSpec", "TeacherRef", "run_spec", "stage"]

# ------------------------------------------------------------------ building specs


def stage(method: str, params: dict[str, Any], train: dict[str, Any]) -> StageSpec:
    """A stage from a method name, its parameters and a TrainConfig mapping (validated here)."""
    return StageSpec(parse_method_spec({"name": method, **params}), TrainConfig.model_validate(train))


def run_spec(label: str, model: dict[str, Any], stages: Sequence[StageSpec], data: DataSpec, seed: int,
             teachers: Sequence[TeacherRef] = (), *, snapshots: Sequence[float] = (), device: str = "cpu",
             cache: str | None = None) -> RunSpec:
    """A run of an experiment: ``model`` is a ModelConfig mapping (``{"name": "resnet8"}``)."""
    from distillery.spec import CacheSpec

    return RunSpec(label, ModelConfig.model_validate(model), tuple(stages), data, seed, tuple(teachers),
                   tuple(snapshots), device=device, cache=CacheSpec(cache))


def runs_root(out: Path) -> Path:
    return Path(out) / "runs"


# ------------------------------------------------------------------ running


def run_status(spec: RunSpec, out: Path) -> str:
    """'done' (a finished checkpoint), 'partial' (an unfinished one) or 'todo'."""
    path = default_folder(Path(out))(spec) / CHECKPOINT_NAME
    if not path.exists():
        return "todo"
    try:
        return "done" if load_checkpoint(path).get("complete") else "partial"
    except Exception:  # unreadable: training it stops with the checkpoint's error, the file is kept
        return "partial"


class ExperimentRunner(Runner):
    """The runner of one experiment's output folder: runs placed by key, continued when unfinished,
    the teacher-output cache in ``<out>/cache``; plus the measurements experiments take of runs."""

    def __init__(self, out: str | Path, *, progress: bool = True, echo: Callable[[str], None] = print) -> None:
        super().__init__(resume=True, overwrite=True, progress=progress, echo=echo,
                         folder_for=default_folder(Path(out)))
        self.out = Path(out)

    def train(self, spec: RunSpec) -> TrainedModel:
        from dataclasses import replace

        from distillery.spec import CacheSpec

        if spec.cache.folder is None:
            spec = replace(spec, cache=CacheSpec(str(self.out / "cache"), spec.cache.max_mb))
        return super().train(spec)

    def accuracy(self, spec: RunSpec) -> float:
        """Test accuracy (%) at the end of the run's training (its last logged evaluation)."""
        return 100 * self.train(spec).test_accuracy

    def evaluate_model(self, model: nn.Module, spec: RunSpec) -> float:
        """Test accuracy (%) of any network on ``spec``'s test set."""
        return 100 * evaluate(model, self.data.test(spec.data), device=resolve_device(spec.device))["accuracy"]

    def snapshot_model(self, ref: TeacherRef) -> nn.Module:
        """A teaching run's network (or its snapshot), sized by that run's own data."""
        assert ref.run is not None
        return self.teacher_model(ref, self.data.train_val(ref.run.data)[0])


# ------------------------------------------------------------------ cost estimates

# CPU milliseconds per image, one thread (process time, measured with short timings of a few dozen
# to a few hundred batches of 128 on 28×28 inputs; see docs/reproduce.md): (train step, forward).
MS_PER_IMAGE: dict[str, tuple[float, float]] = {
    "mlp_hinton_teacher": (0.256, 0.061),
    "mlp[1200, 1200]": (0.239, 0.058),
    "mlp[800, 800]": (0.104, 0.032),
    "mlp[400, 400]": (0.035, 0.012),
    "mlp[100, 100]": (0.012, 0.004),
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


def cost_key(model: ModelConfig) -> str:
    kwargs = model.kwargs
    if model.name == "mlp":
        return f"mlp{list(kwargs.get('hidden', (800, 800)))}"
    if model.name == "cnn":
        return f"cnn{kwargs.get('width', 16)}"
    return model.name


def model_cost(model: ModelConfig, pixels: int = 28 * 28) -> tuple[float, float] | None:
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
    for item in spec.stages:
        train, method = item.train, create_method(item.method)
        # the logit cache serves un-augmented stages; feature targets are stored only when asked to
        stored = item.method.model_dump().get("store_teacher") is True
        on_the_fly = method.needs_teacher and teacher_forward and not stored and (
            train.augment.crop_padding > 0 or train.augment.hflip or bool(method.teacher_layers))
        per_image = own[0] + (teacher_forward if on_the_fly else 0.0)
        ms += train.epochs * n_train * per_image
        if method.needs_teacher and not on_the_fly:
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
