"""Tiny learnable image data for the method tests: class templates plus noise, as tensors or idx files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from distillery.data import ImageDataset


def tiny_arrays(n: int, num_classes: int = 10, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 size×size images: a fixed random template per class (seed 99) blended with noise."""
    templates = np.random.default_rng(99).random((num_classes, size, size))
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = 0.7 * templates[labels] + 0.3 * rng.random((n, size, size))
    return (images * 255).astype(np.uint8), labels.astype(np.uint8)


def tiny_dataset(n: int, num_classes: int = 10, size: int = 8, seed: int = 0) -> ImageDataset:
    images, labels = tiny_arrays(n, num_classes, size, seed)
    return ImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        (0.5,), (0.3,), num_classes)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_tiny_fmnist(root: Path, n_train: int = 128, n_test: int = 64, size: int = 8) -> Path:
    """Write the four Fashion-MNIST idx files of a tiny learnable set into ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for n, seed, (images_name, labels_name) in (
        (n_train, 1, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
        (n_test, 2, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    ):
        images, labels = tiny_arrays(n, size=size, seed=seed)
        _write_idx(root / images_name, images)
        _write_idx(root / labels_name, labels)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one intra-op thread: the tiny convolutions here only lose time to threading,
    badly so on a shared 2-core machine. Import this fixture into a test module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
