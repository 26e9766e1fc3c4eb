"""Step clocks for the benchmark: rows that take one step at a time in turn, and how their steps are timed.

A row runs in its own thread. :class:`TurnTaking` lets only the thread whose turn it is run, the
turn going back and forth along the rows (A B C C B A A B ...), so the two rows of a target
alternate step by step. :class:`StepClock` times each step and passes the turn on;
:class:`ClockedSteps` is the Trainer callback that drives it (the Trainer's public callbacks only),
also reading the teacher's share of each step from the Trainer's cost clock.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from distillery.train.callbacks import Callback, StageEvent, StepEvent

T = TypeVar("T")


def stamp() -> tuple[float, float]:
    """(wall clock, this process's CPU time) now."""
    return time.perf_counter(), time.process_time()


class TurnTaking:
    """Lets rows that run in their own threads take one step at a time, in turn.

    Only the thread whose turn it is runs (the others wait on a condition), so timings are not
    shared between rows; the turn goes back and forth along ``order`` (A B C C B A A B ...), so the
    two rows of a target alternate step by step and neither always runs first.
    """

    def __init__(self, order: Sequence[str]) -> None:
        self._active = list(order)
        self._position, self._direction = 0, 1
        self._condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._active and self._active[self._position] == name)

    def hand_over(self, name: str, finished: bool = False) -> None:
        """Pass the turn on (the caller must hold it); ``finished`` leaves the rotation."""
        with self._condition:
            if finished:
                self._active.remove(name)
                if self._position >= len(self._active):
                    self._position, self._direction = max(0, len(self._active) - 1), -1
            else:
                step = self._position + self._direction
                if not 0 <= step < len(self._active):  # turn around at either end: that row goes again
                    self._direction = -self._direction
                    step = self._position
                self._position = step
            self._condition.notify_all()


class StepClock:
    """Times one row's steps and, with a :class:`TurnTaking`, takes its turns.

    The row's thread must hold the turn when it first calls :meth:`begin`. :meth:`begin` at the
    start of every later step ends the previous step (so a step includes the loop's bookkeeping
    after it), hands the turn over and waits for it to come back; :meth:`pause` ends the running
    step without handing over (an epoch's end: evaluation and set-up are not timed).
    ``teacher_seconds``, when set, reads a running total of teacher seconds: each step's share of
    it is kept in :attr:`teacher_steps`, one per step.
    """

    def __init__(self, name: str = "", turns: TurnTaking | None = None) -> None:
        self.name, self.turns = name, turns
        self.steps: list[tuple[float, float]] = []  # (wall, CPU) seconds of each finished step
        self.teacher_steps: list[float] = []  # the teacher's seconds inside each finished step
        self.teacher_seconds: Callable[[], float] | None = None
        self._start: tuple[float, float] | None = None
        self._teacher_start = 0.0
        self._stepped = False  # this row has taken a step: from then on each begin() first hands the turn over

    def _teacher_now(self) -> float:
        return self.teacher_seconds() if self.teacher_seconds is not None else 0.0

    def begin(self) -> None:
        self.pause()
        if self.turns is not None and self._stepped:
            self.turns.hand_over(self.name)
            self.turns.wait(self.name)
        self._stepped = True
        self._teacher_start = self._teacher_now()
        self._start = stamp()

    def pause(self) -> None:
        if self._start is not None:
            now = stamp()
            self.steps.append((now[0] - self._start[0], now[1] - self._start[1]))
            self.teacher_steps.append(self._teacher_now() - self._teacher_start)
            self._start = None

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield ``batches``, timing each one's processing as a step."""
        for item in batches:
            self.begin()
            yield item
        self.pause()


class ClockedSteps(Callback):
    """Times a Trainer's steps with a :class:`StepClock`: a step runs from its start until the next
    one starts (the loop's bookkeeping included); an epoch's last step ends before its evaluation.
    The teacher's share of each step comes from the trainer's cost clock (``Trainer.clock``)."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_stage_start(self, event: StageEvent) -> None:
        seconds = event.trainer.clock.seconds
        self.clock.teacher_seconds = lambda: seconds["teacher"]

    def on_step_start(self, event: StepEvent) -> None:
        self.clock.begin()

    def on_step_end(self, event: StepEvent) -> None:
        if event.step + 1 == event.stage.steps:
            self.clock.pause()


def typical_of(durations: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Lower-quartile wall time and median CPU time of (wall, cpu) step durations.

    Other processes on a shared CPU only ever slow a step down, so the lower quartile is robust to
    them (on a quiet machine it is close to the median). CPU time counts every thread of this
    process; with one thread it barely depends on the machine's load.
    """
    walls = sorted(d[0] for d in durations)
    cpus = sorted(d[1] for d in durations)
    return walls[(len(walls) - 1) // 4], cpus[(len(cpus) - 1) // 2]


class PeakMemory:
    """Peak resident memory (MB) of this process above its level at :meth:`reset`.

    Linux: ``VmHWM`` of ``/proc/self/status``, reset to the current RSS by writing 5 to
    ``/proc/self/clear_refs``. (``ru_maxrss`` would not do: Linux carries the parent's peak over
    ``exec``, so a child spawned by a big parent starts with the parent's peak.) Elsewhere:
    the rise of ``ru_maxrss``, which is 0 when the row stays under the start-up peak.
    """

    def __init__(self) -> None:
        self.how = "ru_maxrss"
        self.start = 0.0

    @staticmethod
    def _status_kb(field: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return float(line.split()[1])
        except OSError:
            return None
        return None

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.how, self.start = "VmHWM", self._status_kb("VmRSS") or 0.0
        except OSError:
            self.how, self.start = "ru_maxrss", float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def rise_mb(self) -> float:
        now = self._status_kb("VmHWM") if self.how == "VmHWM" else None
        if now is None:
            now = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return max(0.0, now - self.start) / 1024
