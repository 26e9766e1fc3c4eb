"""int8 quantisation: dynamic (MLP) and static (CNN) keep a float model's accuracy on a separable task."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distillery.deploy import export_model, model_logits, onnx_accuracy, onnx_logits, quantize_onnx, top1_agreement
from distillery.models import create_model

SIZE, CLASSES = 8, 4


def separable_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class is a fixed random ±1 pattern; an input is its class's pattern plus Gaussian noise."""
    patterns = torch.randn(CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).sign()
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return patterns[labels] + 0.8 * torch.randn(n, 1, SIZE, SIZE, generator=g), labels


def trained(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"hidden": [64]} if name == "mlp" else {"width": 8, "fc_width": 32, "dropout": 0.0}
    model = create_model(name, in_channels=1, num_classes=CLASSES, input_size=SIZE, **kwargs)
    x, y = separable_task(512, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        batch = slice(64 * (step % 8), 64 * (step % 8 + 1))
        optimiser.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    folder = tmp_path_factory.mktemp("float")
    test_x, _ = separable_task(64, seed=2)
    out = {}
    for name in ("mlp", "cnn"):
        model = trained(name)
        out[name] = model, export_model(model, test_x[:2], folder / f"{name}.onnx", "onnx", verify_inputs=test_x).path
    return out


@pytest.mark.parametrize(("name", "mode", "int8_op"), [("mlp", "dynamic", "MatMulInteger"),
                                                       ("cnn", "static", "QuantizeLinear")])
def test_int8_keeps_the_float_accuracy(exported: dict, tmp_path: Path, name: str, mode: str, int8_op: str) -> None:
    model, float_path = exported[name]
    test_x, test_y = separable_task(400, seed=3)
    calibration = separable_task(128, seed=4)[0] if mode == "static" else None
    result = quantize_onnx(float_path, tmp_path / "int8.onnx", mode, calibration)
    assert result.mode == mode and int8_op in {n.op_type for n in onnx.load(str(result.path)).graph.node}
    assert result.size_bytes == result.path.stat().st_size < result.source_size_bytes
    float_accuracy = onnx_accuracy(float_path, test_x, test_y, batch_size=100)
    int8_accuracy = onnx_accuracy(result.path, test_x, test_y, batch_size=100)
    assert float_accuracy > 0.9  # the task was learnt, so the comparison means something
    assert abs(int8_accuracy - float_accuracy) <= 0.02
    assert top1_agreement(onnx_logits(float_path, test_x), onnx_logits(result.path, test_x)) >= 0.97
    assert onnx_accuracy(float_path, test_x, test_y) == pytest.approx(
        (model_logits(model, test_x).argmax(-1) == test_y).double().mean().item())


def test_auto_picks_static_when_calibrated_and_per_channel_for_convolutions(exported: dict, tmp_path: Path) -> None:
    calibration = separable_task(64, seed=4)[0]
    mlp_path, cnn_path = exported["mlp"][1], exported["cnn"][1]
    uncalibrated = quantize_onnx(mlp_path, tmp_path / "a.onnx", "auto", None)
    assert (uncalibrated.mode, uncalibrated.per_channel, uncalibrated.calibration_samples) == ("dynamic", False, 0)
    calibrated = quantize_onnx(mlp_path, tmp_path / "b.onnx", "auto", calibration)
    assert (calibrated.mode, calibrated.per_channel, calibrated.calibration_samples) == ("static", False, 64)
    conv = quantize_onnx(cnn_path, tmp_path / "c.onnx", "auto", calibration)
    assert (conv.mode, conv.per_channel) == ("static", True)
    with pytest.raises(ValueError, match="needs calibration inputs.*convolutions"):
        quantize_onnx(cnn_path, tmp_path / "d.onnx", "auto", None)
    assert not (tmp_path / "d.onnx").exists()


def test_bad_quantisation_requests_name_the_problem(exported: dict, tmp_path: Path) -> None:
    cnn_path = exported["cnn"][1]
    with pytest.raises(ValueError, match="expected dynamic, static or auto"):
        quantize_onnx(cnn_path, tmp_path / "x.onnx", "int4")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        quantize_onnx(tmp_path / "missing.onnx", tmp_path / "x.onnx", "dynamic")
    with pytest.raises(ValueError, match="overwrite its float source"):
        quantize_onnx(cnn_path, cnn_path, "dynamic")
    with pytest.raises(ValueError, match=r"per-sample shape \(1, 4, 4\).*takes \(1, 8, 8\)"):
        quantize_onnx(cnn_path, tmp_path / "x.onnx", "static", torch.randn(8, 1, 4, 4))
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        onnx_accuracy(cnn_path, torch.randn(3, 1, SIZE, SIZE), torch.zeros(2, dtype=torch.long))
