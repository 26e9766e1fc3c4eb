"""Replayable augmentation: per-example crop and flip as a pure function of (augment seed, index, epoch)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from distillery.data import (
    Augment,
    AugmentParams,
    BatchLoader,
    InMemoryDataset,
    Normalisation,
    apply_augment,
    normalise,
    sample_augment,
)

AUG = Augment(crop_padding=2, hflip=True)


def _images(n: int = 48, seed: int = 0) -> InMemoryDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 2, 6, 5), generator=g, dtype=torch.uint8)
    return InMemoryDataset(images, torch.arange(n) % 3, Normalisation((0.4, 0.5), (0.2, 0.3)), 3)


def _views(loader: BatchLoader, epoch: int) -> torch.Tensor:
    data = loader.dataset
    out = torch.empty((len(data), *data.sample_shape))
    for batch in loader.epoch(epoch):
        out[batch.index] = batch.inputs
    return out


def test_apply_augment_crops_a_padded_window_then_mirrors() -> None:
    images = torch.arange(3 * 2 * 4 * 5, dtype=torch.float32).view(3, 2, 4, 5)
    params = AugmentParams(torch.tensor([[0, 0], [2, 1], [1, 2]]), torch.tensor([False, True, True]))
    out = apply_augment(images, params, Augment(crop_padding=1, hflip=True))
    padded = F.pad(images, (1, 1, 1, 1))
    for i, ((dy, dx), flip) in enumerate(zip(params.crop_offsets.tolist(), params.flip.tolist())):
        window = padded[i, :, dy : dy + 4, dx : dx + 5]
        assert torch.equal(out[i], window.flip(-1) if flip else window)
    assert torch.equal(apply_augment(images.to(torch.uint8), params, Augment(crop_padding=1, hflip=True)),
                       out.to(torch.uint8))  # the same on raw uint8 values


def test_sample_augment_is_pure_per_example_and_evenly_spread() -> None:
    index = torch.arange(20000)
    params = sample_augment(AUG, 11, index, epoch=3)
    some = torch.tensor([17, 4, 19999, 0])
    part = sample_augment(AUG, 11, some, epoch=3)  # other examples, other order: the same values per example
    assert torch.equal(part.crop_offsets, params.crop_offsets[some]) and torch.equal(part.flip, params.flip[some])
    assert params.crop_offsets.min() == 0 and params.crop_offsets.max() == 4
    counts = torch.bincount(params.crop_offsets.flatten(), minlength=5).double() / (2 * len(index))
    assert (counts - 0.2).abs().max() < 0.01  # uniform over 0..2·pad (binomial sd ≈ 0.002)
    assert abs(params.flip.double().mean().item() - 0.5) < 0.015
    assert (params.crop_offsets[:, 0] != params.crop_offsets[:, 1]).double().mean() > 0.7  # rows, columns independent
    for other in (sample_augment(AUG, 11, index, epoch=4), sample_augment(AUG, 12, index, epoch=3)):
        assert (other.flip != params.flip).double().mean() > 0.4  # another epoch or seed: another view


def test_replay_is_independent_of_the_run_seed_and_batch_order() -> None:
    data = _images()
    first = BatchLoader(data, 8, shuffle=True, augment=AUG, seed=1, augment_seed=7)
    second = BatchLoader(data, 5, shuffle=True, augment=AUG, seed=2, augment_seed=7)
    assert not torch.equal(first.order(2), second.order(2))
    assert torch.equal(_views(first, 2), _views(second, 2))  # example i, epoch 2: one view in both runs
    assert not torch.equal(_views(first, 2), _views(first, 3))
    for batch in second.epoch(2):  # what a teacher store records, and replays from the raw inputs
        assert batch.augment is not None
        replayed = sample_augment(AUG, 7, batch.index, 2)
        assert torch.equal(batch.augment.crop_offsets, replayed.crop_offsets)
        view = apply_augment(data.inputs[batch.index], batch.augment, AUG)
        assert torch.equal(normalise(view, data.normalisation), batch.inputs)


def test_augment_seed_defaults_to_the_run_seed_and_off_means_none() -> None:
    data = _images()
    default = BatchLoader(data, 8, shuffle=True, augment=AUG, seed=5)
    assert default.augment_seed == 5
    assert torch.equal(_views(default, 1), _views(BatchLoader(data, 8, shuffle=True, augment=AUG, seed=9,
                                                              augment_seed=5), 1))
    assert next(BatchLoader(data, 8, shuffle=True, seed=5).epoch(0)).augment is None
    assert next(BatchLoader(data, 8, augment=AUG).epoch(0)).augment is None  # not shuffled: evaluation, no crop


@pytest.mark.parametrize("shape", [(6,), (2, 9), (2, 3, 4, 5)], ids=["vectors", "signals", "volumes"])
def test_augmentation_on_data_it_does_not_fit_is_refused(shape: tuple[int, ...]) -> None:
    data = InMemoryDataset(torch.zeros(8, *shape), torch.zeros(8, dtype=torch.int64), Normalisation.none(), 1)
    with pytest.raises(ValueError, match=re.escape(f"is for images (samples C×H×W); these samples have shape {shape}")):
        BatchLoader(data, 4, shuffle=True, augment=Augment(hflip=True))
    with pytest.raises(ValueError, match="crop and flip apply to image batches"):
        apply_augment(data.inputs, sample_augment(AUG, 0, torch.arange(8), 0), AUG)
