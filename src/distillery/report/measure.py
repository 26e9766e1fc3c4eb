"""Deployment measurements of a network: parameters, size on disk, CPU latency and throughput.

:func:`time_calls` is the one timer: it runs any zero-argument call (a PyTorch forward pass, an
onnxruntime session run) ``warmup`` times untimed, then ``calls`` times timed, and summarises the
wall times as a :class:`Timing`; :func:`time_model` applies it to a PyTorch model (the deployment
card's speeds, :mod:`distillery.deploy.measure`).
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict`` saved with ``torch.save`` (what a deployment ships)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@dataclass(frozen=True)
class Timing:
    """Wall times of ``calls`` timed calls on batches of ``batch_size``, after ``warmup`` untimed ones.

    ``p90_ms`` is the nearest-rank 90th percentile: the ⌈0.9·calls⌉-th smallest time.
    """

    median_ms: float
    p90_ms: float
    calls: int
    warmup: int
    batch_size: int

    @property
    def images_per_second(self) -> float:
        """Throughput from the median call: batch_size / median time."""
        return self.batch_size / (self.median_ms / 1000)

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_second": self.images_per_second}


def percentile_nearest_rank(values: list[float], fraction: float) -> float:
    """The ⌈fraction·n⌉-th smallest of the n ``values`` (fraction in (0, 1]): a value that was measured."""
    if not values:
        raise ValueError("no values to take a percentile of")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def time_calls(call: Callable[[], object], *, calls: int, warmup: int, batch_size: int,
               sync: Callable[[], None] = lambda: None) -> Timing:
    """Time ``call``: ``warmup`` untimed runs, then ``calls`` timed ones (``sync`` after each, e.g. CUDA)."""
    if calls < 1 or warmup < 0:
        raise ValueError(f"need calls >= 1 and warmup >= 0, got calls={calls}, warmup={warmup}")
    for _ in range(warmup):
        call()
    sync()
    times_ms = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        sync()
        times_ms.append(1000 * (time.perf_counter() - start))
    return Timing(statistics.median(times_ms), percentile_nearest_rank(times_ms, 0.9), calls, warmup, batch_size)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the previous count after."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.inference_mode()
def time_model(model: nn.Module, inputs: torch.Tensor, *, calls: int, warmup: int) -> Timing:
    """:func:`time_calls` of ``model(inputs)`` (eval mode, on the inputs' device; the mode is restored after)."""
    sync = torch.cuda.synchronize if inputs.device.type == "cuda" else (lambda: None)
    was_training = model.training
    model.eval()
    try:
        return time_calls(lambda: model(inputs), calls=calls, warmup=warmup, batch_size=len(inputs), sync=sync)
    finally:
        model.train(was_training)
