"""Where a run's time goes: the teacher, the student's step, the data, evaluation; and what the teacher store saved.

:class:`CostClock` is a built-in :class:`~distillery.train.callbacks.Callback` that splits the run's
wall time with one ``perf_counter`` stamp at each boundary (no device synchronisation is added):

    data        from the end of one step to the start of the next (the loader's batch; a mid-epoch checkpoint)
    teacher     the stage teacher's call inside a step (a forward pass, or a stored teacher's look-up)
    student     the rest of the step: the student's forward and backward passes, the optimiser, the loss checks
    evaluation  from an epoch's last step to its record (the test-set evaluation)
    other       from an epoch's record to the next step (checkpoint, the teacher store's self-check, set-up)

The teacher's share comes from :class:`TimedTeacher`, the wrapper the trainer puts around every
stage teacher. On CUDA, kernels run asynchronously: work queued in one segment is counted where
the host next waits for it (the loss check at ``.item()``, the evaluation), so the split is exact on
CPU and indicative on GPUs.

The speed-up of a stored teacher is estimated from the same run: its checks time the live teacher
on one batch per epoch, giving ``s`` seconds per example; with ``n`` examples served and ``t``
seconds of look-ups, the live teacher would have cost ``n · s − t`` more, so

    speed-up = (steps + n · s − t) / steps,   steps = teacher + student + data seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from distillery.cache import CachedTeacher
from distillery.teacher import ModelOutputs, Teacher
from distillery.teacher_store import StoredTeacher
from distillery.train.callbacks import Callback, EpochEvent, StageEvent, StepEvent

KINDS = ("teacher", "student", "data", "evaluation", "other")


class CostClock(Callback):
    """Seconds of this process by kind (module docstring), and the stage teachers it times."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.teachers: list[TimedTeacher] = []
        self._last: float | None = None
        self._in_epoch = False

    def lap(self, kind: str) -> float:
        """Count the time since the previous stamp as ``kind`` and return it (0 at the first stamp)."""
        now = time.perf_counter()
        elapsed = 0.0 if self._last is None else now - self._last
        self.seconds[kind] += elapsed
        self._last = now
        return elapsed

    def timed(self, teacher: Teacher | CachedTeacher | StoredTeacher) -> TimedTeacher:
        """``teacher`` with its calls counted as teacher time (and reported by :meth:`report`)."""
        wrapped = TimedTeacher(teacher, self)
        self.teachers.append(wrapped)
        return wrapped

    def on_stage_start(self, event: StageEvent) -> None:
        self.lap("other")
        self._in_epoch = False

    def on_step_start(self, event: StepEvent) -> None:
        self.lap("data" if self._in_epoch else "other")
        self._in_epoch = True

    def on_step_end(self, event: StepEvent) -> None:
        self.lap("student")

    def on_epoch_end(self, event: EpochEvent) -> None:
        self.lap("evaluation")
        self._in_epoch = False

    def on_stage_end(self, event: StageEvent) -> None:
        self.lap("other")

    def report(self) -> dict[str, Any]:
        """The cost report (JSON-ready): seconds by kind, the teacher stores, the store's speed-up."""
        steps = self.seconds["teacher"] + self.seconds["student"] + self.seconds["data"]
        stores = [t.store_report() for t in self.teachers if isinstance(t.inner, StoredTeacher)]
        saved = [t.estimated_saving() for t in self.teachers if isinstance(t.inner, StoredTeacher)]
        known = [s for s in saved if s is not None]
        speedup = (steps + sum(known)) / steps if known and len(known) == len(saved) and steps > 0 else None
        return {
            "seconds": dict(self.seconds),
            "steps_s": steps,
            "teacher_calls": [t.summary() for t in self.teachers],
            "stores": stores,
            "store_speedup": speedup,
        }


class TimedTeacher:
    """A stage teacher (live, cached or stored) whose calls count as teacher time on ``clock``.

    Called like the teacher; :meth:`start_epoch` lets a stored teacher select (and check) the epoch.
    """

    def __init__(self, inner: Teacher | CachedTeacher | StoredTeacher, clock: CostClock) -> None:
        self.inner = inner
        self.clock = clock
        self.seconds = 0.0
        self.examples = 0

    @property
    def members(self) -> list:
        return self.inner.members

    @property
    def is_ensemble(self) -> bool:
        return self.inner.is_ensemble

    def to(self, device: torch.device | str) -> TimedTeacher:
        self.inner.to(device)
        return self

    def start_epoch(self, epoch: int) -> None:
        """Called by the trainer before each epoch: a stored teacher serves (and checks) that epoch."""
        if isinstance(self.inner, StoredTeacher):
            self.inner.set_epoch(epoch)

    def __call__(self, inputs: Tensor, layers: Sequence[str] = (), index: Tensor | None = None) -> ModelOutputs:
        self.clock.lap("student")
        out = self.inner(inputs, layers, index=index)
        self.seconds += self.clock.lap("teacher")
        self.examples += len(inputs)
        return out

    @property
    def kind(self) -> str:
        return {StoredTeacher: "stored", CachedTeacher: "cached"}.get(type(self.inner), "live")

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "seconds": self.seconds, "examples": self.examples}

    def store_report(self) -> dict[str, Any]:
        assert isinstance(self.inner, StoredTeacher)
        return {**self.inner.report.as_dict(), "served_examples": self.examples, "lookup_s": self.seconds,
                "estimated_saving_s": self.estimated_saving()}

    def estimated_saving(self) -> float | None:
        """Seconds a live teacher would have added over the stored look-ups (None: never timed live)."""
        assert isinstance(self.inner, StoredTeacher)
        report = self.inner.report
        if not report.teacher_forward_examples:
            return None
        per_example = report.teacher_forward_s / report.teacher_forward_examples
        return self.examples * per_example - self.seconds


@dataclass(frozen=True)
class TeacherTime:
    """The teacher's cost summed over many runs (a search's trials, a comparison's runs), from their
    cost reports (:meth:`CostClock.report`, a run's ``cost.json``).

    - ``runs``: runs with a cost report that had a stage teacher;
    - ``live_s`` / ``cached_s`` / ``stored_s``: seconds in the teacher's calls, by kind (forward
      passes; look-ups in the teacher-output cache; look-ups in the teacher store);
    - ``store_build_s``: seconds spent building teacher-store epochs (by whichever run built them);
    - ``saved_s``: the stores' estimated saving, Σ (examples served · live seconds per example −
      look-up seconds), over the stages whose store checks timed the live teacher (``None``: none did).
      A cache look-up's saving is not estimated: the cache is never timed against the live teacher.
    """

    runs: int = 0
    live_s: float = 0.0
    cached_s: float = 0.0
    stored_s: float = 0.0
    store_build_s: float = 0.0
    saved_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One sentence for a report."""
        if not self.runs:
            return "no run called a teacher"
        saved = ("" if self.saved_s is None else
                 f"; the store saved an estimated {self.saved_s:.1f} s of live teacher passes")
        return (f"over {self.runs} distilled run(s): {self.live_s:.1f} s of live teacher passes, "
                f"{self.cached_s:.1f} s of cache look-ups, {self.stored_s:.1f} s of store look-ups and "
                f"{self.store_build_s:.1f} s building the store{saved}")


def teacher_time(costs: Iterable[dict[str, Any] | None]) -> TeacherTime:
    """Sum the teacher's share of the cost reports ``costs`` (``None``: a run without one, skipped)."""
    runs, by_kind, build, saved = 0, dict.fromkeys(("live", "cached", "stored"), 0.0), 0.0, None
    for cost in costs:
        if not cost or not cost.get("teacher_calls"):
            continue
        runs += 1
        for call in cost["teacher_calls"]:
            by_kind[call["kind"]] += call["seconds"]
        for store in cost.get("stores", []):
            build += store.get("build_s", 0.0)
            if store.get("estimated_saving_s") is not None:
                saved = (saved or 0.0) + store["estimated_saving_s"]
    return TeacherTime(runs, by_kind["live"], by_kind["cached"], by_kind["stored"], build, saved)
