"""Training: the loop and its callbacks, evaluation, devices, checkpoints, optimisers and schedules."""

from distillery.train.callbacks import Callback, EpochEvent, StageEvent, StepEvent
from distillery.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from distillery.train.devices import prefer_channels_last, resolve_device, seed_everything
from distillery.train.evaluation import evaluate, evaluate_ensemble
from distillery.train.loop import NonFiniteLossError, Stage, Trainer, TrainingInterrupted
from distillery.train.state import EpochRecord

__all__ = [
    "Callback",
    "CheckpointError",
    "EpochEvent",
    "EpochRecord",
    "NonFiniteLossError",
    "Stage",
    "StageEvent",
    "StepEvent",
    "Trainer",
    "TrainingInterrupted",
    "evaluate",
    "evaluate_ensemble",
    "load_checkpoint",
    "prefer_channels_last",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
]
