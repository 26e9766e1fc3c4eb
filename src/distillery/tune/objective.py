"""One trial of ``distillery tune``: the recipe with the trial's values, trained and scored on validation data.

A trial sets the recipe keys of its parameters (:class:`~distillery.tune.space.SearchSpace`) and
trains the distilled student on the training subset less a stratified validation part
(``DataSpec.validation_fraction``); its score is the final validation accuracy. The test split is
never read. The teacher was trained before the search and is named by ``teacher.checkpoint``, so
every trial reads the same network, and, where that is exact, the teacher outputs the first trial
stored in the teacher-output cache.

After each epoch of the last stage the validation accuracy goes to Optuna; when the pruner says
the trial is behind, :class:`PruneOnValidation` raises ``optuna.TrialPruned`` and the trial's run
folder is deleted. A trial whose loss diverges is stopped the same way, and marked. A trial
interrupted by Ctrl-C or SIGTERM keeps its checkpoint: runs are placed by key, so the study's
repeat of the same parameters (:func:`distillery.tune.study.requeue_interrupted`) continues it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from distillery.compare import map_runs
from distillery.config import Value
from distillery.fidelity import teacher_warning
from distillery.recipe import RunConfig, recipe_runs
from distillery.runner import DataStore, Runner, default_folder
from distillery.spec import RunSpec
from distillery.train import Callback, EpochEvent, NonFiniteLossError, TrainingInterrupted, evaluate, resolve_device
from distillery.tune.space import SearchSpace, recipe_with

TRIAL_LABEL = "trial"


class PruneOnValidation(Callback):
    """Reports each epoch's validation accuracy of the run labelled ``label`` to an Optuna trial,
    during its last stage only (a first stage of FitNets or FSP does not train the classifier), and
    stops the run when the trial's pruner says so — but not after the stage's final epoch, when
    the trial is finished anyway. The step is the epoch of that stage, from 1."""

    def __init__(self, trial: optuna.Trial, label: str = TRIAL_LABEL) -> None:
        self.trial, self.label = trial, label

    def on_epoch_end(self, event: EpochEvent) -> None:
        stage = event.stage
        if stage.trainer.label != self.label or stage.stage != stage.stages - 1:
            return
        accuracy = event.record["test_accuracy"]  # the validation part: see DataSpec.validation_fraction
        self.trial.report(accuracy, step=event.epoch + 1)
        if event.epoch + 1 < stage.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {100 * accuracy:.2f} % after epoch {event.epoch + 1}")


def on_validation(spec: RunSpec, fraction: float) -> RunSpec:
    """``spec`` (and its teaching runs) trained on the training subset less ``fraction`` of it, held
    out class by class and evaluated on, and placed by key."""
    return map_runs(spec, lambda s: replace(s, folder=None, data=replace(s.data, validation_fraction=fraction)))


@dataclass
class Objective:
    """The trials of one search: ``raw`` is the recipe (``materialised``, its teacher pinned), the
    trials' runs go under ``<folder>/runs``. Picklable, so each ``--workers`` process gets a copy
    and loads the data once for itself."""

    raw: dict[str, Any]
    space: SearchSpace
    validation_fraction: float
    folder: str
    progress: bool = False

    def __post_init__(self) -> None:
        self._data: DataStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}  # a worker loads its own copy of the data

    def use_data(self, data: DataStore) -> None:
        """Share ``data`` (splits already loaded) with this process's trials."""
        self._data = data

    def config(self, values: Mapping[str, Value]) -> RunConfig:
        """The recipe with these parameter values (as :meth:`SearchSpace.complete` gives them)."""
        return recipe_with(self.raw, self.space.assignments(values), source="tune trial")

    def trial_spec(self, values: Mapping[str, Value]) -> RunSpec:
        """The distilled student of a trial, on the validation split."""
        spec = on_validation(recipe_runs(self.config(values)).distilled, self.validation_fraction)
        return replace(spec, label=TRIAL_LABEL)

    def reference_spec(self) -> RunSpec:
        """The student alone with the recipe's settings, on the validation split (the trials' yardstick)."""
        return on_validation(recipe_runs(self.config({})).alone, self.validation_fraction)

    def runner(self, callbacks: Sequence[Callback] = ()) -> Runner:
        if self._data is None:
            self._data = DataStore()
        return Runner(resume=True, overwrite=True, progress=self.progress, data=self._data,
                      folder_for=default_folder(Path(self.folder)), callbacks=callbacks)

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.trial_spec(self.space.sample(trial))
        runner = self.runner([PruneOnValidation(trial)])
        run_dir = runner.folder(spec)
        trial.set_user_attr("run_dir", str(run_dir))
        try:
            trained = runner.train(spec)
            trial.set_user_attr("cost", trained.cost)  # the teacher's share is summed in the report
            return trained.test_accuracy
        except optuna.TrialPruned:
            _discard(run_dir)
            raise
        except NonFiniteLossError as err:
            trial.set_user_attr("diverged", str(err))
            _discard(run_dir)
            raise optuna.TrialPruned(f"diverged: {err}") from None
        except TrainingInterrupted:
            trial.set_user_attr("interrupted", True)
            raise


def _discard(run_dir: Path) -> None:
    """Delete a stopped trial's run: ``<folder>/runs/<label>-s<seed>-<key>/<label>-s<seed>`` and its parent."""
    shutil.rmtree(run_dir.parent, ignore_errors=True)


@dataclass(frozen=True)
class Reference:
    """What trials are judged against on the validation split: the teacher's and the student
    alone's accuracies (fractions), and any warning about them."""

    teacher: float | None
    alone: float
    warnings: tuple[str, ...]


def measure_reference(objective: Objective, pinned: RunConfig, runner: Runner) -> Reference:
    """Train the student alone on the validation split and score it and the pinned teacher there."""
    alone = runner.train(objective.reference_spec())
    if pinned.teacher.checkpoint is None or not pinned.needs_teacher:
        return Reference(None, alone.test_accuracy, ())
    ref = recipe_runs(pinned).teacher
    train, validation = runner.data.pair(alone.spec.data)
    teacher = runner.teacher_model(ref, train)
    accuracy = evaluate(teacher, validation, pinned.data.eval_batch_size, resolve_device(pinned.device))["accuracy"]
    warning = None if pinned.teaches_itself else teacher_warning(
        accuracy, alone.test_accuracy, "the validation split (the teacher trained on it, so it looks better here "
        "than it is; the confirmation repeats the check on the test split)")
    return Reference(accuracy, alone.test_accuracy, (warning,) if warning else ())
