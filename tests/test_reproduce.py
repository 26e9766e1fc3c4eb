"""distillery reproduce: statistics, report, run reuse, and each experiment end to end on tiny data.

Also the Trainer hook the reproductions added (weight snapshots at given epochs, for Defective KD).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_idx import one_thread, tiny_dataset  # noqa: F401  (one_thread: an autouse fixture)

from distillery.config import ModelConfig, TrainConfig
from distillery.methods import create_method
from distillery.models.mlp import MLP
from distillery.pipeline import load_trained_model
from distillery.train import Stage, Trainer, load_checkpoint
from distillery.train.loop import snapshot_path

# ------------------------------------------------------------------ Trainer: snapshots at given epochs


def _mlp() -> MLP:
    torch.manual_seed(0)
    return MLP(64, [16], 10)


def _fit(tmp: Path, epochs: int, snapshots: tuple[float, ...]) -> Trainer:
    train = TrainConfig.model_validate({"epochs": epochs, "batch_size": 16, "schedule": {"name": "constant"}})
    trainer = Trainer(_mlp(), tiny_dataset(128), tiny_dataset(32, seed=1), [Stage(create_method("ce"), train)],
                      run_dir=tmp, progress=False, echo=lambda line: None, snapshot_epochs=snapshots)
    trainer.fit()
    return trainer


def test_snapshots_hold_the_weights_reached_at_those_epochs(tmp_path: Path) -> None:
    long = _fit(tmp_path / "long", epochs=2, snapshots=(0.25, 1))
    short = _fit(tmp_path / "short", epochs=1, snapshots=())
    after_one = load_checkpoint(snapshot_path(tmp_path / "long", 1))["student"]
    quarter = load_checkpoint(snapshot_path(tmp_path / "long", 0.25))["student"]
    # Batches depend only on (seed, epoch, step) and the lr is constant: the 2-epoch run after its
    # first epoch is exactly the 1-epoch run.
    for name, value in short.student.state_dict().items():
        assert torch.equal(after_one[name], value), name
    final = long.student.state_dict()
    assert not torch.equal(quarter["classifier.weight"], after_one["classifier.weight"])
    assert not torch.equal(after_one["classifier.weight"], final["classifier.weight"])
    # A snapshot loads like a checkpoint, with the model given.
    spec = ModelConfig(name="mlp", kwargs={"hidden": [16]})
    model, _ = load_trained_model(snapshot_path(tmp_path / "long", 0.25), spec, tiny_dataset(8))
    assert torch.equal(model.state_dict()["classifier.weight"], quarter["classifier.weight"])


@pytest.mark.parametrize("bad", [0.0, -1.0, 3.0])
def test_snapshot_epochs_outside_the_run_are_refused(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match=r"snapshot_epochs must lie in \(0, 2\]"):
        _fit(tmp_path, epochs=2, snapshots=(bad,))
