"""Datasets held whole in memory as tensors, kept exactly as they were given.

A dataset is its inputs (N×…, any sample shape, in their own dtype), its labels (int64, N, each in
``0 .. num_classes-1``) and a :class:`Normalisation`, the per-channel standardisation the
:class:`~distillery.data.loader.BatchLoader` applies when it makes batches. The stored inputs are
never clamped, rounded, rescaled or reshaped: vectors stay N×D, signals N×C×L, images N×C×H×W,
volumes N×C×D×H×W; uint8 images stay uint8 (1 byte a value), float32/float16 stay bit for bit.

What the network sees is stated here, once. For an input ``x`` of channel ``c`` (dimension 1):

    x' = (s·x − mean_c) / std_c   in float32,   s = 1/255 for uint8 inputs, else 1

uint8 inputs are taken as 8-bit intensities, so they are divided by 255 into [0, 1] first; every
other dtype is only converted to float32 (exact for float32, float16, bfloat16 and integers up to
2²⁴; float64 is rounded to the nearest float32, the network's precision). ``Normalisation.none()``
(mean 0, std 1) therefore hands float32 data to the network bit for bit as given. A mean/std of
one value applies to every channel.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from distillery.data.idx import IdxFormatError, read_idx

SYSTEM_ROOTS = {
    "fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
    "mnist": Path("/usr/share/datasets/mnist"),
}
HOW_TO_GET = {
    "fashion_mnist": "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download "
    "the four idx .gz files from https://github.com/zalandoresearch/fashion-mnist into the data root",
    "mnist": "download the four idx .gz files of MNIST into the data root",
}
# Per-channel mean and std of the training images, scaled to [0, 1].
STATS = {"fashion_mnist": ((0.2860,), (0.3530,)), "mnist": ((0.1307,), (0.3081,))}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
UINT8_SCALE = 255  # uint8 inputs are divided by this before normalising (8-bit intensities -> [0, 1])
# A channel whose spread is below this (in scaled units) is constant: it is centred, not divided.
CONSTANT_STD = 1e-6
_STATS_CHUNK_VALUES = 1 << 22  # values per float64 chunk when measuring statistics (bounds the temporary memory)
_SUPPORTED_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                     torch.uint64, torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64)


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing or unreadable; the message says where we looked."""


@dataclass(frozen=True)
class Normalisation:
    """Per-channel standardisation ``x' = (s·x − mean_c) / std_c`` (see the module docstring for ``s``).

    ``mean`` and ``std`` hold one value per channel (dimension 1 of the inputs; for N×D vectors,
    one per feature), or a single value for all channels, in the units of ``s·x``.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if not mean or len(mean) != len(std):
            raise ValueError(f"normalisation needs one mean and one std per channel; got {len(mean)} mean value(s) "
                             f"and {len(std)} std value(s)")
        if not all(s > 0 and s < float("inf") for s in std):
            raise ValueError(f"normalisation std must be positive and finite, got {std}")
        if not all(abs(m) < float("inf") for m in mean):
            raise ValueError(f"normalisation mean must be finite, got {mean}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def none(cls) -> Normalisation:
        """No standardisation: the network sees ``s·x`` (float data exactly as given)."""
        return cls((0.0,), (1.0,))

    @classmethod
    def of_data(cls, inputs: Tensor) -> Normalisation:
        """The inputs' own per-channel mean and standard deviation (of ``s·x``, over every dimension but 1).

        The std divides by n − 1, as ``torch.std``; both are computed in float64 over chunks of
        examples. A channel with std below ``CONSTANT_STD`` is constant: it gets std 1, so it is
        centred to 0 rather than blown up by rounding noise.
        """
        _check_inputs(inputs)
        dims = [0, *range(2, inputs.dim())]
        count = inputs.numel() // inputs.shape[1]

        rows = max(1, _STATS_CHUNK_VALUES // max(1, inputs[0].numel()))

        def chunks():  # one float64 chunk alive at a time
            return (_scaled(part, torch.float64) for part in inputs.split(rows))

        mean = sum(chunk.sum(dim=dims) for chunk in chunks()) / count
        shape = (1, -1, *([1] * (inputs.dim() - 2)))
        variance = sum(((chunk - mean.view(shape)) ** 2).sum(dim=dims) for chunk in chunks()) / max(count - 1, 1)
        std = variance.sqrt()
        std = torch.where(std < CONSTANT_STD, torch.ones_like(std), std)
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    @property
    def is_identity(self) -> bool:
        return all(m == 0 for m in self.mean) and all(s == 1 for s in self.std)

    def per_channel(self, sample_dims: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Mean and std as float32 1×C×1×…×1 tensors, to broadcast over a batch of ``sample_dims``-D samples."""
        shape = (1, -1, *([1] * (sample_dims - 1)))
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(shape)
        return mean, std


NormalisationChoice = Normalisation | Literal["dataset", "none"]


def resolve_normalisation(choice: NormalisationChoice, inputs: Tensor) -> Normalisation:
    """``"dataset"``: the inputs' own statistics; ``"none"``: :meth:`Normalisation.none`; else ``choice`` itself."""
    if isinstance(choice, Normalisation):
        return choice
    if choice == "dataset":
        return Normalisation.of_data(inputs)
    if choice == "none":
        return Normalisation.none()
    raise ValueError(f"normalisation must be 'dataset', 'none' or a Normalisation, got {choice!r}")


def _scaled(inputs: Tensor, dtype: torch.dtype) -> Tensor:
    """``s·x`` as ``dtype`` (a new tensor): uint8 divided by 255, any other dtype converted unchanged."""
    x = inputs.to(dtype, copy=True)
    return x.div_(UINT8_SCALE) if inputs.dtype == torch.uint8 else x


def normalise(inputs: Tensor, normalisation: Normalisation,
              per_channel: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``(s·x − mean_c) / std_c`` as a new float32 tensor: what the loader hands the network.

    ``per_channel``: ``normalisation.per_channel(...)`` already on the inputs' device, for callers
    that normalise many batches (made once instead of per call).
    """
    x = _scaled(inputs, torch.float32)
    if normalisation.is_identity:
        return x
    mean, std = per_channel or normalisation.per_channel(inputs.dim() - 1, inputs.device)
    return x.sub_(mean).div_(std)


def _check_inputs(inputs: Tensor) -> None:
    if not isinstance(inputs, Tensor):
        raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if inputs.dim() < 2:
        raise ValueError(f"inputs must be N×(sample shape) with samples of at least one dimension "
                         f"(N×D vectors, N×C×L signals, N×C×H×W images, ...); got shape {tuple(inputs.shape)}")
    if inputs.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"inputs must be of a real numeric dtype, got {inputs.dtype}")
    if len(inputs) == 0:
        raise ValueError("the dataset is empty")


def _checked_class_count(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def _checked_labels(labels: Tensor, count: int, num_classes: int) -> Tensor:
    """``labels`` as int64 (values unchanged), after checking shape, dtype and range."""
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D tensor with one class index per example, got {shape}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if len(labels) != count:
        raise ValueError(f"{count} inputs but {len(labels)} labels")
    labels = labels.to(torch.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values = torch.unique(labels[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise ValueError(f"labels must lie in 0..{num_classes - 1} (num_classes={num_classes}); "
                         f"{int(bad.sum())} example(s) have label(s) {shown}")
    return labels


@dataclass(frozen=True, eq=False, init=False)
class InMemoryDataset:
    """Inputs (N×sample shape, their own dtype), labels (int64, N), the :class:`Normalisation`, the class count.

    ``InMemoryDataset(inputs, labels, normalisation, num_classes, class_names=None)``; the labels
    must lie in ``0 .. num_classes-1`` and ``class_names``, when given, names each class id.
    The older form ``ImageDataset(images, labels, mean, std, num_classes)`` (mean and std as
    tuples, num_classes positional or keyword) is still accepted until its callers move to
    :class:`Normalisation`.
    """

    inputs: Tensor
    labels: Tensor
    normalisation: Normalisation
    num_classes: int
    class_names: tuple[str, ...] | None

    def __init__(self, inputs: Tensor, labels: Tensor, normalisation: Normalisation | Sequence[float],
                 *args: int | Sequence[float], num_classes: int | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        normalisation, num_classes = _constructor_form(normalisation, args, num_classes)
        num_classes = _checked_class_count(num_classes)
        _check_inputs(inputs)
        labels = _checked_labels(labels, len(inputs), num_classes)
        channels = inputs.shape[1]
        if len(normalisation.mean) not in (1, channels):
            raise ValueError(f"normalisation has {len(normalisation.mean)} values per statistic but the samples "
                             f"(shape {tuple(inputs.shape[1:])}) have {channels} channels (dimension 1); "
                             "give one value per channel or a single value for all")
        if class_names is not None:
            class_names = tuple(str(name) for name in class_names)
            if len(class_names) != num_classes:
                raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        for name, value in (("inputs", inputs), ("labels", labels), ("normalisation", normalisation),
                            ("num_classes", num_classes), ("class_names", class_names)):
            object.__setattr__(self, name, value)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"InMemoryDataset({len(self)} × {self.sample_shape} {self.inputs.dtype}, "
                f"{self.num_classes} classes, {self.normalisation})")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one example: ``(D,)``, ``(C, L)``, ``(C, H, W)``, ``(C, D, H, W)``, ..."""
        return tuple(self.inputs.shape[1:])

    @property
    def in_channels(self) -> int:
        """Size of dimension 1: the channels (the features, for N×D vectors)."""
        return self.inputs.shape[1]

    @property
    def input_size(self) -> int:
        """The last dimension's size: the width of images (their side, when square), the length of signals."""
        if self.inputs.dim() < 3:
            raise ValueError(f"samples of shape {self.sample_shape} are feature vectors with no spatial size; "
                             "use sample_shape")
        return self.inputs.shape[-1]

    @property
    def images(self) -> Tensor:
        """The inputs, under their older name (kept until callers move to ``inputs``)."""
        return self.inputs

    @property
    def mean(self) -> tuple[float, ...]:
        """``normalisation.mean``, under its older name."""
        return self.normalisation.mean

    @property
    def std(self) -> tuple[float, ...]:
        """``normalisation.std``, under its older name."""
        return self.normalisation.std

    def take(self, index: Tensor) -> InMemoryDataset:
        """The examples at ``index`` (int64 positions or a bool mask), same normalisation and classes."""
        return InMemoryDataset(self.inputs[index], self.labels[index], self.normalisation, self.num_classes,
                               class_names=self.class_names)

    def with_normalisation(self, normalisation: Normalisation) -> InMemoryDataset:
        """The same data with another normalisation (the data is shared, not copied)."""
        return InMemoryDataset(self.inputs, self.labels, normalisation, self.num_classes, class_names=self.class_names)

    def subset(self, count: int | None, seed: int = 0) -> InMemoryDataset:
        """A class-agnostic random subset of ``count`` examples (all of them if ``count`` is None)."""
        if count is None or count >= len(self):
            return self
        return self.take(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count])

    def without_classes(self, classes: Sequence[int]) -> InMemoryDataset:
        """The same data with every example of the given classes removed (Hinton's omitted-class test)."""
        return self.take(~torch.isin(self.labels, torch.tensor(tuple(classes), dtype=torch.int64)))


ImageDataset = InMemoryDataset  # the older name, kept so existing imports work


def _constructor_form(normalisation: Normalisation | Sequence[float], args: tuple, num_classes: int | None,
                      ) -> tuple[Normalisation, int]:
    """(normalisation, num_classes) from the new form ``(…, normalisation, num_classes)`` or the older
    ``(…, mean, std, num_classes)``, num_classes given by position or keyword in either."""
    usage = ("expected InMemoryDataset(inputs, labels, normalisation: Normalisation, num_classes) "
             "or the older ImageDataset(images, labels, mean, std, num_classes)")
    if not isinstance(normalisation, Normalisation):  # the older form: args = (std,) or (std, num_classes)
        if not args or isinstance(args[0], int):
            raise TypeError(f"{usage}; got mean {normalisation!r} without a std")
        normalisation, args = Normalisation(tuple(normalisation), tuple(args[0])), args[1:]
    if len(args) > 1 or (args and num_classes is not None):
        raise TypeError(f"{usage}; got extra arguments {args!r}")
    if args:
        num_classes = args[0]  # type: ignore[assignment]
    if num_classes is None:
        raise TypeError(f"{usage}; num_classes is missing")
    return normalisation, num_classes  # type: ignore[return-value]


def stratified_split(dataset: InMemoryDataset, fraction: float, seed: int) -> tuple[InMemoryDataset, InMemoryDataset]:
    """Split ``dataset`` into (rest, held out) with ``fraction`` of the examples held out, class by class.

    The held-out part has ``round(fraction · N)`` examples; each class gives it ``fraction`` of its
    examples, rounded down or up by the largest-remainder rule so the total is met. Which examples
    go is a seeded random choice; both parts keep the dataset's order, normalisation and classes.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction must be strictly between 0 and 1, got {fraction}")
    n = len(dataset)
    target = round(fraction * n)
    if not 0 < target < n:
        raise ValueError(f"a split fraction of {fraction} of {n} examples leaves one part empty")
    labels = dataset.labels
    counts = torch.bincount(labels, minlength=dataset.num_classes)
    exact = counts.double() * fraction
    quota = exact.floor().long()
    remainder = exact - quota
    short = target - int(quota.sum())
    quota[torch.argsort(remainder, descending=True, stable=True)[:short]] += 1
    # Shuffle, then group by class (stable sort keeps the shuffle within a class): the first
    # quota[c] examples of class c in that order are held out.
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    grouped = shuffled[torch.argsort(labels[shuffled], stable=True)]
    starts = torch.cumsum(counts, 0) - counts
    grouped_labels = labels[grouped]
    rank_in_class = torch.arange(n) - starts[grouped_labels]
    held = torch.zeros(n, dtype=torch.bool)
    held[grouped[rank_in_class < quota[grouped_labels]]] = True
    return dataset.take(~held), dataset.take(held)


def _roots(root: Path | None, name: str) -> list[Path]:
    """Where to look: the given root only (never silently another copy), else the system folder."""
    return [root] if root is not None else [SYSTEM_ROOTS[name]]


def _find(root: Path | None, name: str, stem: str) -> Path | None:
    for r in _roots(root, name):
        for candidate in (r / f"{stem}.gz", r / stem):
            if candidate.is_file():
                return candidate
    return None


def load_idx_dataset(name: str, split: str, root: str | Path | None = None) -> InMemoryDataset:
    """Load the train or test split of ``fashion_mnist`` or ``mnist`` from idx files.

    Looks in ``root`` if given, else in the Debian package's folder. A missing, truncated, corrupt
    or empty file raises :class:`DatasetNotFoundError` naming every file looked for and how to get them.
    The images are uint8 N×1×28×28, normalised with the published statistics of the training set (``STATS``).
    """
    if name not in SYSTEM_ROOTS:
        raise ValueError(f"unknown dataset {name!r}; built-in datasets: {', '.join(SYSTEM_ROOTS)}")
    if split not in FILES:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    root = Path(root) if root is not None else None
    arrays = []
    for stem in FILES[split]:
        path = _find(root, name, stem)
        if path is None:
            searched = [str(r / f"{stem}[.gz]") for r in _roots(root, name)]
            raise DatasetNotFoundError(
                f"{name} {split} split: file not found; looked for {' and '.join(searched)}. "
                f"To get it: {HOW_TO_GET[name]}."
            )
        try:
            arrays.append(read_idx(path))
        except IdxFormatError as err:
            raise DatasetNotFoundError(f"{name} {split} split: {err}. To get a good copy: {HOW_TO_GET[name]}.") from err
    images, labels = arrays
    if images.ndim == 3 and len(images) == 0:
        raise DatasetNotFoundError(f"{name} {split} split: {_find(root, name, FILES[split][0])} holds no examples "
                                   "(the dataset is empty)")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetNotFoundError(
            f"{name} {split} split: images of shape {images.shape} do not match labels of shape {labels.shape}"
        )
    return InMemoryDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype("int64")),
                           Normalisation(*STATS[name]), num_classes=10)


def from_torch_dataset(dataset: torch.utils.data.Dataset, num_classes: int | None = None,
                       normalisation: NormalisationChoice = "dataset") -> InMemoryDataset:
    """Materialise a map-style ``torch.utils.data.Dataset`` of (input, label) pairs in memory.

    Each input is kept as it is given: its dtype, values and shape (an image must therefore come as
    C×H×W; an H×W sample stays H×W). All inputs must share one shape and dtype. Labels must be whole
    numbers; ``num_classes`` defaults to the largest label + 1. ``normalisation``: ``"dataset"``
    (the inputs' own per-channel statistics), ``"none"``, or a :class:`Normalisation`.
    """
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{type(dataset).__name__} is not a map-style dataset (it needs __len__ and __getitem__)")
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        raise ValueError(f"{type(dataset).__name__} is empty")
    first = _sample(dataset, 0)
    inputs = torch.empty((count, *first[0].shape), dtype=first[0].dtype)
    labels = torch.empty(count, dtype=torch.int64)
    for i in range(count):
        x, y = first if i == 0 else _sample(dataset, i)
        if x.shape != first[0].shape or x.dtype != first[0].dtype:
            raise ValueError(f"item {i} of {type(dataset).__name__} has shape {tuple(x.shape)} and dtype {x.dtype}, "
                             f"item 0 has {tuple(first[0].shape)} and {first[0].dtype}; all inputs must match")
        inputs[i] = x
        labels[i] = y
    if num_classes is None:
        num_classes = max(int(labels.max()) + 1, 1)
    return InMemoryDataset(inputs, labels, resolve_normalisation(normalisation, inputs), num_classes)


def _sample(dataset: torch.utils.data.Dataset, i: int) -> tuple[Tensor, int]:
    """Item ``i`` as (input tensor, integer label), with a clear error for anything else."""
    name = type(dataset).__name__
    item = dataset[i]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"item {i} of {name} is a {type(item).__name__}, expected an (input, label) pair")
    x, y = item
    if not isinstance(x, Tensor) and type(x).__module__.startswith("PIL"):
        raise TypeError(f"item {i} of {name} is a PIL image; give tensors (C×H×W), e.g. convert in the dataset")
    try:
        x = torch.as_tensor(x).detach()
        label = torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"item {i} of {name}: cannot make a tensor of its input or label ({err})") from err
    if x.dim() == 0:
        raise ValueError(f"item {i} of {name}: the input is a scalar; samples need at least one dimension")
    value = label.item() if label.numel() == 1 and not label.is_complex() else None
    if value is None or isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"item {i} of {name}: label {y!r} is not a whole-number class index")
    return x, int(value)
