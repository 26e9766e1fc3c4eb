"""The teacher store: the teacher's outputs on E epochs of augmented views, written once, replayed by every run.

A frozen teacher's output on an augmented example depends only on the view, and the loader's view
of example ``i`` in epoch ``e`` is a pure function of ``(view seed, i, e)``
(:func:`distillery.data.sample_augment`). So with a view seed fixed by the store (not the run's
seed) and the views repeating every E epochs (``BatchLoader(augment_epochs=E)``: epoch e shows the
views of epoch ``e mod E``), the teacher's outputs of E epochs can be computed once and read back
by ``(epoch mod E, dataset index)``. Every run that reads the store sees exactly those views; its own
seed still sets the student's initial weights and the batch order. A run longer than E epochs
cycles through the stored epochs (the echo line and :class:`StoreReport` say so).

The store lives in the teacher-output cache folder, one :class:`~distillery.cache.TeacherCache` key
per (teacher weights, data, preprocessing, device, augmentation settings, view seed)::

    key = H("store v1", cache_key(teacher, dataset, device), crop_padding, hflip, view seed)

with one entry per stored epoch and representation (checksummed headers, rebuilt when damaged,
never used), so runs of any seed, trial, method or student share it, and a run asking for more
epochs than stored adds the missing ones. Un-augmented stages have one view per example: their
store has one epoch, whatever E.

Representations (:class:`StoreFormat`): the full logits in float32 or float16, or for many classes
the ``k`` largest probabilities at the method's temperature T in float16 with their class indices.
The rest of the mass, ``r = 1 − Σ_top p_i``, is spread evenly over the other ``K − k`` classes;
the method is served the logits ``T · log p̃`` of that distribution, whose softmax at T is p̃. Its
price is measured on every check sample: ``KL(p ‖ p̃) = Σ_tail p_i log(p_i (K − k) / r)``, which
is at most ``r · log(K − k)`` (the tail's entropy deficit against the uniform), plus float16 rounding.

Each epoch the store checks itself (:meth:`StoredTeacher.set_epoch`): :data:`CHECK_EXAMPLES` randomly
chosen entries of the stored epoch (at most one batch) are recomputed by the live teacher on the
same views, and a difference beyond :data:`CHECK_TOLERANCE` stops the run with
:class:`StoreMismatchError` naming the entry and example (another teacher, another augmentation,
or corrupt values under a valid checksum).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from distillery.cache import NonFiniteTeacherError, TeacherCache, cache_key, compute_per_example
from distillery.data import Augment, BatchLoader
from distillery.teacher import ModelOutputs, Teacher

if TYPE_CHECKING:
    from distillery.methods.base import Method

STORE_VERSION = 1
CHECK_TOLERANCE = 1e-2
"""Largest difference allowed between a stored and a recomputed output, relative to the live row's
largest magnitude (at least 1): float16 rounds at 5·10⁻⁴ and other batch compositions or kernels
(TF32 convolutions on CUDA) differ by about 10⁻³, while another teacher or view differs by far more."""
CHECK_EXAMPLES = 32
"""Entries each epoch's check recomputes: a store from another teacher or augmentation differs on
nearly every entry, so a few dozen find it, while the live passes stay a small share of a short
epoch (a whole batch each epoch was a visible share of a tune trial's time: see distillery bench)."""
TAIL_FLOOR = 1e-12
"""Smallest probability given to a class outside the top k (keeps ``T · log p̃`` finite)."""
STORE_DTYPES = ("float32", "float16")


class StoreMismatchError(ValueError):
    """A stored teacher output differs from the live teacher's on the same view: the store is not used."""


# ---------------------------------------------------------------- settings and representation


@dataclass(frozen=True)
class StoreSettings:
    """What the teacher store keeps (``teacher.store_*`` in the recipe).

    ``epochs``: E, the epochs of augmented views stored (0: off; stages then draw fresh views every
    epoch). ``top_k``: store the k largest probabilities at the method's temperature instead of the
    full logits, for teachers of more than k classes (None: full logits). ``dtype``: of the full
    logits, ``float32`` or ``float16``. ``seed``: the view seed, fixed so that runs of any seed share
    the views (part of the key).
    """

    epochs: int = 0
    top_k: int | None = None
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"teacher.store_epochs must be an integer >= 0 (0: off), got {self.epochs!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"teacher.store_top_k must be an integer >= 1 or null (full logits), got {self.top_k!r}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"teacher.store_dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")

    @property
    def compact(self) -> bool:
        """Whether something other than float32 logits is asked for (then un-augmented stages use the store too)."""
        return self.top_k is not None or self.dtype != "float32"


@dataclass(frozen=True)
class StoreFormat:
    """How one stored epoch holds the teacher's outputs: full logits (``top_k`` None) in ``dtype``, or
    the ``top_k`` largest probabilities at ``temperature`` (float16) and their classes, of ``classes`` K."""

    classes: int
    dtype: str = "float32"
    top_k: int | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and (self.temperature is None or not 0 < self.temperature < math.inf):
            raise ValueError(f"a top-{self.top_k} store needs the method's temperature, got {self.temperature!r}")
        if self.top_k is not None and self.top_k >= self.classes:
            raise ValueError(f"top_k {self.top_k} must be below the {self.classes} classes (else store full logits)")

    @classmethod
    def choose(cls, settings: StoreSettings, classes: int, temperature: float | None) -> StoreFormat:
        """The format ``settings`` ask for a teacher of ``classes`` classes: top-k only when k < K."""
        if settings.top_k is not None and settings.top_k < classes:
            return cls(classes, "float16", settings.top_k, temperature)
        return cls(classes, settings.dtype)

    def entry(self, epoch: int) -> str:
        """The cache entry name of stored epoch ``epoch`` (``logits-float16_e2``, ``top5-T4_e0``)."""
        stem = f"logits-{self.dtype}" if self.top_k is None else f"top{self.top_k}-T{self.temperature:g}"
        return f"{stem}_e{epoch}"

    def describe(self) -> str:
        if self.top_k is None:
            return f"{self.dtype} logits"
        return f"top-{self.top_k} of {self.classes} probabilities at T={self.temperature:g} (float16)"

    @property
    def _pair_dtypes(self) -> tuple[torch.dtype, torch.dtype]:
        """(integer, float) of one stored top-k pair: int16 holding a float16 and a class, or int32 pairs
        of a float32 and a class for more classes than int16 counts."""
        return (torch.int16, torch.float16) if self.classes <= torch.iinfo(torch.int16).max else \
            (torch.int32, torch.float32)

    @property
    def stored_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype) if self.top_k is None else self._pair_dtypes[0]

    def encode(self, logits: Tensor) -> Tensor:
        """One tensor per epoch, examples first: the logits in ``dtype``, or the top-k pairs (…×k×2: the
        probability's bits and its class, in one integer type, so the two can never come from different writes)."""
        if not torch.isfinite(logits).all():
            raise NonFiniteTeacherError("the teacher gives NaN or inf logits on augmented views; nothing was stored "
                                        "(check that its weights are finite, or retrain it)")
        if self.top_k is None:
            if self.dtype == "float16" and logits.abs().max() > torch.finfo(torch.float16).max:
                raise ValueError(f"teacher logits reach {float(logits.abs().max()):.4g}, beyond float16's range; "
                                 "set teacher.store_dtype: float32")
            return logits.to(self.stored_dtype)
        integer, floating = self._pair_dtypes
        probs, classes = torch.softmax(logits.float() / self.temperature, dim=-1).topk(self.top_k, dim=-1)
        return torch.stack([probs.to(floating).view(integer), classes.to(integer)], dim=-1)

    def unpack(self, stored: Tensor) -> tuple[Tensor, Tensor]:
        """(probabilities as float32, classes as int64) of stored top-k pairs."""
        floating = self._pair_dtypes[1]
        return stored[..., 0].contiguous().view(floating).float(), stored[..., 1].long()

    def decode(self, stored: Tensor) -> Tensor:
        """Logits (float32) to serve: the stored logits, or ``T · log p̃`` of the top-k reconstruction."""
        if self.top_k is None:
            return stored.float()
        probs, classes = self.unpack(stored)
        return self.temperature * torch.log(reconstruct_top_k(probs, classes, self.classes))

    def comparable(self, logits: Tensor, stored: Tensor) -> tuple[Tensor, Tensor]:
        """(live, stored) values the check compares, examples first: all logits, or ``T · log p`` at the
        stored classes (both shift-free, so they agree exactly when the store is right)."""
        served = self.decode(stored)
        if self.top_k is None:
            return logits.float(), served
        classes = self.unpack(stored)[1]
        live = torch.log_softmax(logits.float() / self.temperature, dim=-1) * self.temperature
        return live.gather(-1, classes), served.gather(-1, classes)


def reconstruct_top_k(probs: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """The distribution p̃ of a top-k store: the stored ``probs`` at ``classes``, the remaining mass
    ``r = 1 − Σ probs`` spread evenly over the other ``K − k`` classes (at least :data:`TAIL_FLOOR`
    each), renormalised to sum to 1 (float16 rounding may leave r slightly below 0)."""
    k = probs.shape[-1]
    top = probs.float()
    tail = ((1 - top.sum(-1, keepdim=True)) / (num_classes - k)).clamp(min=TAIL_FLOOR)
    full = tail.expand(*top.shape[:-1], num_classes).clone()
    full.scatter_(-1, classes.long(), top)
    return full / full.sum(-1, keepdim=True)


def top_k_kl(logits: Tensor, probs: Tensor, classes: Tensor, temperature: float) -> Tensor:
    """KL(p ‖ p̃) per row, nats: the full softened distribution ``p = softmax(logits / T)`` against its
    top-k reconstruction p̃ (:func:`reconstruct_top_k`). At most ``r · log(K − k)`` plus rounding,
    with r the mass outside the top k (module docstring)."""
    p = torch.softmax(logits.float() / temperature, dim=-1)
    p_tilde = reconstruct_top_k(probs, classes, logits.shape[-1])
    return (torch.xlogy(p, p) - p * torch.log(p_tilde)).sum(-1)


def soft_target_temperature(method: Method) -> float | None:
    """The temperature T at which ``method`` reads the teacher, when its loss depends on the teacher only
    through ``softmax(z_t / T)`` at that fixed T (a ``temperature`` parameter; no ``standardize``, no
    ``learnable_temperature``); else None."""
    params = method.params
    temperature = getattr(params, "temperature", None)
    if temperature is None or getattr(params, "standardize", False) or getattr(params, "learnable_temperature", False):
        return None
    return float(temperature)


def reads_logits_only(method: Method) -> bool:
    """Whether a step of ``method`` needs the teacher's logits and nothing else (what the store holds)."""
    return method.runs_teacher_every_step and not method.teacher_layers


def replays_views(method: Method, augment: Augment, settings: StoreSettings) -> bool:
    """Whether a stage of ``method`` with ``augment`` draws its views from the store's E epochs.

    Only stages the store can serve do (logit methods with augmentation, ``store_epochs`` > 0),
    whether the teacher-output cache is on or not, so a run with the teacher live sees the same views.
    """
    return settings.epochs > 0 and augment.active and reads_logits_only(method)


def store_serves(method: Method, loader: BatchLoader, settings: StoreSettings) -> bool:
    """Whether the store serves this stage's teacher (the teacher-output cache being on): a logit
    method on replayed views, or without augmentation when a compact representation is asked for."""
    if not reads_logits_only(method):
        return False
    if augments(loader):
        return loader.augment_epochs is not None and settings.epochs > 0
    return settings.compact


def augments(loader: BatchLoader) -> bool:
    return loader.shuffle and loader.augment.active


def store_key(teacher: Teacher, loader: BatchLoader) -> str:
    """The cache key of the store of ``teacher``'s outputs on ``loader``'s views (32 hex digits)."""
    augment = loader.augment if augments(loader) else Augment()
    seed = loader.augment_seed if augment.active else 0
    h = hashlib.sha256()
    for part in (f"store v{STORE_VERSION}", cache_key(teacher, loader.dataset, loader.device),
                 str(augment.crop_padding), str(augment.hflip), str(seed)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


# ---------------------------------------------------------------- the stored teacher


@dataclass
class StoreReport:
    """What a store cost and gave in one stage (per process). Seconds are wall-clock."""

    folder: str
    key: str
    format: str
    epochs_stored: int
    epochs_run: list[int] = field(default_factory=list)  # the stage's epochs served (0-based), in order
    size_mb: float = 0.0  # on disk, the stored epochs this stage reads
    built_epochs: int = 0  # stored epochs computed by this process (the rest were read)
    build_s: float = 0.0
    checked_examples: int = 0
    check_s: float = 0.0
    worst_check_error: float = 0.0  # the largest relative difference a check found (tolerance CHECK_TOLERANCE)
    teacher_forward_s: float = 0.0  # the checks' live forward passes ...
    teacher_forward_examples: int = 0  # ... and their examples: the live teacher's cost per example
    top_k_kl: list[float] = field(default_factory=list)  # KL(p ‖ p̃) of every checked example (top-k only)

    @property
    def cycles(self) -> int:
        """How many times the most replayed stored epoch was served (1: no epoch replayed)."""
        counts: dict[int, int] = {}
        for epoch in self.epochs_run:
            counts[epoch % self.epochs_stored] = counts.get(epoch % self.epochs_stored, 0) + 1
        return max(counts.values(), default=0)

    def as_dict(self) -> dict[str, Any]:
        kl = self.top_k_kl
        per_example = self.teacher_forward_s / self.teacher_forward_examples if self.teacher_forward_examples else None
        return {
            "folder": self.folder, "key": self.key, "format": self.format, "epochs_stored": self.epochs_stored,
            "epochs_run": len(self.epochs_run), "cycles": self.cycles, "size_mb": self.size_mb,
            "built_epochs": self.built_epochs, "build_s": self.build_s, "checked_examples": self.checked_examples,
            "check_s": self.check_s, "worst_check_error": self.worst_check_error,
            "teacher_s_per_example": per_example,
            "top_k_kl_mean": sum(kl) / len(kl) if kl else None, "top_k_kl_max": max(kl) if kl else None,
        }


class StoredTeacher:
    """A :class:`Teacher` whose logits on one stage's views come from the teacher store.

    Called like the teacher plus ``index`` (the batch's dataset indices): with an index and no
    feature layers it serves the stored outputs of those examples in the current stored epoch;
    otherwise it runs the teacher. :meth:`set_epoch` (the trainer calls it before every epoch)
    selects stored epoch ``epoch mod E`` and checks a sample of it against the live teacher.
    ``views`` is the stage's loader (``augment_epochs = E`` when it augments).
    """

    def __init__(self, teacher: Teacher, views: BatchLoader, fmt: StoreFormat, epochs: Sequence[Tensor],
                 report: StoreReport, *, check_examples: int | None = None, check_seed: int = 0) -> None:
        self.teacher = teacher
        self.members = teacher.members
        self.views = views
        self.format = fmt
        self.epochs = list(epochs)
        self.report = report
        self.check_examples = min(CHECK_EXAMPLES, views.batch_size) if check_examples is None else check_examples
        self.check_seed = check_seed
        self._current: Tensor | None = None

    @classmethod
    def build(cls, teacher: Teacher, views: BatchLoader, folder: str | Path, settings: StoreSettings, *,
              temperature: float | None = None, check_seed: int = 0) -> StoredTeacher:
        """Read the store of ``teacher`` on ``views`` from ``folder``, computing and storing the
        missing epochs (one at a time, so the peak is one epoch of float32 outputs)."""
        if augments(views) and views.augment_epochs is None:
            raise ValueError("a teacher store of augmented views needs views that repeat (BatchLoader augment_epochs)")
        example = views.batch_of(torch.zeros(1, dtype=torch.int64), 0).inputs
        fmt = StoreFormat.choose(settings, teacher(example).logits.shape[-1], temperature)
        stored = views.augment_epochs if augments(views) else 1
        key = store_key(teacher, views)
        cache = TeacherCache(folder, key)
        report = StoreReport(str(Path(folder) / key), key, fmt.describe(), stored)
        epochs = []
        for epoch in range(stored):
            start = time.perf_counter()
            tensor, built = _read_or_build(cache, teacher, views, fmt, epoch)
            epochs.append(tensor)
            report.size_mb += tensor.numel() * tensor.element_size() / 2**20
            if built:
                report.built_epochs += 1
                report.build_s += time.perf_counter() - start
        return cls(teacher, views, fmt, epochs, report, check_seed=check_seed)

    @property
    def is_ensemble(self) -> bool:
        return self.teacher.is_ensemble

    @property
    def epochs_stored(self) -> int:
        return len(self.epochs)

    def to(self, device: torch.device | str) -> StoredTeacher:
        self.teacher.to(device)
        self._current = self._current.to(device) if self._current is not None else None
        return self

    def set_epoch(self, epoch: int) -> None:
        """Serve stored epoch ``epoch mod E`` from now on, after checking a sample of it."""
        self._current = self.epochs[epoch % self.epochs_stored].to(self.views.device)
        self.report.epochs_run.append(epoch)
        self.check(epoch)

    def __call__(self, inputs: Tensor, layers: Sequence[str] = (), index: Tensor | None = None) -> ModelOutputs:
        if index is None or layers:
            return self.teacher(inputs, layers)
        if self._current is None:
            raise RuntimeError("StoredTeacher: call set_epoch(epoch) before serving outputs")
        logits = self.format.decode(self._current[index.to(self._current.device)]).to(inputs.device)
        return ModelOutputs(logits.transpose(0, 1) if self.is_ensemble else logits)

    @torch.no_grad()
    def check(self, epoch: int) -> None:
        """Recompute ``check_examples`` randomly chosen entries of stored epoch ``epoch mod E`` with the live
        teacher on the same views; raise :class:`StoreMismatchError` naming the first entry beyond tolerance."""
        start = time.perf_counter()
        count = len(self.views.dataset)
        generator = torch.Generator().manual_seed((self.check_seed * 1_000_003 + epoch) % 2**63)
        index = torch.randperm(count, generator=generator)[:min(self.check_examples, count)]
        inputs = self.views.batch_of(index, epoch).inputs
        forward = time.perf_counter()
        live = self.teacher(inputs).logits.float().cpu()  # the copy waits for the device
        self.report.teacher_forward_s += time.perf_counter() - forward
        self.report.teacher_forward_examples += len(index)
        live = live.transpose(0, 1) if self.is_ensemble else live  # examples first, as stored
        stored = self._current[index.to(self._current.device)].cpu()
        live_values, stored_values = self.format.comparable(live, stored)
        rows = len(index)
        error = ((live_values - stored_values).abs().reshape(rows, -1).amax(1)
                 / live_values.abs().reshape(rows, -1).amax(1).clamp(min=1.0))
        worst = int(error.argmax())
        self.report.worst_check_error = max(self.report.worst_check_error, float(error[worst]))
        self.report.checked_examples += rows
        if self.format.top_k is not None:
            kl = top_k_kl(live, *self.format.unpack(stored), self.format.temperature)
            self.report.top_k_kl.extend(kl.reshape(rows, -1).amax(1).tolist())
        self.report.check_s += time.perf_counter() - start
        if error[worst] > CHECK_TOLERANCE:
            self._refuse(epoch, int(index[worst]), float(error[worst]))

    def _refuse(self, epoch: int, example: int, error: float) -> None:
        stored = epoch % self.epochs_stored
        raise StoreMismatchError(
            f"teacher store {self.report.folder}: entry {self.format.entry(stored)} (stored epoch {stored + 1} of "
            f"{self.epochs_stored}), dataset example {example}: the stored teacher output differs from the live "
            f"teacher's on the same view by {error:.3g} (relative; tolerance {CHECK_TOLERANCE:g}). It was written "
            f"by another teacher or for another augmentation, or its values are corrupt; the store was not used. "
            f"Delete {self.report.folder} to rebuild it.")

    def describe(self, stage_epochs: int) -> str:
        """One line for the run's echo: what is stored, what was built or read, and whether the stage cycles."""
        r = self.report
        built = (f"{r.built_epochs} built now in {r.build_s:.1f} s, {r.epochs_stored - r.built_epochs} read"
                 if r.built_epochs else "all read")
        views = (f"{r.epochs_stored} stored epoch(s) of augmented views" if augments(self.views)
                 else "the un-augmented examples")
        line = f"teacher store {r.folder}: {r.format} on {views} ({built}), {r.size_mb:.1f} MB"
        if augments(self.views) and stage_epochs > r.epochs_stored:
            line += (f"; the stage's {stage_epochs} epochs cycle through them (epoch e replays stored epoch "
                     f"e mod {r.epochs_stored})")
        return line


def _read_or_build(cache: TeacherCache, teacher: Teacher, views: BatchLoader, fmt: StoreFormat,
                   epoch: int) -> tuple[Tensor, bool]:
    """Stored epoch ``epoch`` from ``cache`` (computed and stored first if missing or damaged), and
    whether this call computed it."""
    name, built = fmt.entry(epoch), []

    def compute(missing: list[str]) -> dict[str, Tensor]:
        built.append(name)
        return {name: _compute_epoch(teacher, views, fmt, epoch)}

    return cache.get_or_compute_many([name], compute, count=len(views.dataset))[name], bool(built)


def _compute_epoch(teacher: Teacher, views: BatchLoader, fmt: StoreFormat, epoch: int) -> Tensor:
    """The stored form of ``teacher``'s outputs on every example as ``views`` shows it in ``epoch``."""
    def encoded(out: ModelOutputs) -> dict[str, Tensor]:
        return {"stored": fmt.encode(out.logits.transpose(0, 1) if teacher.is_ensemble else out.logits)}

    gathered = compute_per_example(teacher, views.dataset, encoded, device=views.device, views=views, epoch=epoch)
    return gathered["stored"].to(fmt.stored_dtype)  # gathered as float32, which holds these values exactly
