"""Measurements of a deployed classifier: speed in PyTorch and onnxruntime, and fidelity to its teacher.

Speed is a :class:`Speed`: latency at batch 1 (median and nearest-rank p90 over ``latency_calls``
timed calls after ``latency_warmup`` untimed ones) and throughput at batch 256 (images per second
from the median of ``throughput_calls`` calls), with a stated thread count: PyTorch runs under
``torch.set_num_threads(threads)``, onnxruntime sessions with ``threads`` intra-op threads
(:func:`~distillery.deploy.runtime.onnx_session`). The timers are those of
:mod:`distillery.report.measure`.

Fidelity compares logits on the same inputs: top-1 agreement (how often the argmaxes are equal) and
mean KL(teacher ‖ model) at temperature 1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch
from torch import Tensor, nn

from distillery.deploy.runtime import batched, onnx_logits, session_call
from distillery.losses import kd_loss
from distillery.report.measure import Timing, time_calls, time_model, torch_threads


@dataclass(frozen=True)
class SpeedSettings:
    """How many calls each speed measurement times, and at which batch sizes."""

    latency_batch: int = 1
    latency_calls: int = 100
    latency_warmup: int = 10
    throughput_batch: int = 256
    throughput_calls: int = 10
    throughput_warmup: int = 2

    def __post_init__(self) -> None:
        for name in ("latency_batch", "latency_calls", "throughput_batch", "throughput_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"SpeedSettings.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("latency_warmup", "throughput_warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"SpeedSettings.{name} must be >= 0, got {getattr(self, name)}")


DEFAULT_SPEED_SETTINGS = SpeedSettings()


@dataclass(frozen=True)
class Speed:
    """Latency (small batch) and throughput (large batch) of one model in one runtime, with its threads."""

    latency: Timing
    throughput: Timing
    threads: int

    @property
    def images_per_second(self) -> float:
        return self.throughput.images_per_second

    def as_dict(self) -> dict:
        return {"latency": self.latency.as_dict(), "throughput": self.throughput.as_dict(), "threads": self.threads}


def timing_batch(inputs: Tensor, size: int) -> Tensor:
    """The first ``size`` rows of ``inputs``, cycling through them again if there are fewer."""
    if len(inputs) == 0:
        raise ValueError("no inputs to time the model on")
    return inputs[torch.arange(size) % len(inputs)].detach().cpu().float().contiguous()


def torch_speed(model: nn.Module, inputs: Tensor, threads: int,
                settings: SpeedSettings = DEFAULT_SPEED_SETTINGS) -> Speed:
    """Speed of ``model`` (on the CPU, eval mode) on batches drawn from ``inputs``, with ``threads`` threads."""
    with torch_threads(threads):
        latency = time_model(model, timing_batch(inputs, settings.latency_batch),
                             calls=settings.latency_calls, warmup=settings.latency_warmup)
        throughput = time_model(model, timing_batch(inputs, settings.throughput_batch),
                                calls=settings.throughput_calls, warmup=settings.throughput_warmup)
    return Speed(latency, throughput, threads)


def onnx_speed(session: ort.InferenceSession, inputs: Tensor,
               settings: SpeedSettings = DEFAULT_SPEED_SETTINGS) -> Speed:
    """Speed of an onnxruntime ``session`` on batches drawn from ``inputs`` (its threads: the session's)."""
    run = session_call(session)
    threads = session.get_session_options().intra_op_num_threads

    def time_batch(size: int, calls: int, warmup: int) -> Timing:
        batch = timing_batch(inputs, size)
        return time_calls(lambda: run(batch), calls=calls, warmup=warmup, batch_size=size)

    latency = time_batch(settings.latency_batch, settings.latency_calls, settings.latency_warmup)
    throughput = time_batch(settings.throughput_batch, settings.throughput_calls, settings.throughput_warmup)
    return Speed(latency, throughput, threads)


def top1_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of inputs whose argmax logit is the label: (1/N) Σ_i [argmax z_i = y_i]."""
    if logits.dim() != 2 or len(logits) != len(labels):
        raise ValueError(f"need N×K logits and N labels, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return (logits.argmax(-1) == labels.to(logits.device)).double().mean().item()


def onnx_accuracy(path: str | Path, inputs: Tensor, labels: Tensor, batch_size: int = 256,
                  threads: int | None = None) -> float:
    """Top-1 accuracy of the ONNX classifier at ``path`` on ``inputs``, run by onnxruntime in batches."""
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
    return top1_accuracy(onnx_logits(path, inputs, batch_size, threads), labels.cpu())


def top1_agreement(teacher_logits: Tensor, logits: Tensor) -> float:
    """Fraction of inputs on which the model's argmax equals the teacher's: (1/N) Σ_i [argmax z_i = argmax t_i]."""
    _check_pair(teacher_logits, logits)
    return (teacher_logits.argmax(-1) == logits.argmax(-1)).double().mean().item()


def mean_kl(teacher_logits: Tensor, logits: Tensor) -> float:
    """Mean KL(p_t ‖ p) = (1/N) Σ_i Σ_k p_t,ik (log p_t,ik − log p_ik), with p = softmax at T = 1 (nats)."""
    _check_pair(teacher_logits, logits)
    return kd_loss(logits, teacher_logits, temperature=1.0).item()


def _check_pair(teacher_logits: Tensor, logits: Tensor) -> None:
    if teacher_logits.dim() != 2 or teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher and model logits must both be N×K of one shape, got {tuple(teacher_logits.shape)} "
                         f"and {tuple(logits.shape)}")
    if len(logits) == 0:
        raise ValueError("no logits to compare")


@torch.inference_mode()
def model_logits(model: nn.Module, inputs: Tensor, batch_size: int = 256) -> Tensor:
    """``model``'s logits on ``inputs`` (N×…), in batches, on the CPU in eval mode; ``model`` itself is untouched."""
    network = copy.deepcopy(model).cpu().eval()
    return batched(network, inputs.detach().cpu().float(), [batch_size])
