"""Evaluation: accuracy and loss of a network, or of an ensemble, on a test set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.data import BatchLoader, ImageDataset
from distillery.losses import ensemble_probs
from distillery.train.distributed import DistContext


@torch.inference_mode()
def evaluate(model: nn.Module, data: ImageDataset | BatchLoader, batch_size: int = 1000,
             device: torch.device | str | None = None, dist: DistContext | None = None) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``data`` (in eval mode).

    With ``dist``, ``data`` is this rank's shard of the test set (see :func:`shard`): the sums and
    counts are added over ranks, so every rank returns the metrics of the whole test set.
    """
    if isinstance(data, ImageDataset):
        device = device or next(model.parameters()).device
        data = BatchLoader(data, batch_size, device=device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=data.device, dtype=torch.float64)  # kept on the device: no sync per batch
    hits = torch.zeros((), device=data.device, dtype=torch.long)
    count = 0
    for batch in data.epoch(0):
        logits = model(batch.inputs).float()
        loss_sum += F.cross_entropy(logits, batch.targets, reduction="sum")
        hits += (logits.argmax(-1) == batch.targets).sum()
        count += len(batch.targets)
    model.train(was_training)
    sums = torch.stack([loss_sum, hits.double(), torch.tensor(float(count), dtype=torch.float64,
                                                                  device=data.device)])
    if dist is not None:
        dist.all_reduce_sum(sums)
    loss, correct, n = sums.tolist()
    return {"accuracy": correct / n, "loss": loss / n}


def shard(data: ImageDataset, dist: DistContext) -> ImageDataset:
    """This rank's share of an evaluation set: examples rank, rank + world_size, ... (no padding,
    so no example is counted twice when the sums are added over ranks)."""
    if not dist.enabled:
        return data
    if len(data) < dist.world_size:
        raise ValueError(f"the test set has {len(data)} examples, fewer than the {dist.world_size} ranks")
    return data.take(torch.arange(dist.rank, len(data), dist.world_size))


@torch.no_grad()
def check_output_classes(model: nn.Module, example: Tensor, num_classes: int, label: str) -> None:
    """The trained network needs an output per class of the data (cross-entropy would fail obscurely)."""
    was_training = model.training
    model.eval()
    outputs = model(example[:2]).shape[-1]
    model.train(was_training)
    if outputs < num_classes:
        raise ValueError(f"[{label}] the network outputs {outputs} classes but the data has {num_classes} classes; "
                         "build it for the dataset's classes")


@torch.no_grad()
def evaluate_ensemble(models: Sequence[nn.Module], data: ImageDataset | BatchLoader, batch_size: int = 1000,
                      device: torch.device | str | None = None) -> dict[str, Any]:
    """Accuracy and loss of the ensemble that averages its members' probabilities, and of each member.

    The ensemble predicts p = (1/M) Σ_m softmax(z_m) (:func:`distillery.losses.ensemble_probs` at
    T = 1); its loss is the mean −log p_y. Returns ``{"ensemble": {...}, "members": [{...}, ...]}``,
    each with ``accuracy`` and ``loss``. Reports use this for every ensemble figure.
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    if isinstance(data, ImageDataset):
        device = device or next(models[0].parameters()).device
        data = BatchLoader(data, batch_size, device=device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    n_models = len(models)
    loss = torch.zeros(n_models + 1, device=data.device)
    correct = torch.zeros(n_models + 1, device=data.device, dtype=torch.long)
    for batch in data.epoch(0):
        logits = torch.stack([m(batch.inputs).float() for m in models])  # M×N×K
        probs = torch.cat([torch.softmax(logits, -1), ensemble_probs(logits).unsqueeze(0)])  # (M+1)×N×K
        p_true = probs.gather(-1, batch.targets.view(1, -1, 1).expand(n_models + 1, -1, 1)).squeeze(-1)
        loss += -torch.log(p_true.clamp_min(1e-12)).sum(-1)
        correct += (probs.argmax(-1) == batch.targets).sum(-1)
    for m, mode in zip(models, modes):
        m.train(mode)
    n = len(data.order(0))
    rows = [{"accuracy": correct[i].item() / n, "loss": loss[i].item() / n} for i in range(n_models + 1)]
    return {"ensemble": rows[-1], "members": rows[:-1]}
