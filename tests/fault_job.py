"""A tiny training run for the fault tests, run in-process or as a subprocess to be signalled or killed.

    python tests/fault_job.py RUN_DIR [--resume] [--slow]

``--slow`` sleeps 20 ms per step (numerics unchanged) so a test can signal it mid-run. Exit code
130 when stopped by SIGINT/SIGTERM (a checkpoint was saved), 0 when finished.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).parent))
from fakes import random_dataset, train_config  # noqa: E402

from distillery.methods.base import ModelOutputs  # noqa: E402
from distillery.methods.cross_entropy import CrossEntropy  # noqa: E402
from distillery.models import create_model  # noqa: E402
from distillery.train import Stage, Trainer, TrainingInterrupted  # noqa: E402


class FaultyCE(CrossEntropy):
    """Cross-entropy that may take 20 ms a step (``slow``) or send its own process a signal at a
    given step (numerics unchanged either way)."""

    def __init__(self, slow: bool = False, signal_at: int | None = None, sig: int = signal.SIGINT) -> None:
        super().__init__()
        self.slow, self.signal_at, self.sig, self.calls = slow, signal_at, sig, 0

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        self.calls += 1
        if self.slow:
            time.sleep(0.02)
        if self.calls == self.signal_at:
            os.kill(os.getpid(), self.sig)
        return super().forward(student, teacher, targets)


def build(run_dir: Path | None, slow: bool = False, signal_at: int | None = None) -> Trainer:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    student = create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=[16], dropout=0.2)
    method = FaultyCE(slow, signal_at)
    # 10 epochs of 10 steps, a checkpoint every 3 steps and at every epoch end; dropout makes the RNG
    # state part of what must be restored.
    stage = Stage(method, train_config(epochs=10, batch_size=16, checkpoint_every_steps=3))
    return Trainer(student, random_dataset(160, seed=1), random_dataset(40, seed=2), [stage], run_dir=run_dir,
                   progress=False, echo=lambda line: None)


if __name__ == "__main__":
    trainer = build(Path(sys.argv[1]), slow="--slow" in sys.argv)
    try:
        trainer.fit(resume="--resume" in sys.argv)
    except TrainingInterrupted:
        sys.exit(130)
