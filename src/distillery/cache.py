"""Teacher-output cache: compute the frozen teacher's outputs once, reuse them across runs.

A frozen teacher on un-augmented data always gives the same output for the same example, so
distilling from it need not run it every step of every epoch of every run. The outputs are
computed once per *key* and stored on disk; the key hashes everything that determines them:

    key = H(teacher architecture names + state_dict tensors, dataset images + labels,
            normalisation mean/std, the loader's preprocessing, the device type)

Any change to the teacher's weights or the data gives a new key, hence a fresh computation.

Layout: ``<root>/<key>/<name>.bin`` holds the raw tensor bytes (row-major, one row per example)
and ``<root>/<key>/<name>.json`` its header (key, name, shape, dtype, count, byte size, SHA-256 of
the bytes). Both are written with :func:`distillery.fsio.atomic_write` (a temporary file with an
unpredictable name, never through a symlink, renamed into place), the data first and the header
last, so the header is the completion marker: a run killed mid-write leaves no header, or a header
whose checksum does not match, and the entry is rebuilt. Every check (header, size, checksum) is
made on the bytes that are then served.

Several processes may share a cache folder. Writers of one key take turns through a lock file
(``<root>/<key>/.lock``, :class:`distillery.fsio.FolderLock`); only a lock holder deletes or
rewrites an entry. A reader never deletes anything: an entry it finds incomplete may be in the
middle of a rewrite, so it waits for the writer (bounded by ``lock_wait_s``) and looks again, and a
process that cannot get the lock in time computes what it needs in memory without storing it
(:class:`CacheBusyWarning`). An entry found unusable under the lock is reported with
:class:`CacheRebuiltWarning`, deleted and rebuilt — never used. Outputs holding NaN or inf are
never stored (:class:`NonFiniteTeacherError`).

:class:`TeacherCache` stores any per-example tensors by name: the logits, which
:class:`CachedTeacher` serves with the teacher's call interface plus the batch's dataset indices,
the feature methods' targets (``fsp_<a>__<b>``: FSP matrices of a teacher layer pair;
``hint_<layer>``: FitNets hints), which :mod:`distillery.stored_targets` serves, and the
teacher store's outputs on stored epochs of augmented views (:mod:`distillery.teacher_store`,
under keys of its own).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import distillery.fsio as fsio
from distillery.data import BatchLoader, ImageDataset
from distillery.teacher import ModelOutputs, Teacher, entry_name  # noqa: F401 (entry_name: part of this module's API)

FORMAT_VERSION = 1
# What BatchLoader does to a stored input before the network sees it (augmentation aside).
# Part of the key: change the loader's preprocessing and bump this, and old entries are not reused.
PREPROCESSING = "v2: float32(x), / 255 if uint8, then (x - mean_c) / std_c per channel (dim 1)"
LOCK_WAIT_S = 60.0
"""How long a process waits for another one writing the same key before computing in memory."""


class CacheRebuiltWarning(UserWarning):
    """A cache entry was incomplete or corrupt; it was discarded and is being recomputed."""


class CacheBusyWarning(UserWarning):
    """Another process kept the key's lock too long; the entries were computed in memory, not stored."""


class NonFiniteTeacherError(ValueError):
    """The teacher's outputs hold NaN or inf; they are not cached (distilling from them can only diverge)."""


def _update_with_tensor(h: hashlib._Hash, t: Tensor) -> None:
    # The strides tell memory formats apart (channels-last weights give slightly different outputs).
    h.update(f"{t.dtype}{tuple(t.shape)}{t.stride()}".encode())
    t = t.detach().cpu().contiguous()
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def teacher_fingerprint(teacher: Teacher) -> str:
    """SHA-256 of every member's class name and ``state_dict`` (names, dtypes, shapes, strides, values)."""
    h = hashlib.sha256()
    for member in teacher.members:
        h.update(f"{type(member).__module__}.{type(member).__qualname__}".encode())
        for name, value in member.state_dict().items():
            h.update(name.encode())
            _update_with_tensor(h, value)
    return h.hexdigest()


def dataset_fingerprint(dataset: ImageDataset) -> str:
    """SHA-256 of the inputs (dtype, shape and values), labels and normalisation of ``dataset``."""
    h = hashlib.sha256()
    _update_with_tensor(h, dataset.inputs)
    _update_with_tensor(h, dataset.labels)
    h.update(repr((dataset.normalisation.mean, dataset.normalisation.std)).encode())
    return h.hexdigest()


def cache_key(teacher: Teacher, dataset: ImageDataset, device: torch.device | str = "cpu") -> str:
    """The key under which ``teacher``'s outputs on ``dataset`` are stored (32 hex digits)."""
    h = hashlib.sha256()
    for part in (f"v{FORMAT_VERSION}", teacher_fingerprint(teacher), dataset_fingerprint(dataset), PREPROCESSING,
                 torch.device(device).type):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class _Lookup:
    """What reading an entry found: its tensor, or why a present entry is unusable (neither: absent)."""

    tensor: Tensor | None = None
    problem: str | None = None


class TeacherCache:
    """Per-example tensors stored by name under ``<root>/<key>/`` (see the module docstring).

    Every stored tensor has one row per dataset example (dimension 0 = ``count``); rows are read
    with ``cache.load(name)[index]``. Loaded tensors are memory-mapped from the file (copy-on-write,
    never written back), so large entries such as FSP matrices cost no extra RAM until touched.
    """

    def __init__(self, root: str | Path, key: str) -> None:
        self.root = Path(root)
        self.key = key
        self.dir = self.root / key
        self.lock_wait_s = LOCK_WAIT_S

    def _paths(self, name: str) -> tuple[Path, Path]:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"cache entry name must be a plain file name, got {name!r}")
        return self.dir / f"{name}.bin", self.dir / f"{name}.json"

    def _lock(self) -> fsio.FolderLock:
        return fsio.FolderLock(self.dir, f"writing teacher cache key {self.key}", wait_s=self.lock_wait_s)

    def save(self, name: str, tensor: Tensor) -> None:
        """Write ``tensor`` (rows = examples) as entry ``name``, holding the key's lock: data first, header last."""
        self._paths(name)
        with self._lock():
            self._write(name, tensor)

    def load(self, name: str, count: int | None = None) -> Tensor | None:
        """Entry ``name`` if it is complete and intact (and has ``count`` rows, if given), else None.

        Deletes nothing. An entry present but unusable may be halfway through a rewrite by another
        process: load then waits for the key's lock (up to ``lock_wait_s``) and reads it again.
        """
        found = self._read(name, count)
        if found.problem is None:
            return found.tensor
        try:
            with self._lock():
                return self._read(name, count).tensor
        except (fsio.FolderBusyError, fsio.WriteError):  # still being written, or a cache we may only read
            return None

    def remove(self, name: str) -> None:
        """Delete entry ``name`` (holding the key's lock)."""
        self._paths(name)
        with self._lock():
            self._remove(name)

    def get_or_compute(self, name: str, compute: Callable[[], Tensor], count: int | None = None) -> Tensor:
        """The stored entry ``name``, or ``compute()`` stored and then returned (as loaded back)."""
        return self.get_or_compute_many([name], lambda missing: {name: compute()}, count)[name]

    def get_or_compute_many(self, names: Sequence[str], compute: Callable[[list[str]], dict[str, Tensor]],
                            count: int | None = None) -> dict[str, Tensor]:
        """The stored entries ``names``; the missing (or unusable) ones come from one call of
        ``compute(missing_names)``, are stored, and are returned as loaded back.

        Storing happens under the key's lock. If another process holds it longer than
        ``lock_wait_s``, the missing entries are computed and returned without being stored
        (:class:`CacheBusyWarning`).
        """
        names = list(dict.fromkeys(names))
        found = {name: self._read(name, count).tensor for name in names}
        missing = [name for name in names if found[name] is None]
        if not missing:
            return found
        lock = self._lock()
        try:
            lock.acquire()
        except fsio.FolderBusyError as busy:
            warnings.warn(CacheBusyWarning(f"teacher cache {self.dir}: {busy} Computing {', '.join(missing)} in "
                                           "memory, without storing them."), stacklevel=2)
            return {**found, **self._compute_checked(missing, compute, count)}
        try:
            found.update(self._fill(missing, compute, count))
        finally:
            lock.release()
        return found

    def _fill(self, names: list[str], compute: Callable[[list[str]], dict[str, Tensor]],
              count: int | None) -> dict[str, Tensor]:
        """Under the lock: entries another process stored meanwhile, the rest computed, stored, read back."""
        done: dict[str, Tensor] = {}
        todo = []
        for name in names:
            found = self._read(name, count)
            if found.tensor is not None:
                done[name] = found.tensor
                continue
            if found.problem is not None:
                warnings.warn(CacheRebuiltWarning(
                    f"teacher cache {self._paths(name)[0]}: {found.problem}; discarding it and recomputing"),
                    stacklevel=3)
            self._remove(name)
            todo.append(name)
        if todo:
            computed = self._compute_checked(todo, compute, count)
            for name in todo:
                self._write(name, computed[name])
                stored = self._read(name, count)
                if stored.tensor is None:
                    raise RuntimeError(f"teacher cache {self._paths(name)[0]}: unreadable right after writing it "
                                       f"({stored.problem})")
                done[name] = stored.tensor
        return done

    def _compute_checked(self, names: list[str], compute: Callable[[list[str]], dict[str, Tensor]],
                         count: int | None) -> dict[str, Tensor]:
        """``compute(names)`` on the CPU, refused unless every entry is there, has ``count`` rows and is finite."""
        computed = compute(names)
        checked = {}
        for name in names:
            if name not in computed:
                raise ValueError(f"cache entry {name!r}: the computation returned only {sorted(computed)}")
            fresh = computed[name].detach().cpu().contiguous()
            rows = fresh.shape[0] if fresh.dim() else 0
            if count is not None and rows != count:
                raise ValueError(f"cache entry {name!r}: computed {rows} rows, expected {count}")
            if fresh.is_floating_point() and not torch.isfinite(fresh).all():
                raise NonFiniteTeacherError(f"teacher cache {self.dir}: the computed entry {name!r} holds NaN or "
                                            "inf; it is not stored")
            checked[name] = fresh
        return checked

    def _write(self, name: str, tensor: Tensor) -> None:
        data_path, header_path = self._paths(name)
        t = tensor.detach().cpu().contiguous()
        raw = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        header = {
            "format": FORMAT_VERSION, "key": self.key, "name": name, "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."), "count": t.shape[0] if t.dim() else 0,
            "bytes": t.numel() * t.element_size(), "sha256": hashlib.sha256(raw).hexdigest(),
        }
        fsio.atomic_write(data_path, raw, make_parents=True, what="teacher cache entry")
        fsio.atomic_write(header_path, json.dumps(header, indent=1), what="teacher cache header")

    def _remove(self, name: str) -> None:
        for path in self._paths(name)[::-1]:  # header first: the entry is invalid from the first unlink
            path.unlink(missing_ok=True)
            fsio.remove_stale_temps(path)

    def _read(self, name: str, count: int | None) -> _Lookup:
        """Entry ``name`` as it is on disk now, checked; never changes anything."""
        data_path, header_path = self._paths(name)
        try:
            header = json.loads(header_path.read_text())
            problem = self._header_problem(header, name, count)
        except FileNotFoundError:
            return _Lookup(problem="no header (an interrupted write)") if data_path.exists() else _Lookup()
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = f"unreadable header ({err})"
        if problem is not None:
            return _Lookup(problem=problem)
        try:
            size = data_path.stat().st_size
        except FileNotFoundError:
            return _Lookup(problem="header without data")
        if size != header["bytes"]:
            return _Lookup(problem=f"data file has {size} bytes, header says {header['bytes']} (truncated?)")
        dtype, numel = getattr(torch, header["dtype"]), math.prod(header["shape"])
        try:  # map the file once and check the very bytes we serve (it may be replaced at any moment)
            flat = torch.from_file(str(data_path), shared=False, size=numel, dtype=dtype) if numel else \
                torch.empty(0, dtype=dtype)
        except RuntimeError as err:
            return _Lookup(problem=f"unreadable data ({str(err).splitlines()[0]})")
        raw = flat.view(torch.uint8).numpy() if numel else b""
        if hashlib.sha256(raw).hexdigest() != header["sha256"]:
            return _Lookup(problem="checksum mismatch (corrupt data)")
        return _Lookup(tensor=flat.view(header["shape"]))

    def _header_problem(self, header: dict, name: str, count: int | None) -> str | None:
        expected = {"format": FORMAT_VERSION, "key": self.key, "name": name}
        for field, value in expected.items():
            if header[field] != value:
                return f"header {field} is {header[field]!r}, expected {value!r}"
        dtype = getattr(torch, header["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            return f"unknown dtype {header['dtype']!r}"
        shape = header["shape"]
        if not all(isinstance(size, int) and size >= 0 for size in shape):
            return f"bad shape {shape!r}"
        if header["bytes"] != math.prod(shape) * dtype.itemsize:
            return "header size does not match its shape"
        if count is not None and header["count"] != count:
            return f"{header['count']} rows, expected {count}"
        if not isinstance(header["sha256"], str):
            return "no checksum"
        return None


@torch.no_grad()
def compute_per_example(teacher: Teacher, dataset: ImageDataset, targets: Callable[[ModelOutputs], dict[str, Tensor]],
                        layers: Sequence[str] = (), device: torch.device | str = "cpu",
                        batch_size: int = 512, *, views: BatchLoader | None = None,
                        epoch: int = 0) -> dict[str, Tensor]:
    """``targets(teacher outputs)`` for every example of ``dataset`` in order, as the training loader feeds it.

    ``targets`` maps one batch's outputs (logits and the ``layers``' features) to named tensors with
    one row per example; the rows of all batches are gathered on the CPU as float32 (preallocated,
    so the peak is one copy of the result plus one batch). The inputs are the un-augmented examples,
    or with ``views`` (a loader of ``dataset``) each example as that loader shows it in ``epoch``
    (:meth:`~distillery.data.BatchLoader.batch_of`: augmented as in that epoch), on its device.
    """
    if views is None:
        batches = BatchLoader(dataset, batch_size, device=device).epoch(0)
    elif views.dataset is not dataset:
        raise ValueError("compute_per_example: views must be a loader of the same dataset")
    else:
        batches = (views.batch_of(chunk, epoch) for chunk in torch.arange(len(dataset)).split(batch_size))
    out: dict[str, Tensor] = {}
    for batch in batches:
        for name, value in targets(teacher(batch.inputs, layers)).items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise NonFiniteTeacherError(_non_finite_message(teacher, name, value, batch.index))
            if name not in out:
                out[name] = torch.empty((len(dataset), *value.shape[1:]), dtype=torch.float32)
            out[name][batch.index.cpu()] = value.float().cpu()
    return out


def _non_finite_message(teacher: Teacher, name: str, value: Tensor, index: Tensor) -> str:
    bad = ~torch.isfinite(value).reshape(len(value), -1).all(dim=1)
    first = int(index[bad.to(index.device)][0])
    weights_finite = all(torch.isfinite(p).all() for member in teacher.members for p in member.parameters())
    cause = ("its weights are finite, so these inputs drive it out of range" if weights_finite else
             "its weights hold NaN or inf (was it trained until it diverged?); check or retrain it")
    kinds = ", ".join(type(member).__name__ for member in teacher.members)
    return (f"the teacher ({kinds}) gives NaN or inf for {name!r} on {int(bad.sum())} example(s) of a batch (the "
            f"first: dataset index {first}): {cause}. Nothing was cached.")


def compute_teacher_logits(teacher: Teacher, dataset: ImageDataset, device: torch.device | str = "cpu",
                           batch_size: int = 512) -> Tensor:
    """Teacher logits for every example of ``dataset`` in order, as the training loader feeds it.

    N×K for one teacher, N×M×K for an ensemble of M (examples first, so rows index examples).
    """
    def logits(out: ModelOutputs) -> dict[str, Tensor]:
        return {"logits": out.logits.transpose(0, 1) if teacher.is_ensemble else out.logits}

    return compute_per_example(teacher, dataset, logits, device=device, batch_size=batch_size)["logits"]


class CachedTeacher:
    """A :class:`Teacher` whose logits on one dataset come from a :class:`TeacherCache`.

    Called like the teacher, plus ``index`` (the batch's dataset indices, ``Batch.index``). With an
    index and no feature layers it returns the stored logits of those examples; otherwise (features
    asked for, or no index, e.g. augmented inputs) it runs the teacher. The stored logits are exact
    only for un-augmented batches of the dataset it was built for: the caller must pass ``index``
    only then (the :class:`~distillery.train.Trainer` does).
    """

    LOGITS = "logits"

    def __init__(self, teacher: Teacher, logits: Tensor) -> None:
        self.teacher = teacher
        self.members = teacher.members
        self.logits = logits

    @classmethod
    def build(cls, teacher: Teacher, dataset: ImageDataset, root: str | Path,
              device: torch.device | str = "cpu") -> CachedTeacher:
        """Load the teacher's logits on ``dataset`` from ``root``, computing and storing them if needed."""
        device = torch.device(device)
        cache = TeacherCache(root, cache_key(teacher, dataset, device))
        logits = cache.get_or_compute(cls.LOGITS, lambda: compute_teacher_logits(teacher, dataset, device),
                                      count=len(dataset))
        return cls(teacher, logits.to(device))

    @property
    def is_ensemble(self) -> bool:
        return self.teacher.is_ensemble

    def to(self, device: torch.device | str) -> CachedTeacher:
        self.teacher.to(device)
        self.logits = self.logits.to(device)
        return self

    def __call__(self, inputs: Tensor, layers: Sequence[str] = (), index: Tensor | None = None) -> ModelOutputs:
        if index is None or layers:
            return self.teacher(inputs, layers)
        logits = self.logits[index.to(self.logits.device)].to(inputs.device)
        return ModelOutputs(logits.transpose(0, 1) if self.is_ensemble else logits)
