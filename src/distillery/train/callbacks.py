"""Trainer callbacks: what happens around the steps without being the training itself.

The :class:`~distillery.train.Trainer` calls every callback at a stage's start and end, before and
after each step, and after each epoch's evaluation. The progress display, the metrics file and the
weight snapshots are callbacks; so are ``distillery bench``'s step clocks. Write your own by
subclassing :class:`Callback` and passing it in ``Trainer(..., callbacks=[...])``; the events
carry the trainer, so a callback may read (not change) the student and the run folder.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from distillery.train.state import EpochRecord, EpochSums


@dataclass(frozen=True)
class StageEvent:
    """A stage (0-based ``stage`` of ``stages``) of ``epochs`` epochs of ``steps`` steps each, run by
    ``trainer`` (the :class:`~distillery.train.Trainer`; typed loosely so this module stays below it)."""

    trainer: Any
    stage: int
    stages: int
    method: str
    epochs: int
    steps: int


@dataclass(frozen=True)
class StepEvent:
    """Step ``step`` (0-based) of epoch ``epoch`` (0-based); ``sums`` are the epoch's so far and
    ``elapsed`` its training seconds so far."""

    stage: StageEvent
    epoch: int
    step: int
    sums: EpochSums
    elapsed: float


@dataclass(frozen=True)
class EpochEvent:
    """Epoch ``epoch`` (0-based) is trained and evaluated: ``record`` is its line of the history."""

    stage: StageEvent
    epoch: int
    record: EpochRecord


class Callback:
    """Override any of these; each is a no-op by default."""

    def on_stage_start(self, event: StageEvent) -> None: ...

    def on_step_start(self, event: StepEvent) -> None: ...

    def on_step_end(self, event: StepEvent) -> None: ...

    def on_epoch_end(self, event: EpochEvent) -> None: ...

    def on_stage_end(self, event: StageEvent) -> None: ...


class ProgressDisplay(Callback):
    """One line per epoch through ``echo``; with ``live``, also a progress bar on a terminal, or
    elsewhere (a log file, a pipe) a plain line every ``every_s`` seconds inside an epoch."""

    def __init__(self, label: str, echo: Callable[[str], None], *, live: bool = True,
                 stream: IO[str] | None = None, every_s: float = 30.0) -> None:
        self.label, self.echo = label, echo
        self.every_s = every_s if live else float("inf")
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = live and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar: tqdm | None = None
        self._last_line = 0.0

    def _where(self, event: StepEvent) -> str:
        s = event.stage
        return (f"[{self.label}] stage {s.stage + 1}/{s.stages} ({s.method}) epoch {event.epoch + 1}/{s.epochs}")

    def on_step_start(self, event: StepEvent) -> None:
        if self.interactive and self._bar is None:
            self._bar = tqdm(total=event.stage.steps, initial=event.step, leave=False, unit="batch",
                             desc=self._where(event), file=self.stream)
        elif not self.interactive and event.step == 0:
            self._last_line = time.monotonic()

    def on_step_end(self, event: StepEvent) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if (event.step + 1) % 20 == 0:
                self._bar.set_postfix(loss=f"{event.sums.mean_loss():.4f}", img_s=f"{_speed(event):.0f}")
            return
        now = time.monotonic()
        if not self.interactive and now - self._last_line >= self.every_s:
            self._last_line = now
            self.echo(f"{self._where(event)}: step {event.step + 1}/{event.stage.steps}  "
                      f"loss {event.sums.mean_loss():.4f}  {_speed(event):.0f} img/s")

    def on_epoch_end(self, event: EpochEvent) -> None:
        self._close_bar()
        r, s = event.record, event.stage
        self.echo(f"[{self.label}] stage {s.stage + 1} ({s.method}) epoch {event.epoch + 1}/{s.epochs}: "
                  f"loss {r['train_loss']:.4f}  test acc {r['test_accuracy']:.4f}  {r['images_per_s']:.0f} img/s")

    def on_stage_end(self, event: StageEvent) -> None:
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _speed(event: StepEvent) -> float:
    return event.sums.examples / max(event.elapsed, 1e-9)


class MetricsFile(Callback):
    """Appends each epoch's record to a JSON-lines file (``metrics.jsonl`` in the run folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_epoch_end(self, event: EpochEvent) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(event.record) + "\n")


class Snapshots(Callback):
    """Keeps the student's weights after the given (possibly fractional) epochs of every stage.

    0.05 is the step nearest 5 % of the first epoch (at least one step); the files
    (:func:`~distillery.train.loop.snapshot_path`) load like a checkpoint.
    """

    def __init__(self, epochs: Sequence[float], save: Callable[[int, float], Any]) -> None:
        self.epochs, self.save = tuple(epochs), save
        self._due: dict[int, float] = {}

    def on_stage_start(self, event: StageEvent) -> None:
        self._due = {max(1, round(e * event.steps)): e for e in self.epochs if e <= event.epochs}

    def on_step_end(self, event: StepEvent) -> None:
        done = event.epoch * event.stage.steps + event.step + 1
        if done in self._due:
            self.save(event.stage.stage, self._due[done])
