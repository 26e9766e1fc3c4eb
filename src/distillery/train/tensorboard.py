"""TensorBoard logging: a :class:`~distillery.train.Callback` that writes each epoch's record as scalars.

    from distillery.train.tensorboard import TensorBoardLogger

    Trainer(student, train_data, test_data, stages, callbacks=[TensorBoardLogger("runs/tb/student")]).fit()
    # then: tensorboard --logdir runs/tb

Every number of an epoch's :class:`~distillery.train.EpochRecord` becomes one scalar, tagged by
where it was measured (:func:`scalar_tags`):

- ``train/loss`` (the sum of the weighted loss terms), ``train/<term>`` for each term the method
  returns (``train/ce``, ``train/kd``, ``train/hint``, ...) and ``train/accuracy``;
- ``test/accuracy`` and ``test/loss`` (cross-entropy on the test set after the epoch);
- ``lr`` (the first parameter group's learning rate at the epoch's end);
- ``speed/images_per_s`` and ``speed/seconds`` (training only, evaluation excluded).

Accuracies are fractions, as in the record. The x-axis step is the epoch counted over all stages
(the first epoch of stage 2 follows the last of stage 1), so the stages of a run read as one curve
and a resumed run continues where it stopped. Under torchrun only the main process writes. The
event file is flushed after every epoch and closed when the last stage ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from distillery.train.callbacks import Callback, EpochEvent, StageEvent
from distillery.train.state import EpochRecord

# Record keys that place the epoch (the x-axis) or name the method rather than measure it.
_NOT_SCALARS = ("stage", "epoch", "method")
_SPEED_KEYS = ("images_per_s", "seconds")


def scalar_tags(record: EpochRecord | dict[str, Any]) -> dict[str, float]:
    """The record's numbers by TensorBoard tag: ``train_<x>`` → ``train/<x>``, ``test_<x>`` →
    ``test/<x>``, ``images_per_s`` and ``seconds`` → ``speed/...``, anything else under its own name."""
    tags: dict[str, float] = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        prefix, _, rest = key.partition("_")
        if prefix in ("train", "test") and rest:
            tag = f"{prefix}/{rest}"
        elif key in _SPEED_KEYS:
            tag = f"speed/{key}"
        else:
            tag = key
        tags[tag] = float(value)
    return tags


def run_epoch(event: EpochEvent) -> int:
    """The epoch's position in the whole run, from 1: the epochs of the earlier stages, plus this one."""
    stages = event.stage.trainer.stages
    return sum(stage.train.epochs for stage in stages[: event.stage.stage]) + event.epoch + 1


class TensorBoardLogger(Callback):
    """Writes each epoch's scalars (see the module docstring) to a TensorBoard event file in ``log_dir``.

    ``log_dir`` is created when the first epoch ends (so a logger made on every rank creates
    nothing on ranks other than 0). One folder per trained network keeps their curves apart in
    TensorBoard: ``tensorboard --logdir`` of their common parent shows each as a run.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer: SummaryWriter | None = None

    def on_epoch_end(self, event: EpochEvent) -> None:
        if not _is_main(event.stage):
            return
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        step = run_epoch(event)
        for tag, value in scalar_tags(event.record).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()

    def on_stage_end(self, event: StageEvent) -> None:
        if event.stage == event.stages - 1:
            self.close()

    def close(self) -> None:
        """Flush and close the event file (a later epoch opens a new one in the same folder)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _is_main(event: StageEvent) -> bool:
    dist = getattr(event.trainer, "dist", None)
    return dist is None or dist.is_main
