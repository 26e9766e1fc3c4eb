"""onnxruntime sessions with a stated thread count, and batched inference through them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor


def onnx_session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session on the ONNX file at ``path`` with ``threads`` intra-op threads (default: torch's count).

    Inter-op parallelism is off (one operator at a time), so ``threads`` is the whole thread budget,
    the same budget PyTorch gets from ``torch.set_num_threads``.
    """
    threads = torch.get_num_threads() if threads is None else threads
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: the default also logs routine optimiser notes
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def session_call(session: ort.InferenceSession) -> Callable[[Tensor], Tensor]:
    """``session`` as a function of one float tensor returning its first output as a tensor."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"expected an ONNX model with one input, got {[i.name for i in inputs]}")
    name = inputs[0].name

    def call(x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {name: array})[0])

    return call


def batched(call: Callable[[Tensor], Tensor], inputs: Tensor, sizes: Sequence[int]) -> Tensor:
    """``call`` over consecutive chunks of ``inputs`` whose sizes cycle through ``sizes``, concatenated.

    Several sizes exercise a dynamic batch axis; one size is ordinary batching.
    """
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {list(sizes)}")
    outputs, start, k = [], 0, 0
    while start < len(inputs):
        stop = min(start + sizes[k % len(sizes)], len(inputs))
        outputs.append(call(inputs[start:stop]))
        start, k = stop, k + 1
    return torch.cat(outputs)


def onnx_logits(path: str | Path, inputs: Tensor, batch_size: int = 256, threads: int | None = None) -> Tensor:
    """The ONNX model's outputs on ``inputs`` (N×…), run in batches of ``batch_size``."""
    return batched(session_call(onnx_session(path, threads)), inputs, [batch_size])

