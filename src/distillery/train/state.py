"""What a run's checkpoint holds, and the running sums of an epoch.

A checkpoint is everything needed to continue a run exactly: the student's and the methods'
weights, where the run stands (:class:`Position`), the history, every RNG state, the sums of the
epoch in progress and, until the run is complete, the optimiser, schedule and loss-scaler states.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch
from torch import Tensor

from distillery.train.distributed import DistContext

RUN_KIND = "distillery-run"
SNAPSHOT_KIND = "distillery-snapshot"


class EpochRecord(TypedDict, total=False):
    """One line of ``metrics.jsonl`` and of :meth:`Trainer.fit`'s history (accuracies are fractions).

    ``stage`` and ``epoch`` count from 1 (``epoch`` within its stage); ``method`` is the stage's
    method name; ``lr`` is the first parameter group's learning rate at the epoch's end;
    ``train_loss`` the mean of the summed, weighted loss terms over the epoch's examples,
    ``train_<term>`` each term's mean (``train_ce``, ``train_kd``, ...: the method's term names);
    ``train_accuracy`` the top-1 accuracy on the training batches as they were trained (augmented,
    in train mode, before each step's update); ``test_accuracy`` / ``test_loss`` (mean
    cross-entropy) on the test set after the epoch; ``val_accuracy`` / ``val_loss`` the same on
    the held-out validation examples, when the run has some (``DataSpec.val_size``), so an epoch can
    be chosen without reading the test split; ``images_per_s`` and ``seconds`` the epoch's
    training speed and time (the steps and any mid-epoch checkpoints, not the evaluation; an epoch
    resumed from a checkpoint includes its seconds before the interruption).
    """

    stage: int
    method: str
    epoch: int
    lr: float
    train_loss: float
    train_accuracy: float
    test_accuracy: float
    test_loss: float
    val_accuracy: float
    val_loss: float
    images_per_s: float
    seconds: float


@dataclass
class Position:
    """Where a run stands: stage, epoch and step (all 0-based), the next step to take."""

    stage: int = 0
    epoch: int = 0
    step: int = 0


@dataclass
class EpochSums:
    """The epoch so far: each loss term summed over examples, the training hits, examples and seconds."""

    terms: dict[str, Tensor] = field(default_factory=dict)
    correct: Tensor | None = None
    examples: int = 0
    seconds: float = 0.0

    def add(self, terms: dict[str, Tensor], logits: Tensor, targets: Tensor) -> None:
        """Add one step's terms (batch means) and hits, without a device sync."""
        n = len(targets)
        for name, value in terms.items():
            if name in self.terms:
                self.terms[name].add_(value.detach(), alpha=n)
            else:
                self.terms[name] = value.detach() * n
        hits = (logits.detach().argmax(-1) == targets).sum()
        self.correct = hits if self.correct is None else self.correct + hits
        self.examples += n

    def mean_loss(self) -> float:
        return sum(v for v in self.terms.values()).item() / max(self.examples, 1)

    def as_state(self) -> dict[str, Any]:
        return {"terms": dict(self.terms), "correct": self.correct, "examples": self.examples,
                "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device, count_here: bool) -> EpochSums:
        """The sums a checkpoint holds; ``count_here`` False (a rank other than 0, whose share is in
        rank 0's saved sums) keeps only the seconds."""
        terms = {k: v.to(device) for k, v in state["terms"].items()}
        if count_here:
            return cls(terms, state["correct"], state["examples"], state["seconds"])
        correct = None if state["correct"] is None else torch.zeros_like(state["correct"])
        return cls({k: torch.zeros_like(v) for k, v in terms.items()}, correct, 0, state["seconds"])


def rng_state(dist: DistContext, device: torch.device) -> dict[str, Any]:
    """Every RNG state of every rank (gathered to all ranks; nccl needs them on the GPU)."""
    rank_rngs = [t.cpu() for t in dist.all_gather(torch.get_rng_state().to(device))]
    return {"cpu": torch.get_rng_state(), "cpu_ranks": rank_rngs,
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng(state: dict[str, Any], dist: DistContext) -> None:
    """Set this rank's RNG states from a checkpoint's (the rank's own CPU stream when saved per rank)."""
    rank_rngs = state.get("cpu_ranks", [])
    own = rank_rngs[dist.rank] if len(rank_rngs) == dist.world_size else state["cpu"]
    torch.set_rng_state(own.cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
