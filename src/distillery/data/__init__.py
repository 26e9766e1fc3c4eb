"""Data: the idx reader, built-in datasets held in memory, and the batch loader."""

from distillery.data.datasets import (
    DatasetNotFoundError,
    ImageDataset,
    from_torch_dataset,
    load_idx_dataset,
)
from distillery.data.idx import IdxFormatError, read_idx
from distillery.data.loader import Augment, Batch, BatchLoader, augment_batch

__all__ = [
    "Augment",
    "Batch",
    "BatchLoader",
    "DatasetNotFoundError",
    "IdxFormatError",
    "ImageDataset",
    "augment_batch",
    "from_torch_dataset",
    "load_idx_dataset",
    "read_idx",
]
