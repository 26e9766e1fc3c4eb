"""The bench's wall-clock row: a 20-trial ``distillery tune`` with augmentation, against the student alone.

Every trial of a search trains the same student on the same augmented views, so with the teacher
store (``teacher.store_epochs``) a trial should cost what training the student alone costs, and
the whole search what that many student-alone runs cost, plus building the store once. The
target (issue 18) is

    tune wall  ≤  1.15 × (n_trials × one student-alone trial)  +  the store's build time.

What is timed: :func:`~distillery.tune.command.run_tune` from its call to its report (the
search's own reference run, its SQLite study, sampling, every trial, best.yaml and the plots),
with confirmation off and the pruner off, so every trial trains all its epochs as the yardstick
does (a pruner would only make the search cheaper). The teacher, ResNet-20, is trained
beforehand for one epoch (not timed: speed does not depend on its accuracy) and named by
``teacher.checkpoint``; the student is ResNet-8 with random crops and flips, distilled with
``hinton`` from the store's stored views. The store's build time is the first trial's
(:func:`~distillery.tune.report.trials_teacher_time`).

The yardstick: the search's own student-alone run (same training part of the split, same epochs
and augmentation, validation every epoch), trained :data:`ALONE_REPEATS` times before the search
and as often after it, each in a folder of its own. The machine's speed drifts over a minute, so
the ratio is given for the fastest and the slowest of these: "met" when even the fastest keeps
the search within the target, "NOT MET" when even the slowest does not, "within noise" otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distillery.config import TuneConfig
    from distillery.recipe import RunConfig
    from distillery.runner import DataStore

TRIALS = 20
MAX_OVERHEAD = 1.15
ALONE_REPEATS = 2  # student-alone runs before the search, and as many after it
TRAIN_EXAMPLES = 2560  # of which tune.validation_fraction (10 %) is held out to score the trials
EPOCHS = 2  # per trial; the store holds these epochs of views
AUGMENT = "{crop_padding: 2, hflip: true}"


@dataclass(frozen=True)
class TuneTiming:
    """One measurement of the row: wall seconds of the search, of each student-alone run, of the store build."""

    trials: int
    train_examples: int
    tune_s: float
    alone_s: tuple[float, ...]
    store_build_s: float
    teacher_lookup_s: float  # the trials' seconds in store look-ups (the teacher's whole share)

    def limit_s(self, alone_s: float) -> float:
        """The target's bound on the search for one student-alone time."""
        return MAX_OVERHEAD * self.trials * alone_s + self.store_build_s

    def ratios(self) -> tuple[float, float]:
        """The search's wall over (trials × alone + build), from the slowest and from the fastest
        student-alone run: the lower and upper ends of the overhead factor measured."""
        return tuple(self.tune_s / (self.trials * a + self.store_build_s) for a in (max(self.alone_s),
                                                                                   min(self.alone_s)))

    def verdict(self) -> str:
        low, high = self.ratios()
        return "met" if high <= MAX_OVERHEAD else "NOT MET" if low > MAX_OVERHEAD else "within noise"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": list(self.ratios()), "target": MAX_OVERHEAD, "verdict": self.verdict()}

    def markdown(self) -> list[str]:
        low, high = self.ratios()
        return [
            f"Wall-clock target: a {self.trials}-trial `distillery tune` (ResNet-20 → ResNet-8, hinton, random crops "
            f"and flips, teacher store of {EPOCHS} epochs, {self.train_examples} training examples less 10 % for "
            f"validation, {EPOCHS} epochs per trial, pruner off, no confirmation) against the same student trained "
            f"alone, {2 * ALONE_REPEATS} times (before and after the search); the factor is the search's wall over "
            "(trials × one student-alone run + the store's build), from the slowest and the fastest of those runs.",
            "",
            "| target | search s | student alone s (each run) | store build s | factor [range] | verdict |",
            "|---|---:|---:|---:|---:|:---:|",
            f"| tune wall ≤ {MAX_OVERHEAD} × ({self.trials} × alone) + store build | {self.tune_s:.1f} | "
            f"{', '.join(f'{a:.2f}' for a in self.alone_s)} | {self.store_build_s:.2f} | "
            f"[{low:.3f}, {high:.3f}] | {self.verdict()} |",
        ]


def tune_overrides(workdir: Path, data_root: str | None, trials: int = TRIALS,
                   train_examples: int = TRAIN_EXAMPLES) -> list[str]:
    """The row's recipe, as ``--set`` overrides of the shipped one (teacher not yet pinned)."""
    train = f"{{epochs: {EPOCHS}, batch_size: 128, augment: {AUGMENT}}}"
    return [*([f"data.root={data_root}"] if data_root else []), f"output_dir={workdir}", "name=bench-tune",
            f"data.train_subset={train_examples}", "data.test_subset=256", "data.eval_batch_size=256",
            "teacher.model={name: resnet20}", "teacher.train={epochs: 1, batch_size: 128}",
            "student.model={name: resnet8}", f"student.train={train}", "distill.stages=[{method: {name: hinton}}]",
            f"teacher.store_epochs={EPOCHS}", f"tune.n_trials={trials}", "tune.pruner.name=none",
            "tune.confirm_seeds=0"]


def time_tune(workdir: Path, data_root: str | None, trials: int = TRIALS, train_examples: int = TRAIN_EXAMPLES,
              echo: Callable[[str], None] = print) -> TuneTiming:
    """Train the teacher (untimed), then time the student alone, the search, and the student alone again."""
    import optuna

    from distillery.recipe import recipe_runs
    from distillery.runner import DataStore, Runner
    from distillery.train.loop import CHECKPOINT_NAME
    from distillery.tune.command import run_tune
    from distillery.tune.report import trials_teacher_time
    from distillery.tune.space import load_tune_recipe

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bench prints its own lines
    quiet, data = (lambda line: None), DataStore()  # one copy of the data for every run, loaded untimed
    overrides = tune_overrides(workdir, data_root, trials, train_examples)
    config, _ = load_tune_recipe(None, overrides)
    teacher = Runner(progress=False, echo=quiet, data=data).train(recipe_runs(config).teacher_run)
    config, tune = load_tune_recipe(None, [*overrides, f"teacher.checkpoint={teacher.run_dir / CHECKPOINT_NAME}"])
    alone = [_time_alone(config, tune, workdir / f"alone-{k}", data) for k in range(ALONE_REPEATS)]
    echo(f"  tune: student alone {', '.join(f'{a:.2f}' for a in alone)} s; searching {trials} trials ...")
    start = time.perf_counter()
    result = run_tune(config, tune, progress=False, echo=quiet, data=data)
    tune_s = time.perf_counter() - start
    alone += [_time_alone(config, tune, workdir / f"alone-{k}", data) for k in range(ALONE_REPEATS, 2 * ALONE_REPEATS)]
    spent = trials_teacher_time(result.study)
    timing = TuneTiming(len(result.study.trials), train_examples, tune_s, tuple(alone), spent.store_build_s,
                        spent.stored_s)
    echo(f"  tune: {timing.trials} trials in {tune_s:.1f} s, store built in {spent.store_build_s:.2f} s; factor "
         f"{timing.ratios()[0]:.3f}-{timing.ratios()[1]:.3f}: {timing.verdict()}")
    return timing


def _time_alone(config: RunConfig, tune: TuneConfig, folder: Path, data: DataStore) -> float:
    """Wall seconds of one training of the search's student-alone run, in ``folder``."""
    from distillery.runner import Runner, default_folder
    from distillery.tune.objective import Objective
    from distillery.tune.space import materialised, resolve_space

    objective = Objective(materialised(config), resolve_space(config, tune), tune.validation_fraction, str(folder))
    runner = Runner(progress=False, echo=lambda line: None, data=data, folder_for=default_folder(folder))
    start = time.perf_counter()
    runner.train(objective.reference_spec())
    return time.perf_counter() - start


def tune_markdown(measured: dict[str, Any]) -> list[str]:
    """:meth:`TuneTiming.markdown` of a timing sent as :meth:`TuneTiming.as_dict` (by the bench's child)."""
    names = TuneTiming.__dataclass_fields__
    values = {name: measured[name] for name in names}
    return TuneTiming(**{**values, "alone_s": tuple(values["alone_s"])}).markdown()
