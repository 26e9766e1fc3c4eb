"""The idx reader, dataset loading with clear errors, and the batch loader."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images, write_fake_mnist, write_idx

from distillery.data import (
    Augment,
    BatchLoader,
    DatasetNotFoundError,
    IdxFormatError,
    ImageDataset,
    augment_batch,
    from_torch_dataset,
    load_idx_dataset,
    read_idx,
)


def test_read_idx_roundtrip_plain_and_gz(tmp_path: Path) -> None:
    images, labels = make_images(7)
    for suffix in ("", ".gz"):
        assert np.array_equal(read_idx(write_idx(tmp_path / f"img{suffix}", images)), images)
        assert np.array_equal(read_idx(write_idx(tmp_path / f"lab{suffix}", labels)), labels)


def test_read_idx_rejects_truncated_and_garbage(tmp_path: Path) -> None:
    images, _ = make_images(5)
    path = write_idx(tmp_path / "x.gz", images)
    raw = gzip.decompress(path.read_bytes())
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(IdxFormatError, match="truncated or corrupt"):
        read_idx(truncated)
    cut_gzip = tmp_path / "c.gz"
    cut_gzip.write_bytes(path.read_bytes()[:30])
    with pytest.raises(IdxFormatError):
        read_idx(cut_gzip)
    garbage = tmp_path / "g"
    garbage.write_bytes(b"hello world")
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(garbage)


def test_load_dataset_from_root(fake_root: Path) -> None:
    train = load_idx_dataset("fashion_mnist", "train", fake_root)
    assert train.images.shape == (512, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and len(train) == 512
    assert train.num_classes == 10


def test_missing_dataset_names_files_and_remedy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from distillery.data import datasets

    monkeypatch.setitem(datasets.SYSTEM_ROOTS, "fashion_mnist", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError) as info:
        load_idx_dataset("fashion_mnist", "train", tmp_path / "empty")
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path / "empty") in message
    assert "apt-get install dataset-fashion-mnist" in message


def test_corrupt_dataset_file_is_reported(tmp_path: Path) -> None:
    root = write_fake_mnist(tmp_path / "d", 20, 10)
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b broken")
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_idx_dataset("fashion_mnist", "test", root)


def test_loader_covers_each_example_once_per_epoch(small_dataset: ImageDataset) -> None:
    loader = BatchLoader(small_dataset, 32, shuffle=True, seed=3)
    seen = torch.cat([b.index for b in loader.epoch(0)])
    assert sorted(seen.tolist()) == list(range(len(small_dataset)))
    assert not torch.equal(loader.order(0), loader.order(1))  # a new shuffle each epoch


def test_loader_shards_across_ranks_without_overlap(small_dataset: ImageDataset) -> None:
    shards = [BatchLoader(small_dataset, 16, shuffle=True, seed=1, rank=r, world_size=3).order(2) for r in range(3)]
    combined = torch.cat(shards)
    assert len(set(combined.tolist())) == len(small_dataset)  # no example dropped
    assert all(len(s) == len(shards[0]) for s in shards)  # equal work per rank


def test_loader_is_a_pure_function_of_seed_epoch_step(small_dataset: ImageDataset) -> None:
    aug = Augment(crop_padding=2, hflip=True)
    a = BatchLoader(small_dataset, 32, shuffle=True, augment=aug, seed=5)
    b = BatchLoader(small_dataset, 32, shuffle=True, augment=aug, seed=5)
    batches_a = list(a.epoch(1))
    resumed = list(b.epoch(1, start_step=3))
    assert torch.equal(batches_a[3].inputs, resumed[0].inputs)
    assert torch.equal(batches_a[4].targets, resumed[1].targets)
    c = BatchLoader(small_dataset, 32, shuffle=True, augment=aug, seed=6)
    assert not torch.equal(next(c.epoch(1)).inputs, batches_a[0].inputs)


def test_loader_normalises(small_dataset: ImageDataset) -> None:
    batch = next(BatchLoader(small_dataset, 8).epoch(0))
    expected = (small_dataset.images[:8].float() / 255 - 0.2) / 0.3
    assert torch.allclose(batch.inputs, expected)


def test_loader_keep_normalised_serves_the_same_batches(small_dataset: ImageDataset) -> None:
    plain = BatchLoader(small_dataset, 7)
    kept = BatchLoader(small_dataset, 7, keep_normalised=True)
    for a, b in zip(plain.epoch(0), kept.epoch(0), strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    shuffled = [BatchLoader(small_dataset, 7, shuffle=True, seed=3, keep_normalised=k) for k in (False, True)]
    for a, b in zip(shuffled[0].epoch(2), shuffled[1].epoch(2), strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.index, b.index)
    with pytest.raises(ValueError, match="cannot be combined with augmentation"):
        BatchLoader(small_dataset, 7, shuffle=True, augment=Augment(hflip=True), keep_normalised=True)


def test_augment_batch_crops_and_flips() -> None:
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    flipped = augment_batch(images, Augment(hflip=True), g)
    for i in range(2):  # each image is either unchanged or mirrored left-right
        assert torch.equal(flipped[i], images[i]) or torch.equal(flipped[i], images[i].flip(-1))
    cropped = augment_batch(images, Augment(crop_padding=1), torch.Generator().manual_seed(1))
    assert cropped.shape == images.shape
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    for i in range(2):  # each crop is a 4×4 window of the padded image
        windows = [padded[i, :, y : y + 4, x : x + 4] for y in range(3) for x in range(3)]
        assert any(torch.equal(cropped[i], w) for w in windows)


def test_from_torch_dataset_materialises_any_dataset() -> None:
    class Squares(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int):
            return torch.full((3, 5, 5), i / 10), i % 3

    ds = from_torch_dataset(Squares())
    assert ds.inputs.shape == (6, 3, 5, 5) and ds.inputs.dtype == torch.float32  # kept as given, not made uint8
    assert ds.num_classes == 3 and ds.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(ds.inputs[2], torch.full((3, 5, 5), 2 / 10))


def test_empty_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        ImageDataset(torch.zeros(0, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), (0.0,), (1.0,), 2)
