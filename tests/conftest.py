"""Shared fixtures: small synthetic datasets and idx files, so tests never need the real 60k set."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.data import ImageDataset

torch.set_num_threads(2)

# The helpers in tests/fakes.py, importable from every test file and from spawned workers.
sys.path.insert(0, str(Path(__file__).parent))


def make_images(n: int, num_classes: int = 10, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable synthetic images: each class is a bright square at its own position, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    cell = size // 4
    for i, label in enumerate(labels):
        r, c = divmod(int(label) % 16, 4)
        images[i, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = 220
    return images, labels


def write_idx(path: Path, array: np.ndarray) -> Path:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_fake_mnist(root: Path, n_train: int = 512, n_test: int = 256) -> Path:
    """Four idx.gz files in the layout of (Fashion-)MNIST."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = make_images(n, seed=seed)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    return write_fake_mnist(tmp_path / "data")


@pytest.fixture
def small_dataset() -> ImageDataset:
    images, labels = make_images(256)
    return ImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype("int64")),
                        (0.2,), (0.3,), 10)
