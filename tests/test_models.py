"""The model registry and the built-in architectures."""

from __future__ import annotations

import pytest
import torch

from distillery.models import create_model, list_models
from distillery.report import count_parameters


@pytest.mark.parametrize("depth,params", [(8, 78042), (20, 272474), (56, 855770)])
def test_cifar_resnet_depths_and_sizes(depth: int, params: int) -> None:
    model = create_model(f"resnet{depth}", in_channels=3, num_classes=10)
    # He et al. report 0.27 M parameters for ResNet-20 and 0.85 M for ResNet-56 on CIFAR-10.
    assert count_parameters(model) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    blocks = [n for n, _ in model.named_modules() if n.count(".") == 1 and n.startswith("stage")]
    assert len(blocks) == 3 * (depth - 2) // 6


def test_resnet_options_and_feature_names() -> None:
    model = create_model("resnet14", in_channels=1, num_classes=7, width=2)
    assert model(torch.randn(1, 1, 28, 28)).shape == (1, 7)
    names = dict(model.named_modules())
    assert {"stem", "stage1", "stage2.0.conv1", "stage3", "head"} <= set(names)
    assert names["stage3.0.conv1"].out_channels == 128  # 64 × width 2


def test_mlp_hidden_sizes_and_dropout() -> None:
    model = create_model("mlp", in_channels=1, num_classes=10, hidden=[30, 20], dropout=0.5)
    assert count_parameters(model) == 784 * 30 + 30 + 30 * 20 + 20 + 20 * 10 + 10
    teacher = create_model("mlp_hinton_teacher")
    assert count_parameters(teacher) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
    teacher.train()
    x = torch.randn(4, 1, 28, 28)
    assert not torch.equal(teacher(x), teacher(x))  # dropout active in training
    teacher.eval()
    assert torch.equal(teacher(x), teacher(x))


def test_unknown_model_suggests_names() -> None:
    with pytest.raises(ValueError, match="Did you mean .*resnet20"):
        create_model("resnet2O")
    assert "resnet110" in list_models() and "cnn" in list_models()


def test_user_model_by_import_path() -> None:
    model = create_model("torch.nn:Linear", in_features=4, out_features=2)
    assert isinstance(model, torch.nn.Linear)
    with pytest.raises(ValueError, match="no attribute 'Nope'"):
        create_model("torch.nn:Nope")
    with pytest.raises(ValueError, match="cannot import"):
        create_model("no_such_package_xyz:f")


def test_bad_resnet_depth() -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        create_model("distillery.models.resnet:CifarResNet", depth=10, in_channels=1, num_classes=10)
