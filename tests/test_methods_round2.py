"""Round-2 method options: logit standardisation on the soft-target methods, and feature methods on 1-D maps."""

from __future__ import annotations

import torch
from torch import nn

from distillery import Stage, Teacher, TrainConfig, Trainer, create_method
from distillery.data import InMemoryDataset, Normalisation
from distillery.losses import kd_loss, standardize_logits
from distillery.teacher import ModelOutputs


def test_standardize_compares_z_scored_logits_and_ignores_the_teachers_scale() -> None:
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    method = create_method("hinton", temperature=2.0, kd_weight=0.5, ce_weight=0.5, standardize=True)
    terms = method(ModelOutputs(z_s), ModelOutputs(z_t), y)
    expected = 0.5 * kd_loss(standardize_logits(z_s), standardize_logits(z_t), 2.0)
    torch.testing.assert_close(terms["kd"], expected)
    shifted = method(ModelOutputs(z_s), ModelOutputs(3.0 * z_t + 7.0), y)
    torch.testing.assert_close(shifted["kd"], terms["kd"], rtol=1e-4, atol=1e-6)
    plain = create_method("hinton", temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    assert not torch.allclose(plain(ModelOutputs(z_s), ModelOutputs(3.0 * z_t), y)["kd"],
                              plain(ModelOutputs(z_s), ModelOutputs(z_t), y)["kd"])


def test_every_soft_target_method_offers_standardize() -> None:
    for name in ("hinton", "ensemble", "tfkd_self", "dkd"):
        assert "standardize" in create_method(name).Params.model_fields, name


class Net1d(nn.Module):
    """A small 1-D convolutional net on N×1×L signals with named stages."""

    def __init__(self, width: int, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(1, 8, 3, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv1d(8, width, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stage1(self.stem(x)))


def _signals(n: int = 64, length: int = 32) -> InMemoryDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (n,), generator=g)
    t = torch.linspace(0, 6.28, length)
    inputs = torch.sin(t * (labels[:, None] + 1)).unsqueeze(1) + 0.1 * torch.randn(n, 1, length, generator=g)
    return InMemoryDataset(inputs, labels, Normalisation.none(), 3)


def test_fsp_and_fitnets_run_end_to_end_on_1d_convolutional_nets() -> None:
    data = _signals()
    train = TrainConfig(epochs=1, batch_size=16, optimizer={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0})
    for method in (create_method("fsp", pairs=[("stem", "stage1")]),
                   create_method("fitnets", student_layer="stage1", teacher_layer="stage1")):
        teacher = Teacher(Net1d(width=8))
        history = Trainer(Net1d(width=8), data, data, [Stage(method, train)], teacher=teacher, progress=False).fit()
        assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["train_loss"]))
    regressor = create_method("fitnets", student_layer="stage1", teacher_layer="stage1")
    regressor.setup(Net1d(width=4), Teacher(Net1d(width=8)), data.inputs[:4])
    assert isinstance(regressor.regressor, nn.Conv1d) and regressor.regressor.out_channels == 8


def test_hintons_learnable_temperature_is_trained_against_the_student() -> None:
    torch.manual_seed(0)
    z_s, z_t, y = torch.randn(8, 5, requires_grad=True), torch.randn(8, 5), torch.randint(0, 5, (8,))
    method = create_method("hinton", learnable_temperature=True, ctkd_warmup_epochs=2)
    assert [n for n, _ in method.named_parameters()] == ["temperature.theta"]
    method.start_epoch(1, 5)  # halfway through the warm-up: λ = 0.5
    method(ModelOutputs(z_s), ModelOutputs(z_t), y)["kd"].backward()
    reversed_grad = method.temperature.theta.grad.clone()
    # the same loss as a plain function of θ: its true gradient, which the reversal negates and halves
    theta = method.temperature.theta.detach().clone().requires_grad_(True)
    low, high = method.params.ctkd_range
    tau = low + (high - low) * torch.sigmoid(theta)
    (method.params.kd_weight * kd_loss(z_s, z_t, tau)).backward()
    torch.testing.assert_close(reversed_grad, -0.5 * theta.grad)


def test_methods_lists_the_new_logit_methods_and_options() -> None:
    from distillery.methods.catalogue import describe_methods

    text = describe_methods()
    for word in ("dkd:", "dist:", "standardize", "learnable_temperature", "TCKD", "ρ"):
        assert word in text, word


def test_a_preset_starts_from_the_papers_values_and_given_values_win() -> None:
    from distillery.recipe import load_config

    paper = create_method("hinton", preset="paper")
    assert (paper.params.temperature, paper.params.kd_weight, paper.params.ce_weight) == (4.0, 0.9, 0.1)
    assert create_method("hinton", preset="paper", temperature=8.0).params.temperature == 8.0
    config = load_config(None, ["distill.stages.0.method={name: dkd, preset: paper, beta: 2}"])
    assert (config.distill.stages[0].method.beta, config.distill.stages[0].method.warmup_epochs) == (2.0, 20.0)
    import pytest

    from distillery.config import ConfigError

    with pytest.raises(ConfigError, match=r"distill.stages.0.method.preset: method 'hinton' has no preset 'papr'"):
        load_config(None, ["distill.stages.0.method.preset=papr"])
