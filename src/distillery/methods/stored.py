"""Per-example teacher targets computed once and stored: FSP matrices, FitNets hints.

A frozen teacher on un-augmented data gives each training example the same features every epoch,
so a method whose loss reads only a function of them (FSP's matrices, FitNets' hint map) can
compute it once per example and read it back by the batch's dataset indices instead of running
the teacher every step (the FSP paper's speed-up: 35 → 19 s per 100 iterations). The targets live
in the teacher-output cache (:class:`distillery.cache.TeacherCache`), one entry per target, under
the cache key of (teacher weights, dataset, preprocessing, device); the entry name holds the
teacher layer names (``fsp_stem__stage1``, ``hint_stage2``). A damaged entry is rebuilt, never used.

A method's ``store_teacher`` parameter decides, in :meth:`~distillery.methods.Method.prepare`:

- ``"auto"`` (default): store when the teacher-output cache is on (``teacher.cache: auto``, the
  default, gives the trainer its folder; an explicit ``store_dir`` counts too), the stage does not
  augment, and the targets of all training examples fit in ``teacher.cache_max_mb``; otherwise run
  the teacher every step. Either way the loss is the same (up to float rounding).
- ``true``: always store, whatever the size; an error if the stage augments. The folder is
  ``store_dir``, else the teacher-output cache folder, else the run folder, else (a plain loop
  that passes no folder) memory.
- ``false``: never store.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from torch import Tensor

from distillery.cache import TeacherCache, cache_key, compute_per_example
from distillery.data.loader import BatchLoader
from distillery.methods.base import ModelOutputs, Teacher

# Largest stored targets (all training examples) that ``store_teacher: auto`` keeps without being
# asked, MB (``teacher.cache_max_mb``). FSP over the default ResNet pairs, 60k 28×28 images: ~650 MB.
DEFAULT_MAX_MB = 1024.0


StoreMode = Literal["auto"] | bool


def store_teacher_field() -> Any:
    """The ``store_teacher`` parameter of a method with stored teacher targets."""
    return Field("auto", description="store the teacher's per-example targets once instead of running the teacher "
                                     "every step: auto (when the teacher cache is on, the stage does not augment and "
                                     "they fit in teacher.cache_max_mb), true (always; error with augmentation), "
                                     "false (never)")


def store_dir_field() -> Any:
    """The ``store_dir`` parameter of a method with stored teacher targets."""
    return Field(None, description="folder for the stored targets (default: the teacher cache folder, else the "
                                   "run folder)")


def stored_targets(
    method: str,
    mode: StoreMode,
    store_dir: str | None,
    teacher: Teacher | None,
    loader: BatchLoader,
    *,
    shapes: dict[str, tuple[int, ...]],
    layers: Sequence[str],
    targets: Callable[[ModelOutputs], dict[str, Tensor]],
    cache_dir: Path | None = None,
    run_dir: Path | None = None,
    max_mb: float | None = None,
) -> dict[str, Tensor] | None:
    """The stored targets by entry name (rows = training examples, on the loader's device), or None
    when the teacher is to run every step (see the module docstring for when: ``mode`` and
    ``store_dir`` are the method's ``store_teacher`` and ``store_dir``).

    ``shapes``: each entry's per-example shape (for the size check, before anything is computed);
    ``targets``: a batch's teacher outputs (with ``layers`` tapped) → the entries, rows = examples.
    ``cache_dir`` is the teacher-output cache folder (None: the cache is off), ``run_dir`` the
    fallback folder of an explicit ``store_teacher=true``, ``max_mb`` the size budget of ``auto``.
    """
    if mode is False:
        return None
    explicit = mode is True
    if loader.shuffle and loader.augment.active:
        if not explicit:
            return None
        raise ValueError(
            f"{method} store_teacher=true keeps one teacher target per training example, which is only valid "
            f"without augmentation, but this stage augments (crop_padding={loader.augment.crop_padding}, "
            f"hflip={loader.augment.hflip}); turn the stage's train.augment off or set store_teacher=false"
        )
    if teacher is None:
        if not explicit:
            return None
        raise ValueError(f"{method} store_teacher=true needs the teacher to compute its targets once")
    dataset = loader.dataset
    folder = Path(store_dir) if store_dir else cache_dir
    if not explicit:
        budget = DEFAULT_MAX_MB if max_mb is None else max_mb
        if folder is None or stored_mb(shapes, len(dataset)) > budget:
            return None
    elif folder is None:
        folder = run_dir

    def compute(names: list[str]) -> dict[str, Tensor]:
        def wanted(out: ModelOutputs) -> dict[str, Tensor]:
            return {name: value for name, value in targets(out).items() if name in names}

        return compute_per_example(teacher, dataset, wanted, layers, loader.device)

    if folder is None:
        found = compute(list(shapes))
    else:
        found = TeacherCache(folder, cache_key(teacher, dataset, loader.device)).get_or_compute_many(
            list(shapes), compute, count=len(dataset))
    return {name: value.to(loader.device) for name, value in found.items()}


def stored_mb(shapes: dict[str, tuple[int, ...]], count: int) -> float:
    """Size in MB of ``count`` examples' float32 targets of the given per-example shapes."""
    return count * sum(math.prod(shape) for shape in shapes.values()) * 4 / 2**20
