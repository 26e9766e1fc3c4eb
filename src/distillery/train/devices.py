"""Where a run computes: seeding, the device a config names, and the CPU memory layout of conv nets."""

from __future__ import annotations

import torch
from torch import nn

from distillery.train.distributed import rank_device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed torch's CPU and CUDA generators; optionally allow only deterministic kernels."""
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str) -> torch.device:
    """The torch device for a config value, with a clear error when it is not available here.

    Under torchrun, ``cuda`` means this process's GPU, ``cuda:LOCAL_RANK``.
    """
    device = torch.device(rank_device(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine; use device: cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} requested but MPS is not available on this machine; use device: cpu")
    return device


def prefer_channels_last(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Store a convolutional network's 4-D weights channels-last (NHWC) when running on the CPU.

    On CPU, oneDNN's NHWC convolutions are faster for the small networks here (``distillery bench``
    measures it). Networks without ``Conv2d`` are returned unchanged. Converts in place (like
    ``.to``); results agree with the default layout up to float rounding.
    """
    if torch.device(device).type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model
