"""Serve the per-example teacher targets a method asked for: FSP matrices, FitNets hints.

A method states what it could read instead of running the teacher every step in a
:class:`~distillery.teacher.TargetRequest`; the trainer hands that request here with the stage's
loader and the teacher-output cache folder, and gives the method what comes back (or nothing, and
the teacher runs every step). The targets live in the teacher-output cache
(:class:`distillery.cache.TeacherCache`), one entry per target, under the cache key of (teacher
weights, dataset, preprocessing, device). A damaged entry is rebuilt, never used.

The request's ``mode`` (the method's ``store_teacher`` parameter) decides:

- ``"auto"``: store when the teacher-output cache is on (``teacher.cache: auto`` gives the trainer
  its folder; an explicit ``store_dir`` counts too), the stage does not augment, and the targets
  of all training examples fit in ``teacher.cache_max_mb``; otherwise run the teacher every step.
  Either way the loss is the same (up to float rounding).
- ``True``: always store, whatever the size; an error if the stage augments. The folder is
  ``store_dir``, else the teacher-output cache folder, else the run folder, else (a plain loop
  that passes no folder) memory.
- ``False``: never store.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from distillery.cache import TeacherCache, cache_key, compute_per_example
from distillery.config import DEFAULT_MAX_MB
from distillery.data.loader import BatchLoader
from distillery.teacher import ModelOutputs, TargetRequest, Teacher

if TYPE_CHECKING:
    from distillery.methods.base import Method


def serve_targets(request: TargetRequest, teacher: Teacher | None, loader: BatchLoader, *,
                  cache_dir: Path | None = None, run_dir: Path | None = None,
                  max_mb: float) -> dict[str, Tensor] | None:
    """The stored targets by entry name (rows = training examples, on the loader's device), or None
    when the teacher is to run every step (see the module docstring for when).

    ``cache_dir`` is the teacher-output cache folder (None: the cache is off), ``run_dir`` the
    fallback folder of an explicit ``store_teacher=true``, ``max_mb`` the size budget of ``auto``.
    """
    folder = _store_folder(request, teacher, loader, cache_dir, run_dir, max_mb)
    if folder is False:
        return None
    dataset = loader.dataset

    def compute(names: list[str]) -> dict[str, Tensor]:
        def wanted(out: ModelOutputs) -> dict[str, Tensor]:
            return {name: value for name, value in request.targets(out).items() if name in names}

        return compute_per_example(teacher, dataset, wanted, request.layers, loader.device)

    if folder is None:
        found = compute(list(request.entries))
    else:
        found = TeacherCache(folder, cache_key(teacher, dataset, loader.device)).get_or_compute_many(
            list(request.entries), compute, count=len(dataset))
    return {name: value.to(loader.device) for name, value in found.items()}


def _store_folder(request: TargetRequest, teacher: Teacher | None, loader: BatchLoader, cache_dir: Path | None,
                  run_dir: Path | None, max_mb: float) -> Path | None | bool:
    """Where to store the targets (None: in memory), or False when the teacher runs every step."""
    if request.mode is False:
        return False
    explicit = request.mode is True
    if loader.shuffle and loader.augment.active:
        if not explicit:
            return False
        raise ValueError(
            f"method {request.method!r} store_teacher=true keeps one teacher target per training example, which is "
            f"only valid without augmentation, but this stage augments (crop_padding={loader.augment.crop_padding}, "
            f"hflip={loader.augment.hflip}); turn the stage's train.augment off or set store_teacher=false"
        )
    if teacher is None:
        if not explicit:
            return False
        raise ValueError(f"method {request.method!r} store_teacher=true needs the teacher to compute its targets once")
    folder = Path(request.folder) if request.folder else cache_dir
    if explicit:
        return folder if folder is not None else run_dir
    if folder is None or stored_mb(request.entries, len(loader.dataset)) > max_mb:
        return False
    return folder


def stored_mb(shapes: dict[str, tuple[int, ...]], count: int) -> float:
    """Size in MB of ``count`` examples' float32 targets of the given per-example shapes."""
    return count * sum(math.prod(shape) for shape in shapes.values()) * 4 / 2**20


def prepare_stored_targets(method: Method, teacher: Teacher | None, loader: BatchLoader,
                           cache_dir: Path | None = None, *, run_dir: Path | None = None,
                           max_mb: float = DEFAULT_MAX_MB) -> bool:
    """In a plain training loop: serve ``method``'s :meth:`~distillery.methods.Method.target_request`
    (after its ``setup``) and hand the targets over; True when it now reads stored targets."""
    request = method.target_request()
    stored = None if request is None else serve_targets(request, teacher, loader, cache_dir=cache_dir,
                                                        run_dir=run_dir, max_mb=max_mb)
    if stored is not None:
        method.use_stored_targets(stored)
    return stored is not None
