"""Verified exports: ONNX (dynamic batch axis), safetensors and TorchScript match PyTorch, or are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest
import safetensors.torch
import torch
from torch import nn

from distillery.deploy import ExportMismatchError, export_model, onnx_session, read_safetensors_metadata, verify_export
from distillery.deploy.export import check_outputs
from distillery.models import create_model

SIZE = 8


def tiny(name: str) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"hidden": [16]} if name == "mlp" else {"width": 4, "fc_width": 16}
    return create_model(name, in_channels=1, num_classes=10, input_size=SIZE, **kwargs).eval()


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


class BatchDependent(nn.Module):
    """Adds len(x) to its logits: tracing freezes len(x) at the example's batch size, so the export is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(SIZE * SIZE, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) + len(x)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_onnx_export_runs_in_onnxruntime_and_matches_pytorch_at_several_batch_sizes(tmp_path: Path,
                                                                                     name: str) -> None:
    model = tiny(name)
    result = export_model(model, inputs(2), tmp_path / "m.onnx", "onnx", verify_inputs=inputs(50), max_samples=40)
    assert result.path.is_file() and result.size_bytes == result.path.stat().st_size
    assert result.samples_checked == 40 and result.max_abs_diff <= result.tolerance
    batch_dim = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"  # symbolic, not fixed at the example's 2
    session = onnx_session(result.path, threads=1)
    for n in (1, 5, 17):
        x = inputs(n, seed=n)
        exported = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            expected = model(x)
        assert exported.shape == (n, 10)
        torch.testing.assert_close(exported, expected, atol=1e-4, rtol=0)


def test_tolerance_is_relative_to_the_logit_scale(tmp_path: Path) -> None:
    model = tiny("mlp")
    with torch.no_grad():
        model.classifier.weight.mul_(1000)  # logits in the hundreds
        scale = model(inputs(30)).abs().max().item()
    result = export_model(model, inputs(2), tmp_path / "m.onnx", "onnx", verify_inputs=inputs(30))
    assert scale > 10
    assert result.tolerance == pytest.approx(1e-4 * scale, rel=1e-6)


def test_verification_refuses_an_artefact_that_differs_and_names_where(tmp_path: Path) -> None:
    model = tiny("cnn")
    x = inputs(40)
    path = export_model(model, x[:2], tmp_path / "m.onnx", "onnx").path
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.head[-1].bias[3] += 0.5  # class 3 moves by 0.5 + 0.1 · Σ features: by sample, no ties
        changed.head[-1].weight[3] += 0.1
        diff = (changed(x) - model(x)).abs()
    with pytest.raises(ExportMismatchError) as err:
        verify_export(path, "onnx", changed, x)
    sample, klass = divmod(int(diff.argmax()), 10)
    assert (err.value.sample_index, err.value.class_index) == (sample, klass)
    assert err.value.max_abs_diff == pytest.approx(diff.max().item(), abs=1e-5)
    assert f"sample {sample}, class {klass}" in str(err.value) and "0.5" in str(err.value)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_failed_export_leaves_the_previous_file_and_no_temporary_one(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"m.{fmt}"
    path.write_bytes(b"an earlier verified artefact")
    with pytest.warns(torch.jit.TracerWarning), pytest.raises(ExportMismatchError, match="not written"):
        export_model(BatchDependent(), inputs(2), path, fmt, verify_inputs=inputs(10))
    assert path.read_bytes() == b"an earlier verified artefact"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    model = tiny("cnn")  # BatchNorm buffers must travel too
    model.stage1[0][1].running_mean.uniform_(-1, 1)
    spec = {"name": "cnn", "kwargs": {"width": 4, "fc_width": 16}}
    result = export_model(model, inputs(2), tmp_path / "m.safetensors", "safetensors", verify_inputs=inputs(20),
                          metadata=spec)
    assert result.max_abs_diff == 0.0 and read_safetensors_metadata(result.path) == spec
    fresh = create_model("cnn", in_channels=1, num_classes=10, input_size=SIZE, width=4, fc_width=16).eval()
    safetensors.torch.load_model(fresh, str(result.path), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(inputs(7)), model(inputs(7)), atol=0, rtol=0)


def test_safetensors_verification_reads_the_weights_from_the_file(tmp_path: Path) -> None:
    model = tiny("mlp")
    path = export_model(model, inputs(2), tmp_path / "m.safetensors", "safetensors").path
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.hidden1[0].weight.mul_(2)
    with pytest.raises(ExportMismatchError):  # the file holds the original weights, not the changed model's
        verify_export(path, "safetensors", changed, inputs(10))


def test_torchscript_round_trip(tmp_path: Path) -> None:
    model = tiny("cnn")
    result = export_model(model, inputs(2), tmp_path / "m.pt", "torchscript", verify_inputs=inputs(20))
    with pytest.warns(DeprecationWarning):
        loaded = torch.jit.load(str(result.path))
    with torch.no_grad():
        for n in (1, 9):
            torch.testing.assert_close(loaded(inputs(n)), model(inputs(n)), atol=1e-6, rtol=0)


def test_export_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    model = tiny("cnn").train()
    before = copy.deepcopy(model.state_dict())
    export_model(model, inputs(2), tmp_path / "m.onnx", "onnx", verify_inputs=inputs(10))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_requests_are_refused_with_what_was_expected(tmp_path: Path) -> None:
    model = tiny("mlp")
    with pytest.raises(ValueError, match="onnx, safetensors, torchscript"):
        export_model(model, inputs(2), tmp_path / "m", "pickle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metadata is stored only in safetensors"):
        export_model(model, inputs(2), tmp_path / "m.onnx", "onnx", metadata={"a": 1})
    with pytest.raises(ValueError, match="float32"):
        export_model(model, inputs(2).double(), tmp_path / "m.onnx", "onnx")
    with pytest.raises(ValueError, match=r"per-sample shape \(1, 4, 4\)"):
        export_model(model, inputs(2), tmp_path / "m.onnx", "onnx", verify_inputs=torch.randn(3, 1, 4, 4))
    with pytest.raises(ValueError, match="JSON"):
        export_model(model, inputs(2), tmp_path / "m.safetensors", "safetensors", metadata={"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_a_model_that_does_not_return_logits_is_refused(tmp_path: Path) -> None:
    class TwoOutputs(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.flatten(1), x.flatten(1)

    with pytest.raises(ValueError, match="N×K logits tensor; TwoOutputs returns tuple"):
        export_model(TwoOutputs(), inputs(2), tmp_path / "m.onnx", "onnx")


def test_check_outputs_counts_nan_and_shape_changes_as_mismatches() -> None:
    reference = torch.zeros(4, 3)
    exported = reference.clone()
    exported[2, 1] = float("nan")
    with pytest.raises(ExportMismatchError, match="sample 2, class 1") as err:
        check_outputs(reference, exported, 1e-4, "test")
    assert err.value.max_abs_diff == float("inf")
    with pytest.raises(ExportMismatchError, match=r"shape \(4, 2\)"):
        check_outputs(reference, torch.zeros(4, 2), 1e-4, "test")
    assert check_outputs(reference, reference + 5e-5, 1e-4, "test") == (pytest.approx(5e-5), 1e-4)
