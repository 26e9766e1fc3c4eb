"""Two-stage training resumed in the middle of stage 2 ends with the weights of an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from tiny_idx import one_thread, tiny_dataset  # noqa: F401  (one_thread: autouse fixture)

from distillery.config import TrainConfig
from distillery.methods import Teacher, create_method
from distillery.models import create_model
from distillery.train import Stage, Trainer, seed_everything


class Killed(RuntimeError):
    pass


def _trainer(run_dir, train, test) -> Trainer:
    seed_everything(0)
    teacher = create_model("resnet8", in_channels=1, num_classes=10, input_size=8)
    student = create_model("resnet8", in_channels=1, num_classes=10, input_size=8)
    stage1 = TrainConfig(epochs=1, batch_size=16, optimizer={"lr": 0.001})
    stage2 = TrainConfig(epochs=2, batch_size=16, optimizer={"lr": 0.05}, checkpoint_every_steps=1,
                         augment={"crop_padding": 1, "hflip": True})
    stages = [Stage(create_method("fitnets"), stage1), Stage(create_method("hinton", temperature=3.0), stage2)]
    return Trainer(student, train, test, stages, teacher=Teacher(teacher), run_dir=run_dir, progress=False,
                   echo=lambda line: None)


def test_resume_within_stage_two_reaches_the_uninterrupted_weights(tmp_path, monkeypatch) -> None:
    train, test = tiny_dataset(64, seed=1), tiny_dataset(32, seed=2)
    reference = _trainer(tmp_path / "whole", train, test)
    reference.fit()

    steps_per_epoch = 64 // 16
    kill_at = steps_per_epoch + steps_per_epoch + 2  # stage 1, then stage 2's first epoch and 2 more steps
    calls = {"n": 0}
    original = Trainer._step

    def step_then_die(self, *args, **kwargs):
        if calls["n"] == kill_at:
            raise Killed("simulated crash")
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_step", step_then_die)
    with pytest.raises(Killed):
        _trainer(tmp_path / "cut", train, test).fit()
    monkeypatch.setattr(Trainer, "_step", original)
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["position"] == {"stage": 1, "epoch": 1, "step": 2}  # mid-epoch, inside stage 2

    resumed = _trainer(tmp_path / "cut", train, test)
    history = resumed.fit(resume=True)
    assert [(r["stage"], r["epoch"]) for r in history] == [(1, 1), (2, 1), (2, 2)]
    for (name, a), b in zip(reference.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(reference.stages[0].method.state_dict().values(), resumed.stages[0].method.state_dict().values()):
        assert torch.equal(a, b)  # the FitNets regressor, trained in stage 1, is restored too
