"""``distillery tune``, the whole command: prepare, search, write best.yaml, confirm, report.

:func:`run_tune` does, in order:

1. resolves the search space and validates the recipe at both ends of every range, so a bad entry
   fails before any training;
2. trains (or reuses, in the recipe's own folder) the teacher and pins it as ``teacher.checkpoint``;
   trains the student alone once on the validation split, and reports both validation accuracies,
   with a warning when the teacher is not clearly ahead (:func:`~distillery.tune.objective.measure_reference`);
3. runs the search (:mod:`distillery.tune.study`) until the study holds ``n_trials`` finished trials;
4. writes best.yaml, the recipe of the best trial, which ``distillery distill --config`` runs as is;
5. confirms: the best recipe and the student alone (with the distilled student's last-stage
   training settings) are trained with ``confirm_seeds`` seeds on the full training split and
   scored on the test split (:func:`distillery.compare.compare_contenders`); when the search also
   set training settings (the learning rate), the student alone with the recipe's own settings too,
   and the verdict is the weaker of the two (:class:`Confirmation`);
6. writes report.md and results.json (:mod:`distillery.tune.report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from distillery.compare import pin_teacher
from distillery.config import ConfigError, TuneConfig, Value, fingerprint
from distillery.recipe import RunConfig, recipe_runs
from distillery.runner import DataStore, Runner, default_folder
from distillery.tune.confirmation import Confirmation, confirm
from distillery.tune.objective import Objective, Reference, measure_reference
from distillery.tune.report import write_best_yaml, write_tune_report
from distillery.tune.space import check_space, materialised, resolve_space, tune_folder
from distillery.tune.study import (
    StudyPlan,
    best_trial,
    delete_study,
    finished_trials,
    open_study,
    requeue_interrupted,
    search_in_processes,
    storage_url,
)


@dataclass
class TuneResult:
    folder: Path
    study: optuna.Study
    best_values: dict[str, Value]
    best_config: RunConfig
    best_yaml: Path
    reference: Reference
    confirmation: Confirmation | None
    report: Path


def run_tune(config: RunConfig, tune: TuneConfig, *, workers: int = 1, overwrite: bool = False,
             progress: bool = True, echo: Callable[[str], None] = print, data: DataStore | None = None) -> TuneResult:
    """``distillery tune``: see the module docstring. ``data`` shares already loaded splits."""
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    started = time.perf_counter()
    space = resolve_space(config, tune)
    check_space(space, materialised(config))
    folder = tune_folder(config, tune)
    folder.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else DataStore()
    runner = Runner(resume=True, overwrite=overwrite, progress=progress, echo=echo, data=data,
                    folder_for=default_folder(folder))
    pinned = pin_teacher(config, recipe_runs(config).teacher.run if config.needs_teacher else None, runner)
    objective = Objective(materialised(pinned), space, tune.validation_fraction, str(folder), progress)
    objective.use_data(data)
    reference = measure_reference(objective, pinned, runner)
    _announce(reference, echo)
    plan = study_plan(pinned, tune, objective, folder)
    if overwrite:
        delete_study(plan)
    study = open_study(plan)
    requeue_interrupted(study)
    echo(f"tune: {len(finished_trials(study))} of {tune.n_trials} trials done; searching "
         f"{', '.join(d.name for d in space.dimensions)}; study in {plan.url}")
    search_in_processes(objective, plan, workers, echo, study)
    best = best_trial(study)
    values = space.complete(best.params)
    best_config = tuned_recipe(objective, values, config.name)
    best_yaml = write_best_yaml(best_config, folder / "best.yaml", best, plan)
    confirmation = confirm(best_config, pinned.student, tune.confirm_seeds, folder, data, overwrite, progress, echo)
    report = write_tune_report(folder, config, space, study, reference, best, confirmation, plan,
                               time.perf_counter() - started)
    return TuneResult(folder, study, values, best_config, best_yaml, reference, confirmation, report)


def study_plan(pinned: RunConfig, tune: TuneConfig, objective: Objective, folder: Path) -> StudyPlan:
    """The study's storage and name, and the fingerprint of what its trials mean: the student and its
    data (the student alone's run key), the stages, the teacher's file, the space, the sampler and pruner."""
    runs = recipe_runs(pinned)
    made_from = {"alone": objective.reference_spec().key, "stages": objective.raw["distill"],
                 "teacher": runs.distilled.teachers[0].key if runs.distilled.teachers else None,
                 "space": objective.space.as_dict(),
                 "tune": tune.model_dump(mode="json", include={"validation_fraction", "seed", "startup_trials",
                                                               "pruner"})}
    return StudyPlan(storage_url(tune, folder), f"{pinned.name}-{folder.name}", tune, fingerprint(made_from))


def _announce(reference: Reference, echo: Callable[[str], None]) -> None:
    teacher = "" if reference.teacher is None else f"teacher {100 * reference.teacher:.2f} %, "
    echo(f"tune: on the validation split: {teacher}student alone {100 * reference.alone:.2f} %")
    for warning in reference.warnings:
        echo(f"warning: {warning}")


def tuned_recipe(objective: Objective, values: dict[str, Value], name: str) -> RunConfig:
    """The recipe of the best trial, named ``<name>-tuned``; its student alone trains with the distilled
    student's last-stage settings, so ``distillery run --config best.yaml`` compares like with like."""
    config = objective.config(values)
    last = config.distill.stages[-1].train or config.student.train
    student = config.student.model_copy(update={"train": last})
    return config.model_copy(update={"name": f"{name}-tuned", "student": student})
