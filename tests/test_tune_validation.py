"""The validation split tune's trials train and score on: DataSpec.validation_fraction and DataStore.pair."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_idx import write_tiny_fmnist

from distillery.runner import DataStore
from distillery.spec import DataSpec


class CountingStore(DataStore):
    """A DataStore that counts how often each split is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = {"train": 0, "test": 0}

    def split(self, spec: DataSpec, name: str):
        self.reads[name] += 1
        return super().split(spec, name)


def test_validation_fraction_off_keeps_the_keys_of_existing_runs() -> None:
    assert "validation_fraction" not in DataSpec().as_dict()
    assert DataSpec(validation_fraction=0.1).as_dict()["validation_fraction"] == 0.1
    with pytest.raises(ValueError, match="validation_fraction must lie in"):
        DataSpec(validation_fraction=1.0)


def test_pair_holds_out_a_stratified_part_and_never_reads_the_test_split(tmp_path: Path) -> None:
    root = write_tiny_fmnist(tmp_path / "data", n_train=200, n_test=50)
    store = CountingStore()
    spec = DataSpec(root=str(root), train_size=150, split_seed=3, validation_fraction=0.2)
    train, held = store.pair(spec)
    assert store.reads["test"] == 0
    assert (len(train), len(held)) == (120, 30)
    whole = store.train_val(DataSpec(root=str(root), train_size=150, split_seed=3))[0]
    rows = lambda d: {tuple(x.flatten().tolist()) for x in d.inputs}  # noqa: E731
    assert rows(train) | rows(held) == rows(whole) and not rows(train) & rows(held)
    counts = torch.bincount(whole.labels, minlength=10).double()
    assert torch.all((torch.bincount(held.labels, minlength=10) - 0.2 * counts).abs() <= 1)  # class by class
    plain_train, test = store.pair(DataSpec(root=str(root), train_size=150, split_seed=3))
    assert store.reads["test"] == 1 and len(plain_train) == 150 and len(test) == 50
