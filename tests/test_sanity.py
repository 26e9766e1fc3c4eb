"""The trainer's sanity warnings: a collapsed student, dead layers, a loss that does not fall."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distillery import Stage, TrainConfig, Trainer, create_method
from distillery.data import InMemoryDataset, Normalisation
from distillery.train.sanity import TrainingWarning, dead_layers


def _blobs(n: int = 96) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=g)
    inputs = torch.nn.functional.one_hot(labels, 4).float() * 3 + 0.3 * torch.randn(n, 4, generator=g)
    return InMemoryDataset(inputs, labels, Normalisation.none(), 4)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))


def test_dead_layers_names_the_layers_that_output_only_zeros() -> None:
    net = _mlp()
    assert dead_layers(net, torch.randn(8, 4)) == []
    with torch.no_grad():
        net[0].bias.fill_(-1e3)  # every unit below zero: the ReLU is dead
    assert dead_layers(net, torch.randn(8, 4)) == ["1"]


def test_a_student_with_dead_units_is_reported_by_stage_and_layer() -> None:
    data, net = _blobs(), _mlp()
    with torch.no_grad():
        net[0].bias.fill_(-1e3)  # as a too-large stage-1 step leaves them: every hidden ReLU dead
    train = TrainConfig(epochs=2, batch_size=16, optimizer={"name": "sgd", "lr": 1e-3})
    messages: list[str] = []
    with pytest.warns(TrainingWarning):
        Trainer(net, data, data, [Stage(create_method("ce"), train)], progress=False, echo=messages.append).fit()
    text = "\n".join(messages)
    assert "after stage 1 (ce) the student's layer(s) 1 output only zeros" in text
    assert "at chance level" in text and "lower that stage's learning rate" in text


def test_a_healthy_run_gives_no_warning() -> None:
    import warnings

    data = _blobs()
    good = TrainConfig(epochs=3, batch_size=16, optimizer={"name": "sgd", "lr": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        history = Trainer(_mlp(), data, data, [Stage(create_method("ce"), good)], progress=False).fit()
    assert history[-1]["test_accuracy"] > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitnets_with_an_mlp_student_and_default_settings_does_not_collapse(seed: int) -> None:
    """The case that collapsed to chance when the hint loss was summed over a 128-unit hint."""
    from distillery.methods.features import STAGE1_OPTIMIZER
    from distillery.teacher import Teacher

    data = _blobs(192)
    torch.manual_seed(100 + seed)
    teacher_net = nn.Sequential(nn.Linear(4, 128), nn.ReLU(), nn.Linear(128, 4))
    Trainer(teacher_net, data, data, [Stage(create_method("ce"), TrainConfig(epochs=3, batch_size=32))],
            progress=False, echo=lambda m: None).fit()
    torch.manual_seed(seed)
    student = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))
    stages = [Stage(create_method("fitnets", student_layer="1", teacher_layer="1"),
                    TrainConfig(epochs=2, batch_size=32, optimizer=STAGE1_OPTIMIZER)),
              Stage(create_method("hinton", temperature=3.0), TrainConfig(epochs=3, batch_size=32))]
    history = Trainer(student, data, data, stages, teacher=Teacher(teacher_net), progress=False,
                      echo=lambda m: None).fit()
    assert history[-1]["test_accuracy"] > 0.8  # chance is 0.25
    assert dead_layers(student, data.inputs[:64]) == []
