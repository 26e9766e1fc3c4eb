"""Training: the loop, checkpoints, optimisers and schedules."""

from distillery.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from distillery.train.loop import (
    NonFiniteLossError,
    Stage,
    Trainer,
    TrainingInterrupted,
    evaluate,
    evaluate_ensemble,
    resolve_device,
    seed_everything,
)

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "Stage",
    "Trainer",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_ensemble",
    "load_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
]
