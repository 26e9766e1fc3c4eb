"""Teacher-output cache: compute the frozen teacher's outputs once, reuse them across runs.

A frozen teacher on un-augmented data always gives the same output for the same example, so
distilling from it need not run it every step of every epoch of every run. The outputs are
computed once per *key* and stored on disk; the key hashes everything that determines them:

    key = H(teacher architecture names + state_dict tensors, dataset images + labels,
            normalisation mean/std, the loader's preprocessing, the device type)

Any change to the teacher's weights or the data gives a new key, hence a fresh computation.

Layout: ``<root>/<key>/<name>.bin`` holds the raw tensor bytes (row-major, one row per example)
and ``<root>/<key>/<name>.json`` its header (key, name, shape, dtype, count, byte size, SHA-256 of
the bytes). Both are written to temporary files and renamed into place, the header last, so the
header is the completion marker: a run killed mid-write leaves no header and the entry is rebuilt.
On load the header, size and checksum are checked; an entry that fails any check is reported with
:class:`CacheRebuiltWarning`, deleted and rebuilt — never used.

:class:`TeacherCache` stores any per-example tensors by name: the logits, which
:class:`CachedTeacher` serves with the teacher's call interface plus the batch's dataset indices,
and the feature methods' targets (``fsp_<a>__<b>``: FSP matrices of a teacher layer pair;
``hint_<layer>``: FitNets hints), which :mod:`distillery.methods.stored` loads for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from distillery.data import BatchLoader, ImageDataset
from distillery.teacher import ModelOutputs, Teacher, entry_name  # noqa: F401 (entry_name: part of this module's API)

FORMAT_VERSION = 1
# What BatchLoader does to a stored input before the network sees it (augmentation aside).
# Part of the key: change the loader's preprocessing and bump this, and old entries are not reused.
PREPROCESSING = "v2: float32(x), / 255 if uint8, then (x - mean_c) / std_c per channel (dim 1)"
_CHUNK = 1 << 24


class CacheRebuiltWarning(UserWarning):
    """A cache entry was incomplete or corrupt; it was discarded and is being recomputed."""


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_bytes(path: Path, write: Callable[[object], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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

    def _paths(self, name: str) -> tuple[Path, Path]:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"cache entry name must be a plain file name, got {name!r}")
        return self.dir / f"{name}.bin", self.dir / f"{name}.json"

    def save(self, name: str, tensor: Tensor) -> None:
        """Write ``tensor`` (rows = examples) as entry ``name``: data first, header last, both atomic."""
        data_path, header_path = self._paths(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        header_path.unlink(missing_ok=True)  # the entry is incomplete from now until the new header lands
        t = tensor.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        _atomic_write_bytes(data_path, lambda f: f.write(memoryview(raw)))
        header = {
            "format": FORMAT_VERSION, "key": self.key, "name": name, "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."), "count": t.shape[0] if t.dim() else 0,
            "bytes": t.numel() * t.element_size(), "sha256": _file_sha256(data_path),
        }
        _atomic_write_bytes(header_path, lambda f: f.write(json.dumps(header, indent=1).encode()))

    def load(self, name: str, count: int | None = None) -> Tensor | None:
        """Entry ``name`` if it is complete and intact (and has ``count`` rows, if given), else None.

        A missing entry returns None quietly; a present but unusable one (no header, wrong key,
        shape or size, checksum mismatch) also warns :class:`CacheRebuiltWarning` and is deleted.
        """
        data_path, header_path = self._paths(name)
        if not header_path.exists() and not data_path.exists():
            return None
        problem = self._check(name, data_path, header_path, count)
        if problem is not None:
            warnings.warn(CacheRebuiltWarning(f"teacher cache {data_path}: {problem}; discarding it and recomputing"),
                          stacklevel=2)
            self.remove(name)
            return None
        header = json.loads(header_path.read_text())
        dtype = getattr(torch, header["dtype"])
        numel = 1
        for size in header["shape"]:
            numel *= size
        flat = torch.from_file(str(data_path), shared=False, size=numel, dtype=dtype)
        return flat.view(header["shape"])

    def _check(self, name: str, data_path: Path, header_path: Path, count: int | None) -> str | None:
        if not header_path.exists():
            return "no header (an interrupted write)"
        if not data_path.exists():
            return "header without data"
        try:
            header = json.loads(header_path.read_text())
            expected = {"format": FORMAT_VERSION, "key": self.key, "name": name}
            for field, value in expected.items():
                if header[field] != value:
                    return f"header {field} is {header[field]!r}, expected {value!r}"
            dtype = getattr(torch, header["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                return f"unknown dtype {header['dtype']!r}"
            numel = 1
            for size in header["shape"]:
                numel *= int(size)
            if header["bytes"] != numel * dtype.itemsize:
                return "header size does not match its shape"
            if count is not None and header["count"] != count:
                return f"{header['count']} rows, expected {count}"
        except (ValueError, KeyError, TypeError) as err:
            return f"unreadable header ({err})"
        size = data_path.stat().st_size
        if size != header["bytes"]:
            return f"data file has {size} bytes, header says {header['bytes']} (truncated?)"
        if _file_sha256(data_path) != header["sha256"]:
            return "checksum mismatch (corrupt data)"
        return None

    def remove(self, name: str) -> None:
        for path in self._paths(name)[::-1]:  # header first: the entry is invalid from the first unlink
            path.unlink(missing_ok=True)

    def get_or_compute(self, name: str, compute: Callable[[], Tensor], count: int | None = None) -> Tensor:
        """The stored entry ``name``, or ``compute()`` stored and then returned (as loaded back)."""
        return self.get_or_compute_many([name], lambda missing: {name: compute()}, count)[name]

    def get_or_compute_many(self, names: Sequence[str], compute: Callable[[list[str]], dict[str, Tensor]],
                            count: int | None = None) -> dict[str, Tensor]:
        """The stored entries ``names``; the missing (or unusable) ones come from one call of
        ``compute(missing_names)``, are stored, and are returned as loaded back."""
        loaded = {name: self.load(name, count) for name in dict.fromkeys(names)}
        missing = [name for name, value in loaded.items() if value is None]
        computed = compute(missing) if missing else {}
        found: dict[str, Tensor] = {}
        for name, value in loaded.items():
            if value is None:
                fresh = computed[name]
                if count is not None and fresh.shape[0] != count:
                    raise ValueError(f"cache entry {name!r}: computed {fresh.shape[0]} rows, expected {count}")
                self.save(name, fresh)
                value = self.load(name, count)
                assert value is not None, f"cache entry {name!r} unreadable right after writing it"
            found[name] = value
        return found


@torch.no_grad()
def compute_per_example(teacher: Teacher, dataset: ImageDataset, targets: Callable[[ModelOutputs], dict[str, Tensor]],
                        layers: Sequence[str] = (), device: torch.device | str = "cpu",
                        batch_size: int = 512) -> dict[str, Tensor]:
    """``targets(teacher outputs)`` for every example of ``dataset`` in order, as the training loader feeds it.

    ``targets`` maps one batch's outputs (logits and the ``layers``' features) to named tensors with
    one row per example; the rows of all batches are gathered on the CPU as float32 (preallocated,
    so the peak is one copy of the result plus one batch).
    """
    loader = BatchLoader(dataset, batch_size, device=device)
    out: dict[str, Tensor] = {}
    for batch in loader.epoch(0):
        for name, value in targets(teacher(batch.inputs, layers)).items():
            if name not in out:
                out[name] = torch.empty((len(dataset), *value.shape[1:]), dtype=torch.float32)
            out[name][batch.index.cpu()] = value.float().cpu()
    return out


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
