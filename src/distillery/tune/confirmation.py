"""The confirmation of a tune run: the best recipe against the student alone on the test split.

The search scores trials on a validation split; only this step reads the test split. It trains the
best recipe and the student alone with several seeds on the full training split and compares them
paired by seed (:func:`distillery.compare.compare_contenders`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from distillery.compare import Comparison, Contender, compare_contenders
from distillery.config import StudentConfig
from distillery.recipe import RunConfig, recipe_runs
from distillery.runner import DataStore, Runner, default_folder

OUTCOME_RANK = ("loss", "no reliable gain", "gain confirmed")  # weakest first


@dataclass(frozen=True)
class Confirmation:
    """The best recipe on the test split against the student alone, trained two ways.

    ``same_settings``: the student alone with the best trial's training settings, which isolates
    what distillation adds at those settings. ``recipe_settings`` (only when the search changed
    training settings): the student alone with the recipe's own, the student the user had; a
    searched learning rate that suits distillation can be poor for the student alone, so beating
    it at that rate is not beating the student alone. The verdict is the weaker of the outcomes.
    """

    same_settings: Comparison
    recipe_settings: Comparison | None

    @property
    def comparisons(self) -> list[Comparison]:
        return [c for c in (self.same_settings, self.recipe_settings) if c is not None]

    @property
    def verdict(self) -> str:
        return min((c.results[0].outcome for c in self.comparisons), key=OUTCOME_RANK.index)


def confirm(best: RunConfig, recipe_student: StudentConfig, seeds: int, folder: Path, data: DataStore,
            overwrite: bool, progress: bool, echo: Callable[[str], None]) -> Confirmation | None:
    """The best recipe and the student alone, ``seeds`` seeds each, full training split, test split;
    the student alone also with ``recipe_student``'s training settings when the best's differ."""
    if seeds == 0:
        return None
    runner = Runner(resume=True, overwrite=overwrite, progress=progress, echo=echo, data=data,
                    folder_for=default_folder(folder / "confirm"))
    label = f"{'+'.join(s.method.name for s in best.distill.stages)} (best)"
    teacher = recipe_runs(best).teacher if best.needs_teacher and best.teacher.checkpoint else None
    seed_list = [best.seed + i for i in range(seeds)]

    def against(baseline: RunConfig) -> Comparison:
        return compare_contenders(baseline, [Contender(label, best)], seed_list, runner, teacher=teacher,
                                  check_teacher=not best.teaches_itself, echo=echo)

    same = against(best)
    if recipe_student.train == best.student.train:
        return Confirmation(same, None)
    echo("tune: the search changed the training settings; the student alone again with the recipe's own")
    return Confirmation(same, against(best.model_copy(update={"student": recipe_student})))
