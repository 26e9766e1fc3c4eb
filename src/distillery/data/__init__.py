"""Data: in-memory datasets of any sample shape, their sources, and the batch loader."""

from distillery.data.datasets import (
    DatasetNotFoundError,
    ImageDataset,
    InMemoryDataset,
    Normalisation,
    from_torch_dataset,
    load_idx_dataset,
    normalise,
    stratified_split,
)
from distillery.data.idx import IdxFormatError, read_idx
from distillery.data.loader import (
    Augment,
    AugmentParams,
    Batch,
    BatchLoader,
    apply_augment,
    augment_batch,
    sample_augment,
)
from distillery.data.sources import CodeNotAllowedError, DataSource, DataSourceError, load_data

__all__ = [
    "Augment",
    "AugmentParams",
    "Batch",
    "BatchLoader",
    "CodeNotAllowedError",
    "DataSource",
    "DataSourceError",
    "DatasetNotFoundError",
    "IdxFormatError",
    "ImageDataset",
    "InMemoryDataset",
    "Normalisation",
    "apply_augment",
    "augment_batch",
    "from_torch_dataset",
    "load_data",
    "load_idx_dataset",
    "normalise",
    "read_idx",
    "sample_augment",
    "stratified_split",
]
