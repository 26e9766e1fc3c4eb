"""The description of one training run: what network, from what data, through which stages, taught by whom.

A :class:`RunSpec` is everything that determines one trained network. Its :attr:`RunSpec.key`
hashes all of that (teachers included, through their own keys) and is stored in the run's
checkpoint, so a finished run is recognised and reused by any later invocation that asks for the
same network, and a folder holding other settings is never silently reused. Where and how it runs
(device, mixed precision, the folder, the teacher-output cache) are fields too, but not part of the
key: the same run may move to a GPU.

Every command builds its runs as RunSpecs — the YAML recipe (:mod:`distillery.recipe`),
``distillery reproduce``, ``bench``, ``tune`` and ``compare`` — and :class:`distillery.runner.Runner`
trains them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillery.config import DEFAULT_MAX_MB, ModelConfig, TrainConfig, fingerprint
from distillery.data.sources import DataSource, IdxSource
from distillery.methods import MethodParams, create_method
from distillery.teacher_store import StoreSettings
from distillery.train import Stage

# Bumped when the meaning of a key changes; checkpoints of other formats are refused with a message.
SPEC_FORMAT = 2


@dataclass(frozen=True)
class DataSpec:
    """Which data a run sees.

    The training subset is the first ``train_size`` examples (None: all) of a permutation of the
    training split drawn with ``split_seed``; the next ``val_size`` examples are held out for
    validation. The test subset (``test_size``, None = all) is drawn with ``test_seed``.
    ``omit_classes`` are removed from the training subset (Hinton's omitted-class transfer set).
    The data come from ``source`` (any :data:`~distillery.data.sources.DataSource`: idx files,
    arrays, an image folder, a user's Dataset), or when it is None from the idx files of
    ``dataset`` in ``root``.

    ``validation_fraction`` > 0 holds that fraction of the training subset out, class by class
    (:func:`distillery.data.stratified_split` seeded with ``split_seed``): the run trains on the
    rest and is evaluated on the held-out examples, never on the test split (``distillery tune``'s
    trials), so the ``test_*`` entries of its history are validation figures.
    """

    dataset: str = "fashion_mnist"
    root: str | None = None
    train_size: int | None = None
    val_size: int = 0
    test_size: int | None = None
    split_seed: int = 0
    test_seed: int = 0
    omit_classes: tuple[int, ...] = ()
    source: DataSource | None = None
    validation_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie in [0, 1), got {self.validation_fraction}")

    @property
    def data_source(self) -> DataSource:
        return self.source if self.source is not None else IdxSource(dataset=self.dataset, root=self.root)

    @property
    def name(self) -> str:
        """The dataset for people: ``fashion_mnist``, or the source and its training files."""
        source = self.data_source
        return source.dataset if isinstance(source, IdxSource) else f"{source.source}: {source.train}"

    def as_dict(self) -> dict[str, Any]:
        picked = {"train_size": self.train_size, "val_size": self.val_size, "test_size": self.test_size,
                  "split_seed": self.split_seed, "test_seed": self.test_seed,
                  "omit_classes": list(self.omit_classes)}
        if self.validation_fraction:  # left out while off, so other runs' keys do not change
            picked["validation_fraction"] = self.validation_fraction
        if self.source is None:
            return {"dataset": self.dataset, "root": self.root, **picked}
        return {"source": self.source.model_dump(mode="json"), "files": file_stamps(self.source), **picked}


def file_stamps(source: DataSource) -> list[list[Any]]:
    """(path, size, mtime) of the files and folders a source reads, so a changed file is a new run."""
    paths: list[str] = []
    for part in (getattr(source, "train", None), getattr(source, "test", None)):
        if isinstance(part, str) and ":" not in part:
            paths.append(part)
        elif part is not None and hasattr(part, "inputs"):
            paths += [part.inputs, part.labels]
    stamps = []
    for path in paths:
        stat = Path(path).stat() if Path(path).exists() else None
        stamps.append([str(Path(path).resolve()), stat.st_size if stat else None, stat.st_mtime if stat else None])
    return stamps


@dataclass(frozen=True)
class StageSpec:
    """One stage: a method's parameters and the training settings it runs with."""

    method: MethodParams
    train: TrainConfig

    def build(self) -> Stage:
        """The trainer's stage: a fresh method object for these parameters."""
        return Stage(create_method(self.method), self.train)

    def describe(self) -> str:
        return f"{self.method.name}×{self.train.epochs}ep"


@dataclass(frozen=True)
class TeacherRef:
    """A teaching network: the finished ``run`` (or its weights after ``snapshot`` epochs), or a
    trained network in a ``checkpoint`` file (a distillery checkpoint, or a plain state_dict of
    ``model``)."""

    run: RunSpec | None = None
    snapshot: float | None = None
    checkpoint: str | None = None
    model: ModelConfig | None = None

    def __post_init__(self) -> None:
        if (self.run is None) == (self.checkpoint is None):
            raise ValueError("a teacher is either a run or a checkpoint file, not both or neither")

    @property
    def key(self) -> str:
        if self.run is not None:
            return self.run.key if self.snapshot is None else f"{self.run.key}@{self.snapshot:g}"
        path = Path(self.checkpoint)
        mtime = path.stat().st_mtime if path.exists() else None
        return fingerprint({"checkpoint": str(path.resolve()), "mtime": mtime})


@dataclass(frozen=True)
class CacheSpec:
    """The teacher-output cache: its folder (None: off), the budget of stored feature targets, MB, and
    the teacher store's settings (``teacher.store_*``; see :mod:`distillery.teacher_store`)."""

    folder: str | None = None
    max_mb: float = DEFAULT_MAX_MB
    store_epochs: int = 0
    store_top_k: int | None = None
    store_dtype: str = "float32"
    store_seed: int = 0

    @property
    def store(self) -> StoreSettings:
        """The settings the :class:`~distillery.train.Trainer` takes as ``teacher_store``."""
        return StoreSettings(self.store_epochs, self.store_top_k, self.store_dtype, self.store_seed)

    def key_fields(self, spec: RunSpec) -> dict[str, Any]:
        """The store settings that change what ``spec`` trains (empty when none do): the views of its
        augmented stages with a teacher (``store_epochs``, ``store_seed``) and the stored representation
        its teacher's outputs are served in (``store_top_k``, ``store_dtype``)."""
        fields: dict[str, Any] = {}
        if not spec.teachers:
            return fields
        augmented = any(s.train.augment.crop_padding or s.train.augment.hflip for s in spec.stages)
        if augmented and self.store_epochs:
            fields.update(store_epochs=self.store_epochs, store_seed=self.store_seed)
        if self.folder is not None and self.store.compact:
            fields.update(store_top_k=self.store_top_k, store_dtype=self.store_dtype)
        return fields


@dataclass(frozen=True)
class RunSpec:
    """One network to train. ``label`` names it for people; everything but the fields marked
    "where and how" goes into :attr:`key`."""

    label: str
    model: ModelConfig
    stages: tuple[StageSpec, ...]
    data: DataSpec
    seed: int = 0
    teachers: tuple[TeacherRef, ...] = ()
    snapshots: tuple[float, ...] = ()
    # where and how (not part of the key)
    folder: str | None = field(default=None, compare=False)
    device: str = field(default="cpu", compare=False)
    amp: bool = field(default=False, compare=False)
    deterministic: bool = field(default=False, compare=False)
    sync_batchnorm: bool = field(default=False, compare=False)
    eval_batch_size: int = field(default=1000, compare=False)
    tensorboard: bool = field(default=False, compare=False)
    cache: CacheSpec = field(default_factory=CacheSpec, compare=False)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"run {self.label!r}: a run needs at least one stage")

    @property
    def key(self) -> str:
        return fingerprint({
            "format": SPEC_FORMAT,
            "model": self.model.model_dump(mode="json"),
            "stages": [[s.method.model_dump(mode="json"), s.train.key_fields()] for s in self.stages],
            "data": self.data.as_dict(), "seed": self.seed, "teachers": [t.key for t in self.teachers],
            "snapshots": list(self.snapshots),
            **({"store": store} if (store := self.cache.key_fields(self)) else {}),  # absent while off: old keys hold
        })

    def describe_stages(self) -> str:
        return " → ".join(s.describe() for s in self.stages)
