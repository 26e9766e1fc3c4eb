"""Export a trained classifier to ONNX, safetensors or TorchScript, verified before it is reported.

Every export is checked against the PyTorch model it came from: the artefact is loaded back (ONNX
through onnxruntime, safetensors into a fresh copy of the model whose tensors were first set to
NaN, TorchScript through ``torch.jit.load``) and run on sample inputs in batches of several sizes.
The export is accepted when, over every checked sample i and class k,

    max |z_export[i, k] − z_torch[i, k]| ≤ tolerance = rel_tolerance · max(1, max |z_torch|),

i.e. ``rel_tolerance`` (default 1e-4) is relative to the scale of the logits, with an absolute floor
for logits smaller than 1. Otherwise :class:`ExportMismatchError` names the largest difference and
where it is. The file is staged under a temporary name and moved into place only after the check
(:func:`~distillery.fsio.staged_file`), so a failed export leaves no file claiming success.

Only the network itself is exported (``model`` is the student's ``nn.Module``, not a method or a
trainer around it); ``model`` is not modified: a CPU copy in eval mode is exported.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import safetensors.torch
import torch
from safetensors import safe_open
from torch import Tensor, nn

from distillery.deploy.files import file_size
from distillery.deploy.runtime import batched, onnx_session, session_call
from distillery.fsio import staged_file

ExportFormat = Literal["onnx", "safetensors", "torchscript"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)
ONNX_OPSET = 17
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
# Chunk sizes of the verification batches: several, so the ONNX dynamic batch axis is exercised.
VERIFY_BATCH_SIZES = (1, 3, 32, 256)
SAFETENSORS_METADATA_KEY = "distillery"


class ExportMismatchError(RuntimeError):
    """An exported artefact whose outputs differ from the PyTorch model's by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float, sample_index: int, class_index: int,
                 tolerance: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.sample_index = sample_index
        self.class_index = class_index
        self.tolerance = tolerance


@dataclass(frozen=True)
class ExportResult:
    """A verified export: where it is, how large, and how closely it reproduces PyTorch."""

    path: Path
    format: ExportFormat
    size_bytes: int
    max_abs_diff: float
    tolerance: float
    samples_checked: int

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def export_model(model: nn.Module, example: Tensor, path: str | Path, format: ExportFormat, *,
                 verify_inputs: Tensor | None = None, max_samples: int = 1000, rel_tolerance: float = 1e-4,
                 metadata: Mapping[str, Any] | None = None) -> ExportResult:
    """Write ``model`` to ``path`` as ``format``, verified on up to ``max_samples`` of ``verify_inputs``.

    ``example`` is a float32 batch (N×…) of the model's input shape, used to trace the network;
    ``verify_inputs`` are real inputs of the same shape (default: ``example``). ONNX files have a
    dynamic batch axis (input ``input``, output ``logits``, opset ``ONNX_OPSET``). ``metadata``
    (e.g. the model spec) is stored as JSON in the safetensors header (read it back with
    :func:`read_safetensors_metadata`); other formats refuse it. Raises
    :class:`ExportMismatchError` when the check fails; the file is then not written.
    """
    path = Path(path)
    _check_format(format)
    if metadata is not None and format != "safetensors":
        raise ValueError(f"metadata is stored only in safetensors files, not {format}")
    _check_example(example)
    samples = example if verify_inputs is None else verify_inputs
    if samples.shape[1:] != example.shape[1:]:
        raise ValueError(f"verify_inputs have per-sample shape {tuple(samples.shape[1:])}, the example "
                         f"{tuple(example.shape[1:])}")
    network = copy.deepcopy(model).cpu().eval()
    with staged_file(path) as tmp:
        _WRITERS[format](network, example.detach().cpu(), tmp, metadata)
        max_diff, tolerance, checked = verify_export(tmp, format, network, samples, max_samples=max_samples,
                                                     rel_tolerance=rel_tolerance, label=f"to {path} (not written)")
    return ExportResult(path, format, file_size(path), max_diff, tolerance, checked)


def verify_export(path: str | Path, format: ExportFormat, model: nn.Module, inputs: Tensor, *,
                  max_samples: int = 1000, rel_tolerance: float = 1e-4,
                  label: str | None = None) -> tuple[float, float, int]:
    """Check the artefact at ``path`` against ``model`` on the first ``max_samples`` of ``inputs``.

    The inputs run in consecutive batches of the sizes in ``VERIFY_BATCH_SIZES`` (so a dynamic
    batch axis is exercised). Returns (largest |difference|, tolerance, samples checked) or raises
    :class:`ExportMismatchError`. ``label`` names the artefact in messages (default: its path).
    """
    _check_format(format)
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if len(inputs) == 0:
        raise ValueError("no inputs to verify the export on")
    samples = inputs[:max_samples].detach().to("cpu", torch.float32)
    network = copy.deepcopy(model).cpu().eval()
    with torch.inference_mode():
        reference = _reference_logits(network, samples)
        exported = batched(_LOADERS[format](Path(path), network), samples, VERIFY_BATCH_SIZES)
    max_diff, tolerance = check_outputs(reference, exported, rel_tolerance, f"{format} export {label or path}")
    return max_diff, tolerance, len(samples)


def check_outputs(reference: Tensor, exported: Tensor, rel_tolerance: float, what: str) -> tuple[float, float]:
    """(largest |exported − reference|, tolerance) if within ``rel_tolerance · max(1, max |reference|)``.

    Otherwise raises :class:`ExportMismatchError` naming the sample and class of the largest
    difference. A non-finite exported value counts as an infinite difference.
    """
    if exported.shape != reference.shape:
        raise ExportMismatchError(f"{what}: outputs of shape {tuple(exported.shape)}, PyTorch gives "
                                  f"{tuple(reference.shape)}", float("inf"), 0, 0, 0.0)
    reference, exported = reference.double(), exported.double()
    tolerance = rel_tolerance * max(1.0, reference.abs().max().item())
    diff = (exported - reference).abs().nan_to_num(nan=float("inf"), posinf=float("inf"))
    flat_index = int(diff.argmax())
    sample, klass = divmod(flat_index, reference.shape[1])
    largest = diff.flatten()[flat_index].item()
    if largest > tolerance:
        raise ExportMismatchError(
            f"{what}: outputs differ from PyTorch by up to {largest:.3g} at sample {sample}, class {klass} "
            f"(PyTorch {reference[sample, klass].item():.6g}, exported {exported[sample, klass].item():.6g}); "
            f"tolerance {tolerance:.3g} = {rel_tolerance:g} · max(1, max |logit|)",
            largest, sample, klass, tolerance)
    return largest, tolerance


def read_safetensors_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON metadata :func:`export_model` stored in a safetensors file ({} if there is none)."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if SAFETENSORS_METADATA_KEY not in header:
        return {}
    try:
        return json.loads(header[SAFETENSORS_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {SAFETENSORS_METADATA_KEY!r} metadata is not valid JSON: {err}") from None


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")


def _check_example(example: Tensor) -> None:
    if not isinstance(example, Tensor) or example.dim() < 2 or len(example) == 0:
        raise ValueError("example must be a non-empty batch tensor N×… of the model's input")
    if example.dtype != torch.float32:
        raise ValueError(f"example must be float32 (what the exported model takes), got {example.dtype}")


def _reference_logits(network: nn.Module, samples: Tensor) -> Tensor:
    first = network(samples[:1])
    if not isinstance(first, Tensor) or first.dim() != 2:
        raise ValueError(f"exports are of classifiers returning one N×K logits tensor; {type(network).__name__} "
                         f"returns {type(first).__name__}" + (f" of shape {tuple(first.shape)}"
                                                             if isinstance(first, Tensor) else ""))
    logits = batched(network, samples, VERIFY_BATCH_SIZES)
    bad = (~torch.isfinite(logits)).any(-1).nonzero()
    if len(bad):
        raise ValueError(f"the PyTorch model gives non-finite logits for sample {bad[0].item()}: nothing to "
                         "verify an export against")
    return logits


def _write_onnx(network: nn.Module, example: Tensor, path: Path, metadata: Mapping[str, Any] | None) -> None:
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo=True, which needs the
        # onnxscript package; this exporter covers the models here and needs nothing more.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            network, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET, do_constant_folding=True,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
        )


def _write_safetensors(network: nn.Module, example: Tensor, path: Path, metadata: Mapping[str, Any] | None) -> None:
    try:
        header = {SAFETENSORS_METADATA_KEY: json.dumps(dict(metadata or {}), sort_keys=True)}
    except TypeError as err:
        raise ValueError(f"safetensors metadata must be JSON-serialisable: {err}") from None
    safetensors.torch.save_model(network, str(path), metadata=header)  # drops duplicates of tied tensors


def _write_torchscript(network: nn.Module, example: Tensor, path: Path, metadata: Mapping[str, Any] | None) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated upstream (for torch.export); it is still what a TorchScript file is.
        # TracerWarnings (a trace that may not generalise) still show: the check below tests that case.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.trace(network, example, check_trace=False).save(str(path))


def _load_onnx(path: Path, network: nn.Module) -> Callable[[Tensor], Tensor]:
    return session_call(onnx_session(path))


def _load_safetensors(path: Path, network: nn.Module) -> Callable[[Tensor], Tensor]:
    """The file's tensors in a copy of ``network`` whose floating tensors were first set to NaN,
    so any tensor the file fails to restore shows in the check."""
    fresh = copy.deepcopy(network)
    with torch.no_grad():
        for tensor in [*fresh.parameters(), *fresh.buffers()]:
            if tensor.is_floating_point():
                tensor.fill_(float("nan"))
    safetensors.torch.load_model(fresh, str(path), strict=True)
    return fresh.eval()


def _load_torchscript(path: Path, network: nn.Module) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.load(str(path)).eval()


_WRITERS: dict[str, Callable[[nn.Module, Tensor, Path, Mapping[str, Any] | None], None]] = {
    "onnx": _write_onnx, "safetensors": _write_safetensors, "torchscript": _write_torchscript,
}
_LOADERS: dict[str, Callable[[Path, nn.Module], Callable[[Tensor], Tensor]]] = {
    "onnx": _load_onnx, "safetensors": _load_safetensors, "torchscript": _load_torchscript,
}
