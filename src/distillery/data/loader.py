"""In-memory batch loader with batched, on-device, replayable augmentation.

The whole dataset lives on the training device in its own dtype; a batch is an index into it,
normalised by the dataset's :class:`~distillery.data.datasets.Normalisation` on the way out.
The epoch's shuffle is a pure function of ``(seed, epoch)``, so batch ``step`` of ``epoch`` is a
pure function of ``(seed, epoch, step)``: a run resumed at any step sees exactly the batches an
uninterrupted run would, with no loader state to save. Under distributed training each rank
takes every ``world_size``-th example of the shared epoch permutation: no example is duplicated
or dropped.

Augmentation (images only) is replayable: the crop offset and flip of example ``i`` in ``epoch``
are a pure function of ``(augment_seed, i, epoch)`` (:func:`sample_augment`), not of the batch
order, the rank or the run's seed. Two runs with one augment seed see the same view of every
example in every epoch whatever their shuffles, and a teacher store can record the parameters
(``Batch.augment``) or recompute them, then replay them with :func:`apply_augment`. With
``augment_epochs = E`` the views repeat every E epochs (epoch e shows the views of epoch e mod E),
so a store of E epochs of teacher outputs (:mod:`distillery.teacher_store`) serves a run of any
length; :meth:`BatchLoader.batch_of` gives any examples as a given epoch shows them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distillery.data.datasets import InMemoryDataset, normalise

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Augment:
    """Random crop after zero-padding by ``crop_padding`` pixels, and horizontal flip with p = 0.5."""

    crop_padding: int = 0
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.hflip


@dataclass(frozen=True)
class AugmentParams:
    """The augmentation of each example of a batch, in batch order.

    ``crop_offsets``: int64 N×2, the (row, column) of the crop window's top-left corner in the
    zero-padded image, each in ``0 .. 2·crop_padding`` (``crop_padding`` each: the image unmoved).
    ``flip``: bool N, whether the (cropped) image is mirrored left-right.
    """

    crop_offsets: Tensor
    flip: Tensor

    def __post_init__(self) -> None:
        if self.crop_offsets.dim() != 2 or self.crop_offsets.shape[1] != 2 or self.crop_offsets.is_floating_point():
            raise ValueError(f"crop_offsets must be integer N×2, got {self.crop_offsets.dtype} "
                             f"{tuple(self.crop_offsets.shape)}")
        if self.flip.dtype != torch.bool or self.flip.shape != (len(self.crop_offsets),):
            raise ValueError(f"flip must be bool of shape ({len(self.crop_offsets)},), got {self.flip.dtype} "
                             f"{tuple(self.flip.shape)}")

    def __len__(self) -> int:
        return len(self.flip)

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(self.crop_offsets.to(device), self.flip.to(device))


@dataclass(frozen=True)
class Batch:
    inputs: Tensor  # float32, normalised, N×sample shape on the device
    targets: Tensor  # int64, N
    index: Tensor  # int64 dataset indices of the examples, N (for teacher-output caches)
    augment: AugmentParams | None = None  # each example's crop and flip, when the batch is augmented


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """``(x · c) mod 2³²`` for 0 ≤ x, c < 2³², with no int64 product reaching 2⁶³.

    For c ≥ 2³¹, ``x·c = x·(c − 2³¹) + x·2³¹`` and ``x·2³¹ mod 2³² = (x mod 2) · 2³¹``.
    """
    if c < 1 << 31:
        return (x * c) & _MASK32
    return (x * (c - (1 << 31)) + ((x & 1) << 31)) & _MASK32


def _fmix32(h: Tensor | int) -> Tensor | int:
    """MurmurHash3's 32-bit finaliser: a bijection of 32-bit words in which every input bit flips
    each output bit with probability about 1/2. Works alike on Python ints and int64 tensors."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _hash32(seed: int, epoch: int, index: Tensor) -> Tensor:
    """A 32-bit hash of ``(seed, epoch, index)`` for each index (taken mod 2³²), as int64.

    Counter-based: ``seed`` and ``epoch`` are folded into one 32-bit key (in Python), then each
    index is mixed with it on its own, so an example's value never depends on the other examples.
    """
    key = 0x9E3779B9
    for word in (seed & _MASK32, (seed & _MASK64) >> 32, epoch & _MASK32, (epoch & _MASK64) >> 32):
        key = _fmix32(key ^ word)
    return _fmix32((index.to(torch.int64) & _MASK32) ^ key)


def sample_augment(augment: Augment, seed: int, index: Tensor, epoch: int) -> AugmentParams:
    """Crop offsets and flips of the examples ``index`` in ``epoch``: a pure function of ``(seed, index, epoch)``.

    From one 32-bit hash ``h`` per example: row offset ``⌊(h mod 2¹⁶)·S / 2¹⁶⌋`` and column offset
    ``⌊(bits 16..30 of h)·S / 2¹⁵⌋`` with ``S = 2·crop_padding + 1``, flip ``= bit 31 of h``: the
    offsets are uniform up to ``S / 2¹⁵`` per value and p(flip) = 1/2. On ``index``'s device.
    """
    span = 2 * augment.crop_padding + 1
    if not 0 <= augment.crop_padding < 1 << 15:
        raise ValueError(f"crop_padding must be in 0 .. 2^15 - 1, got {augment.crop_padding}")
    n, device = len(index), index.device
    h = _hash32(seed, epoch, index) if augment.active else None
    if augment.crop_padding > 0:
        rows = ((h & 0xFFFF) * span) >> 16
        cols = (((h >> 16) & 0x7FFF) * span) >> 15
        offsets = torch.stack([rows, cols], dim=1)
    else:
        offsets = torch.zeros(n, 2, dtype=torch.int64, device=device)
    flip = (h >> 31).bool() if augment.hflip else torch.zeros(n, dtype=torch.bool, device=device)
    return AugmentParams(offsets, flip)


def apply_augment(inputs: Tensor, params: AugmentParams, augment: Augment) -> Tensor:
    """Crop (after zero padding by ``augment.crop_padding``) then mirror each image of an N×C×H×W batch.

    Example ``i`` becomes ``padded[i, :, dy:dy+H, dx:dx+W]`` with ``(dy, dx) = crop_offsets[i]``,
    flipped left-right where ``flip[i]``; the crop is one gather, the flip one ``where``, for any dtype.
    """
    if inputs.dim() != 4:
        raise ValueError(f"crop and flip apply to image batches N×C×H×W, got shape {tuple(inputs.shape)}")
    if len(params) != len(inputs):
        raise ValueError(f"{len(params)} augmentation parameters for a batch of {len(inputs)}")
    n, channels, h, w = inputs.shape
    device = inputs.device
    if augment.crop_padding > 0:
        pad = augment.crop_padding
        padded = F.pad(inputs, (pad, pad, pad, pad))
        offsets = params.crop_offsets.to(device)
        rows = (offsets[:, 0, None] + torch.arange(h, device=device))[:, None, :, None]  # N×1×H×1
        cols = (offsets[:, 1, None] + torch.arange(w, device=device))[:, None, None, :]  # N×1×1×W
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(channels, device=device)[None, :, None, None]
        inputs = padded[batch, channel, rows, cols]
    if augment.hflip:
        inputs = torch.where(params.flip.to(device)[:, None, None, None], inputs.flip(-1), inputs)
    return inputs


def augment_batch(images: Tensor, augment: Augment, generator: torch.Generator) -> Tensor:
    """Crop and flip a batch with parameters drawn from the CPU ``generator`` (an order-dependent draw;
    the loader uses the replayable :func:`sample_augment` instead)."""
    n = len(images)
    offsets = torch.randint(0, 2 * augment.crop_padding + 1, (n, 2), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return apply_augment(images, AugmentParams(offsets, flip), augment)


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for key in keys:  # a simple, stable mix of the keys into one 63-bit seed
        seed = (seed * 6364136223846793005 + key + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(seed)


class BatchLoader:
    """Batches of an :class:`InMemoryDataset` of any sample shape, normalised (and augmented) on ``device``.

    Iterate with :meth:`epoch` (``for batch in loader.epoch(3)``); ``len(loader)`` is the number of
    batches per epoch on this rank. Augmentation (``augment``) is for images (N×C×H×W) only and is
    applied when ``shuffle`` is on (training); ``augment_seed`` defaults to ``seed``;
    ``augment_epochs`` (None: never) makes the views repeat with that period: epoch e is augmented as
    epoch ``e mod augment_epochs`` (the shuffle still follows e).
    ``keep_normalised=True`` normalises the whole set once (4 bytes per value held) for sets read
    many times without augmentation, such as a test set; its batches are views of that copy, so a
    model must not write into its input in place.
    """

    def __init__(
        self,
        dataset: InMemoryDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augment = Augment(),
        seed: int = 0,
        augment_seed: int | None = None,
        augment_epochs: int | None = None,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        keep_normalised: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if augment.active and len(dataset.sample_shape) != 3:
            raise ValueError(
                f"augmentation (crop_padding={augment.crop_padding}, hflip={augment.hflip}) is for images "
                f"(samples C×H×W); these samples have shape {dataset.sample_shape}: turn augmentation off"
            )
        if augment_epochs is not None and augment_epochs < 1:
            raise ValueError(f"augment_epochs must be >= 1 (or None: views never repeat), got {augment_epochs}")
        if keep_normalised and augment.active and shuffle:
            raise ValueError("keep_normalised serves fixed normalised images; it cannot be combined with augmentation")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.augment_seed = seed if augment_seed is None else augment_seed
        self.augment_epochs = augment_epochs
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.inputs = dataset.inputs.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self._per_channel = dataset.normalisation.per_channel(len(dataset.sample_shape), self.device)
        # For a set read many times unchanged (a test set evaluated every epoch): normalise it once,
        # 4 bytes per value, and serve batches as views of that copy instead of converting each time.
        self._normalised = self._normalise(self.inputs) if keep_normalised else None
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
            yield self._make_batch(index, epoch, rows if in_order else None)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def view_epoch(self, epoch: int) -> int:
        """The epoch whose augmentation ``epoch`` shows: ``epoch mod augment_epochs`` (``epoch`` when None)."""
        return epoch if self.augment_epochs is None else epoch % self.augment_epochs

    def batch_of(self, index: Tensor, epoch: int) -> Batch:
        """The examples ``index`` (dataset indices, any order) as ``epoch`` presents them: normalised,
        and augmented as in that epoch when this loader augments (a pure function of the indices and
        the epoch, whatever the batch they fall in)."""
        index = index.to(device=self.device, dtype=torch.int64)
        if len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(self.dataset):
            raise IndexError(f"batch_of: indices must lie in 0 .. {len(self.dataset) - 1}, got "
                             f"{int(index.min())} .. {int(index.max())}")
        return self._make_batch(index, epoch)

    def _normalise(self, raw: Tensor) -> Tensor:
        return normalise(raw, self.dataset.normalisation, self._per_channel)

    def _make_batch(self, index: Tensor, epoch: int, rows: slice | None = None) -> Batch:
        labels = self.labels[rows] if rows is not None else self.labels[index]
        if self._normalised is not None:  # a view when in order; the model must not write into its input
            return Batch(self._normalised[rows] if rows is not None else self._normalised[index], labels, index)
        raw = self.inputs[rows] if rows is not None else self.inputs[index]  # in the dataset's own dtype
        if not (self.augment.active and self.shuffle):
            return Batch(self._normalise(raw), labels, index)
        # Crop and flip only move values (padding is 0), so they run on the raw values, before normalising.
        params = sample_augment(self.augment, self.augment_seed, index, self.view_epoch(epoch))
        return Batch(self._normalise(apply_augment(raw, params, self.augment)), labels, index, params)
