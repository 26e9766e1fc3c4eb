"""In-memory batch loader with batched, on-device augmentation.

The whole dataset lives on the training device as uint8; a batch is an index into it. Every random
choice of a batch (the epoch's shuffle, each example's crop offset and flip) is a pure function of
``(seed, epoch, step)``, so a run resumed at any step sees exactly the batches an uninterrupted run
would, with no loader state to save. Under distributed training each rank takes every
``world_size``-th example of the shared epoch permutation: no example is duplicated or dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.data.datasets import ImageDataset


@dataclass(frozen=True)
class Augment:
    """Random crop after zero-padding by ``crop_padding`` pixels, and horizontal flip with p = 0.5."""

    crop_padding: int = 0
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip


@dataclass(frozen=True)
class Batch:
    inputs: Tensor  # float, normalised, N×C×H×W on the device
    targets: Tensor  # int64, N
    index: Tensor  # int64 dataset indices of the examples, N (for teacher-output caches)


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:  # a simple, stable mix of the keys into one 63-bit seed
        seed = (seed * 6364136223846793005 + key + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(seed)


class BatchLoader:
    """Batches of an :class:`ImageDataset`, normalised and augmented on ``device``.

    Iterate with :meth:`epoch` (``for batch in loader.epoch(3)``); ``len(loader)`` is the number of
    batches per epoch on this rank. ``keep_normalised=True`` normalises the whole set once (4 bytes
    per pixel held) for sets read many times without augmentation, such as a test set; its
    batches are views of that copy, so a model must not write into its input in place.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augment = Augment(),
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        keep_normalised: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        # (x/255 − mean)/std as one multiply and one subtract, both in place on the batch's float copy.
        shape = (1, -1, 1, 1)
        mean = torch.tensor(dataset.mean, dtype=torch.float64).view(shape)
        std = torch.tensor(dataset.std, dtype=torch.float64).view(shape)
        self._scale = (1 / (255 * std)).float().to(self.device)
        self._shift = (mean / std).float().to(self.device)
        if keep_normalised and augment.active and shuffle:
            raise ValueError("keep_normalised serves fixed normalised images; it cannot be combined with augmentation")
        # For a set read many times unchanged (a test set evaluated every epoch): normalise it once,
        # 4 bytes per pixel, and serve batches as views of that copy instead of converting each time.
        self._normalised = (self.images.float().mul_(self._scale).sub_(self._shift)
                            if keep_normalised else None)
        # Each rank gets the same number of examples (the tail that would unbalance ranks is dropped
        # only when drop_last; otherwise ranks wrap around to pad, as DistributedSampler does).
        self._per_rank = len(dataset) // world_size if drop_last else -(-len(dataset) // world_size)
        if self._per_rank == 0 or (drop_last and self._per_rank < batch_size):
            raise ValueError(
                f"{len(dataset)} examples over {world_size} rank(s) do not fill one batch of {batch_size} "
                "with drop_last; use a smaller batch_size"
            )

    def __len__(self) -> int:
        if self.drop_last:
            return self._per_rank // self.batch_size
        return -(-self._per_rank // self.batch_size)

    def order(self, epoch: int) -> Tensor:
        """This rank's dataset indices for ``epoch``, in batch order."""
        n = len(self.dataset)
        if self.shuffle:
            perm = torch.randperm(n, generator=_generator(self.seed, epoch))
        else:
            perm = torch.arange(n)
        total = self._per_rank * self.world_size
        if total > n:
            perm = torch.cat([perm, perm[: total - n]])
        return perm[:total][self.rank :: self.world_size]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch``, starting at ``start_step`` (for mid-epoch resume)."""
        order = self.order(epoch)
        in_order = not self.shuffle and self.world_size == 1  # order is 0..n-1: batches are slices, not gathers
        for step in range(start_step, len(self)):
            rows = slice(step * self.batch_size, (step + 1) * self.batch_size)
            index = order[rows].to(self.device)
            yield self._make_batch(index, epoch, step, rows if in_order else None)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def _make_batch(self, index: Tensor, epoch: int, step: int, rows: slice | None = None) -> Batch:
        labels = self.labels[rows] if rows is not None else self.labels[index]
        if self._normalised is not None:  # a view when in order; the model must not write into its input
            return Batch(self._normalised[rows] if rows is not None else self._normalised[index], labels, index)
        images = (self.images[rows] if rows is not None else self.images[index]).float()  # pixel values 0..255
        if self.augment.active and self.shuffle:  # crop and flip only move pixels (padding is black: 0)
            images = augment_batch(images, self.augment, _generator(self.seed, epoch, step, self.rank + 1))
        return Batch(images.mul_(self._scale).sub_(self._shift), labels, index)


def augment_batch(images: Tensor, augment: Augment, generator: torch.Generator) -> Tensor:
    """Random crop (after zero padding) and horizontal flip of a whole N×C×H×W batch at once.

    Random draws come from the CPU ``generator`` (same numbers on every device) and are moved to
    the images' device; the crop is one gather, the flip one ``where``.
    """
    n, _, h, w = images.shape
    device = images.device
    if augment.crop_padding > 0:
        pad = augment.crop_padding
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]  # N×1×H×1
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]  # N×1×1×W
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    if augment.hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(device)[:, None, None, None]
        images = torch.where(flip, images.flip(-1), images)
    return images
