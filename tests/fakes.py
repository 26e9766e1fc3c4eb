"""Small fake data and runs shared by the tests: random images, idx files, a tiny training setup."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from distillery.config import TrainConfig
from distillery.data import ImageDataset
from distillery.methods import Teacher


def random_dataset(n: int, seed: int = 0, size: int = 8, classes: int = 4) -> ImageDataset:
    """``n`` random 1×size×size uint8 images whose label depends on the image (so it is learnable)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)
    labels = (images.float().mean(dim=(1, 2, 3)) * classes / 256).long().clamp(max=classes - 1)
    labels = (labels + images[:, 0, 0, 0].long()) % classes
    return ImageDataset(images, labels, (0.5,), (0.29,), classes)


class CountingTeacher(Teacher):
    """A Teacher that counts its forward passes, to tell cache hits from recomputation."""

    calls = 0

    def __call__(self, inputs, layers=(), index=None):
        self.calls += 1
        return super().__call__(inputs, layers)


def counting(teacher: Teacher) -> CountingTeacher:
    """The same networks as ``teacher``, counting forward passes."""
    return CountingTeacher(teacher.members)


def train_config(**overrides) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
            "schedule": {"name": "cosine"}}
    base.update(overrides)
    return TrainConfig.model_validate(base)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write ``array`` (uint8) as an idx file (gzip-compressed when ``gz``)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path = Path(str(path) + ".gz") if gz else Path(path)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_fake_fmnist(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """A Fashion-MNIST-shaped dataset (28×28, 10 classes) of random images in ``root``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return root


def five_class_mlp(**kwargs) -> torch.nn.Module:
    """A user model (``fakes:five_class_mlp``) for a 5-class task: a teacher of another task."""
    from distillery.models.mlp import MLP

    return MLP(28 * 28, [16], num_classes=5)
