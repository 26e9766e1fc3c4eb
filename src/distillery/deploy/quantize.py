"""Post-training int8 quantisation of an exported ONNX classifier (onnxruntime.quantization).

Both schemes map a float x to q(x) = clamp(round(x / s) + z, −128, 127), with scale s and zero point z:

* ``static``: activation scales are fixed from the ranges (min/max) seen on calibration inputs,
  and the graph carries QuantizeLinear/DequantizeLinear pairs (QDQ format) that onnxruntime fuses
  into int8 kernels. Convolution weights get one scale per output channel (per filter), others one
  per tensor.
* ``dynamic``: weights are quantised once (int8, per tensor) and each activation's scale is computed
  from its own range at run time: nothing to calibrate, but every matrix product pays for that.
  onnxruntime runs dynamically quantised convolutions far slower than float ones, so
  convolutional nets are quantised statically.

``auto`` is ``static`` when calibration inputs are given; without them, ``dynamic`` for a graph of
matrix products only, and a refusal for a graph with convolutions. The result records the scheme
used. The source is first passed through onnxruntime's pre-processing (shape inference and graph
optimisation), which the quantiser expects. The output is written atomically.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from torch import Tensor

from distillery.deploy.files import file_size
from distillery.fsio import staged_file

QuantizeMode = Literal["dynamic", "static", "auto"]
CALIBRATION_BATCH_SIZE = 64


@dataclass(frozen=True)
class QuantizeResult:
    """An int8 model written to ``path`` from ``source`` with the scheme ``mode``."""

    path: Path
    source: Path
    mode: Literal["dynamic", "static"]
    per_channel: bool
    size_bytes: int
    source_size_bytes: int
    calibration_samples: int

    @property
    def size_ratio(self) -> float:
        """How many times smaller the int8 file is than the float one."""
        return self.source_size_bytes / self.size_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "source": str(self.source), "size_ratio": self.size_ratio}


class TensorCalibrationReader(CalibrationDataReader):
    """Feeds ``inputs`` to onnxruntime's calibrator as the graph input ``input_name``, in batches."""

    def __init__(self, input_name: str, inputs: Tensor, batch_size: int = CALIBRATION_BATCH_SIZE) -> None:
        array = np.ascontiguousarray(inputs.detach().cpu().float().numpy())
        self._batches = iter([{input_name: array[i:i + batch_size]} for i in range(0, len(array), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_onnx(src: str | Path, dst: str | Path, mode: QuantizeMode = "auto",
                  calibration: Tensor | None = None, *, per_channel: bool | None = None) -> QuantizeResult:
    """Quantise the float ONNX model ``src`` to int8 at ``dst`` (the modes: see the module docstring).

    ``calibration``: a sample of training inputs (N×…, float, normalised as the model expects),
    required by ``static``; a few hundred fix the activation ranges. ``per_channel`` (static only):
    per-output-channel weight scales; default: when the graph has convolutions.
    """
    src, dst = Path(src), Path(dst)
    if mode not in ("dynamic", "static", "auto"):
        raise ValueError(f"unknown quantisation mode {mode!r}; expected dynamic, static or auto")
    if not src.is_file():
        raise FileNotFoundError(f"no ONNX model to quantise at {src}")
    if dst.resolve() == src.resolve():
        raise ValueError(f"the int8 model would overwrite its float source {src}; give another destination")
    graph = onnx.load(str(src)).graph
    calibrated = calibration is not None and len(calibration) > 0
    chosen = mode if mode != "auto" else ("static" if calibrated or has_convolution(graph) else "dynamic")
    if chosen == "static" and not calibrated:
        reason = " (its graph has convolutions, which run slowly quantised dynamically)" if mode == "auto" else ""
        raise ValueError(f"static quantisation of {src} needs calibration inputs, a sample of training inputs{reason}")
    static = chosen == "static"
    if static:
        _check_calibration_shape(graph, calibration, src)
    per_channel = has_convolution(graph) if per_channel is None else per_channel
    with tempfile.TemporaryDirectory() as work, staged_file(dst) as tmp:
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(src), str(prepared))
        if chosen == "dynamic":
            quantize_dynamic(str(prepared), str(tmp), weight_type=QuantType.QInt8)
        else:
            reader = TensorCalibrationReader(graph.input[0].name, calibration)
            quantize_static(str(prepared), str(tmp), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        onnx.checker.check_model(str(tmp))
    return QuantizeResult(dst, src, chosen, per_channel and static, file_size(dst), file_size(src),
                          len(calibration) if static else 0)


def has_convolution(graph: onnx.GraphProto) -> bool:
    """Whether the ONNX graph holds a convolution (the case for static quantisation)."""
    return any(node.op_type in ("Conv", "ConvTranspose") for node in graph.node)


def _check_calibration_shape(graph: onnx.GraphProto, calibration: Tensor, src: Path) -> None:
    dims = graph.input[0].type.tensor_type.shape.dim[1:]
    expected = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    got = tuple(calibration.shape[1:])
    if len(expected) != len(got) or any(e is not None and e != g for e, g in zip(expected, got)):
        raise ValueError(f"calibration inputs have per-sample shape {got}; {src} takes {expected}")
