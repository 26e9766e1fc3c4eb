"""Built-in datasets, loaded whole into memory as tensors.

A dataset here is just images (uint8, N×C×H×W) and labels (int64, N) plus the normalisation
constants; :class:`~distillery.data.loader.BatchLoader` turns it into training batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing or unreadable; the message says where we looked."""


@dataclass(frozen=True)
class ImageDataset:
    """Images as uint8 N×C×H×W, labels as int64 N, and the normalisation to apply."""

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    def __post_init__(self) -> None:
        if self.images.dim() != 4:
            raise ValueError(f"images must be N×C×H×W, got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.images) == 0:
            raise ValueError("the dataset is empty")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def input_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, count: int | None, seed: int = 0) -> ImageDataset:
        """A class-agnostic random subset of ``count`` examples (all of them if ``count`` is None)."""
        if count is None or count >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return ImageDataset(self.images[index], self.labels[index], self.mean, self.std, self.num_classes)

    def without_classes(self, classes: tuple[int, ...]) -> ImageDataset:
        """The same data with every example of the given classes removed (Hinton's omitted-class test)."""
        keep = ~torch.isin(self.labels, torch.tensor(classes, dtype=self.labels.dtype))
        return ImageDataset(self.images[keep], self.labels[keep], self.mean, self.std, self.num_classes)


def _roots(root: Path | None, name: str) -> list[Path]:
    """Where to look: the given root only (never silently another copy), else the system folder."""
    return [root] if root is not None else [SYSTEM_ROOTS[name]]


def _find(root: Path | None, name: str, stem: str) -> Path | None:
    for r in _roots(root, name):
        for candidate in (r / f"{stem}.gz", r / stem):
            if candidate.is_file():
                return candidate
    return None


def load_idx_dataset(name: str, split: str, root: str | Path | None = None) -> ImageDataset:
    """Load the train or test split of ``fashion_mnist`` or ``mnist`` from idx files.

    Looks in ``root`` if given, else in the Debian package's folder. A missing, truncated, corrupt
    or empty file raises :class:`DatasetNotFoundError` naming every file looked for and how to get them.
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
    mean, std = STATS[name]
    return ImageDataset(
        torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype("int64")), mean, std, num_classes=10
    )


def from_torch_dataset(dataset: torch.utils.data.Dataset, num_classes: int | None = None,
                       mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> ImageDataset:
    """Materialise any map-style ``torch.utils.data.Dataset`` of (image, label) pairs in memory.

    Images may be uint8 (kept) or float in [0, 1] (scaled to uint8); shape C×H×W or H×W. Mean and
    std default to the data's own per-channel statistics.
    """
    xs, ys = [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        x, y = dataset[i]
        x = torch.as_tensor(x)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.is_floating_point():
            x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        xs.append(x)
        ys.append(int(y))
    images = torch.stack(xs)
    labels = torch.tensor(ys, dtype=torch.int64)
    scaled = images.float() / 255
    if mean is None:
        mean = tuple(scaled.mean(dim=(0, 2, 3)).tolist())
    if std is None:
        std = tuple(scaled.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())
    return ImageDataset(images, labels, mean, std, num_classes or int(labels.max()) + 1)
