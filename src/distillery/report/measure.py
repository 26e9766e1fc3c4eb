"""Deployment measurements of a network: parameters, size on disk, CPU latency and throughput."""

from __future__ import annotations

import io
import statistics
import time

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict`` saved with ``torch.save`` (what a deployment ships)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.inference_mode()
def latency_ms(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 1, repeats: int = 100,
               warmup: int = 10, device: torch.device | str = "cpu") -> float:
    """Median wall time of one forward pass at ``batch_size``, in milliseconds (eval mode)."""
    model = model.to(device).eval()
    x = torch.randn(batch_size, *input_shape, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def throughput(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 256, repeats: int = 10,
               device: torch.device | str = "cpu") -> float:
    """Images per second of forward passes at ``batch_size`` (from the median batch time)."""
    ms = latency_ms(model, input_shape, batch_size=batch_size, repeats=repeats, warmup=2, device=device)
    return batch_size / (ms / 1000)
