"""``distillery compare``: distillation methods against the student trained alone, seed by seed.

Given a recipe (its teacher and its student) and a list of methods — by default every registered
method that applies to the pair, each with its default stages, or the stages a ``distillery tune``
run found (its best.yaml) — for each seed s:

- the teacher is trained (or reused) once, with the recipe's seed, and teaches every seed's
  students (Tf-KD_self's teacher is seed s's student alone, as the method prescribes);
- the student alone and each method's student are trained with seed s: same data subset, same
  initial weights, same batch order, so their test accuracies are paired;
- each student is scored on the test split: top-1 accuracy, and its fidelity to the recipe's
  teacher (top-1 agreement and KL(teacher ‖ student), :mod:`distillery.fidelity`).

Each method's gain is the mean of its per-seed differences to the student alone with a 95 %
Student-t interval (:func:`distillery.stats.paired_difference`): "gain confirmed" when the whole
interval lies above 0, "loss" when below, "no reliable gain" when it spans 0. The command warns
when the teacher is not clearly better than the student alone, or a student collapsed to chance.
Output: report.md, results.json and forest.png (each difference with its interval); every network
lives in ``<out>/runs/<label>-s<seed>-<key>/`` and is reused or continued by a later invocation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from distillery.config import ConfigError, apply_override, describe_model, read_yaml_mapping, resolve_recipe
from distillery.fidelity import (
    Fidelity,
    chance_accuracy,
    collapse_warning,
    measure_fidelity,
    teacher_warning,
)
from distillery.fsio import atomic_write
from distillery.methods import METHODS, method_class
from distillery.recipe import RunConfig, method_stages_override, recipe_runs, validate_config
from distillery.report import plots as report_plots
from distillery.runner import Runner, TrainedModel, default_folder
from distillery.spec import RunSpec, TeacherRef
from distillery.stats import PairedDifference, format_diff, mean_std, paired_difference, verdict
from distillery.teacher import Teacher
from distillery.train import evaluate, resolve_device
from distillery.train.cost import TeacherTime, teacher_time
from distillery.train.loop import CHECKPOINT_NAME
from distillery.tune.space import materialised

OUTCOMES = {"yes": "gain confirmed", "no": "loss"}  # stats.verdict for direction +1 → the words of the report


@dataclass(frozen=True)
class Contender:
    """One way to train the student, compared with training it alone: a label and the recipe whose
    ``distill.stages`` do it (its teacher already trained: ``teacher.checkpoint`` set)."""

    label: str
    config: RunConfig


@dataclass(frozen=True)
class SeedResult:
    """One trained student: its seed, test accuracy (a fraction) and fidelity to the recipe's teacher."""

    seed: int
    accuracy: float
    fidelity: Fidelity | None


@dataclass(frozen=True)
class ContenderResult:
    """A contender over the seeds, and the mean of its per-seed differences to the student alone (points)."""

    label: str
    stages: str
    seeds: tuple[SeedResult, ...]
    difference: PairedDifference

    @property
    def outcome(self) -> str:
        return outcome(self.difference)


@dataclass
class Comparison:
    """Every contender against the student alone on the same seeds; accuracies as fractions."""

    seeds: list[int]
    teacher_accuracy: float | None
    alone: tuple[SeedResult, ...]
    results: list[ContenderResult]
    warnings: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    teacher_time: TeacherTime = field(default_factory=TeacherTime)  # summed over the distilled runs


def outcome(difference: PairedDifference) -> str:
    """'gain confirmed' (the interval above 0), 'loss' (below 0) or 'no reliable gain' (spanning 0, or one seed)."""
    return OUTCOMES.get(verdict(difference, +1), "no reliable gain")


def map_runs(spec: RunSpec, change: Callable[[RunSpec], RunSpec]) -> RunSpec:
    """``change`` applied to ``spec`` and to every run among its teachers (earlier generations, a
    self-teaching student's alone run), so the whole chain moves together."""
    teachers = tuple(replace(t, run=map_runs(t.run, change)) if t.run is not None else t for t in spec.teachers)
    return change(replace(spec, teachers=teachers))


def placed_by_key(spec: RunSpec) -> RunSpec:
    """``spec`` and its teaching runs without folders of their own: a runner places them by key,
    so every seed gets its own folder (the recipe's folders are by role, one per name)."""
    return map_runs(spec, lambda s: replace(s, folder=None))


# ---------------------------------------------------------------- the teacher and the contenders


def pin_teacher(config: RunConfig, teacher_run: RunSpec | None, runner: Runner) -> RunConfig:
    """``config`` with ``teacher.checkpoint`` naming ``teacher_run``'s trained network (trained or
    reused now, in the recipe's own folder); ``config`` itself when there is no run to train."""
    if teacher_run is None:
        return config
    trained = runner.train(teacher_run)
    assert trained.run_dir is not None
    teacher = config.teacher.model_copy(update={"checkpoint": str(trained.run_dir / CHECKPOINT_NAME)})
    return config.model_copy(update={"teacher": teacher})


def method_contender(pinned: RunConfig, method: str, overrides: Sequence[str] = ()) -> Contender:
    """``method`` with its default stages over the ``pinned`` recipe, then ``overrides`` (``key=value``)."""
    raw = materialised(pinned)
    source = f"compare: method {method}"
    for item in [method_stages_override(method, raw, (), source), *overrides]:
        apply_override(raw, item)
    return Contender(method, _taught_as_its_stages_need(validate_config(raw, source=source)))


def tuned_contender(pinned: RunConfig, path: str | Path) -> Contender:
    """The stages of a tuned recipe (a ``distillery tune`` best.yaml, or any recipe file or shipped
    recipe name) over the ``pinned`` recipe, labelled by its first stage's method and the file
    (``fitnets (best)`` for the stages fitnets → hinton of best.yaml).

    Only its ``distill`` section is taken; its student (and its teacher, if it reads one) must be the
    recipe's, else the comparison would not be of one pair.
    """
    path = resolve_recipe(path)
    tuned = read_yaml_mapping(path)
    tuned.pop("tune", None)
    tuned_config = validate_config(tuned, source=str(path))
    checks = [("student.model", tuned_config.student.model, pinned.student.model)]
    if tuned_config.needs_teacher and not tuned_config.teaches_itself:
        checks.append(("teacher.model", tuned_config.teacher.model, pinned.teacher.model))
    for key, theirs, ours in checks:
        if theirs != ours:
            raise ConfigError(f"{path}: {key} is {theirs.model_dump()}, but the recipe compared has "
                              f"{ours.model_dump()}; a tuned recipe must be of the same teacher and student")
    raw = materialised(pinned)
    raw["distill"] = tuned_config.model_dump(mode="json")["distill"]
    config = _taught_as_its_stages_need(validate_config(raw, source=str(path)))
    return Contender(f"{config.distill.stages[0].method.name} ({path.stem})", config)


def _taught_as_its_stages_need(config: RunConfig) -> RunConfig:
    """Tf-KD_self learns from the seed's student alone, not the recipe's teacher; only the
    ``ensemble`` method is taught by ``teacher.ensemble``'s further members."""
    if config.teaches_itself:
        teacher = config.teacher.model_copy(update={"checkpoint": None, "ensemble": []})
    elif not any(s.method.name == "ensemble" for s in config.distill.stages):
        teacher = config.teacher.model_copy(update={"ensemble": []})
    else:
        return config
    return config.model_copy(update={"teacher": teacher})


def default_methods(config: RunConfig) -> tuple[list[str], list[tuple[str, str]]]:
    """Every registered method but plain cross-entropy (the student alone), and those left out with why."""
    names, skipped = [], []
    for name in METHODS:
        if name == "ce":
            continue
        if name == "ensemble" and not config.teacher.ensemble:
            skipped.append((name, "needs several teachers (teacher.ensemble or --teacher A B)"))
            continue
        names.append(name)
    return names, skipped


def parse_method_sets(items: Sequence[str]) -> dict[str, list[str]]:
    """``NAME:KEY=VALUE`` items (``fsp:distill.stages.0.train.epochs=5``) as overrides by method."""
    by_method: dict[str, list[str]] = {}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--method-set expects METHOD:KEY=VALUE, got {item!r}")
        method_class(name)  # an unknown method fails here, naming the known ones
        by_method.setdefault(name, []).append(override)
    return by_method


# ---------------------------------------------------------------- training and scoring


def _score(trained: TrainedModel, teacher: Teacher | None, runner: Runner, config: RunConfig) -> SeedResult:
    fidelity = None
    if teacher is not None:
        fidelity = measure_fidelity(trained.model, teacher, runner.data.test(trained.spec.data),
                                    config.data.eval_batch_size, resolve_device(config.device))
    return SeedResult(trained.spec.seed, trained.test_accuracy, fidelity)


def _with_seed(config: RunConfig, seed: int) -> RunConfig:
    return config.model_copy(update={"seed": seed})


def compare_contenders(baseline: RunConfig, contenders: Sequence[Contender], seeds: Sequence[int], runner: Runner,
                       *, teacher: TeacherRef | None, check_teacher: bool = True, skip_unfit: bool = False,
                       echo: Callable[[str], None] = print) -> Comparison:
    """Train the student alone (``baseline``'s) and every contender with each seed, and compare them.

    Before any distillation: ``teacher``'s test accuracy is reported and, with ``check_teacher``,
    a warning given when it is not clearly above the student alone's (trained first, every seed).
    Every student's fidelity is measured against ``teacher``. With ``skip_unfit`` a contender whose
    set-up refuses the pair (a feature method without the layers it taps) is left out with the
    reason instead of stopping the comparison.
    """
    data = recipe_runs(baseline).alone.data
    test, warnings = runner.data.test(data), []

    def warn(warning: str | None) -> None:  # said when it arises, and kept for the report
        if warning:
            echo(f"warning: {warning}")
            warnings.append(warning)

    teacher_net = None if teacher is None else runner.teacher_model(teacher, runner.data.train_val(data)[0])
    accuracy = None if teacher_net is None else evaluate(teacher_net, test, baseline.data.eval_batch_size,
                                                         resolve_device(baseline.device))["accuracy"]
    if accuracy is not None:
        echo(f"compare: teacher {100 * accuracy:.2f} % on the test split")
    scorer, chance = (Teacher(teacher_net) if teacher_net is not None else None), chance_accuracy(test)
    alone_runs = [runner.train(placed_by_key(recipe_runs(_with_seed(baseline, seed)).alone)) for seed in seeds]
    alone = tuple(_score(run, scorer, runner, baseline) for run in alone_runs)
    if accuracy is not None and check_teacher:
        warn(teacher_warning(accuracy, mean_std([r.accuracy for r in alone])[0], "the test split"))
    for result in alone:
        warn(collapse_warning(f"student alone (seed {result.seed})", result.accuracy, chance))
    scored: dict[str, list[SeedResult]] = {c.label: [] for c in contenders}
    skipped: dict[str, str] = {}
    costs: list[dict | None] = []
    for seed, alone_result in zip(seeds, alone):
        for contender in (c for c in contenders if c.label not in skipped):
            try:
                trained = runner.train(placed_by_key(recipe_runs(_with_seed(contender.config, seed)).distilled))
            except ValueError as err:
                if not skip_unfit:
                    raise
                skipped[contender.label] = str(err)
                echo(f"compare: {contender.label} left out: {err}")
                continue
            scored[contender.label].append(_score(trained, scorer, runner, baseline))
            costs.append(trained.cost)
            warn(collapse_warning(f"{contender.label} (seed {seed})", trained.test_accuracy, chance))
            echo(f"compare: seed {seed}: {contender.label} {100 * trained.test_accuracy:.2f} %, student alone "
                 f"{100 * alone_result.accuracy:.2f} %")
    results = [_result(c, scored[c.label], alone) for c in contenders if c.label not in skipped]
    return Comparison(list(seeds), accuracy, alone, results, warnings, list(skipped.items()), teacher_time(costs))


def _result(contender: Contender, seeds: list[SeedResult], alone: Sequence[SeedResult]) -> ContenderResult:
    stages = " → ".join(f"{s.method.name} {s.method.options()}" for s in contender.config.distill.stages)
    difference = paired_difference([100 * r.accuracy for r in seeds], [100 * r.accuracy for r in alone])
    return ContenderResult(contender.label, stages, tuple(seeds), difference)


# ---------------------------------------------------------------- the command


def run_compare(config: RunConfig, *, methods: Sequence[str] | None = None, tuned: Sequence[str] = (),
                method_sets: Sequence[str] = (), seeds: int = 3, out: str | Path | None = None,
                overwrite: bool = False, progress: bool = True, echo: Callable[[str], None] = print,
                runner: Runner | None = None) -> tuple[Comparison, Path]:
    """``distillery compare``: train and compare; returns the comparison and the report's path."""
    if seeds < 3:
        raise ConfigError(f"--seeds must be at least 3 for a paired 95 % interval, got {seeds}")
    started = time.perf_counter()
    out = Path(out) if out is not None else Path(config.output_dir) / config.name / "compare"
    sets = parse_method_sets(method_sets)
    runner = runner or Runner(resume=True, overwrite=overwrite, progress=progress, echo=echo,
                              folder_for=default_folder(out))
    names, skipped = (list(methods), []) if methods else default_methods(config)
    for name in names:
        method_class(name)  # an unknown name fails before any training
    pinned = pin_teacher(config, recipe_runs(config).teacher_run, runner)
    # every named method with its defaults, then every tuned recipe beside them ("hinton (best)")
    contenders = [method_contender(pinned, name, sets.get(name, ())) for name in names]
    contenders += [tuned_contender(pinned, path) for path in tuned]
    seed_list = [config.seed + i for i in range(seeds)]
    teacher = TeacherRef(checkpoint=pinned.teacher.checkpoint, model=pinned.teacher.model)
    comparison = compare_contenders(pinned, contenders, seed_list, runner, teacher=teacher, skip_unfit=not methods,
                                    echo=echo)
    comparison.skipped[:0] = skipped
    report = write_comparison(comparison, pinned, out, time.perf_counter() - started)
    return comparison, report


# ---------------------------------------------------------------- the report


def comparison_table(comparison: Comparison) -> str:
    """The markdown table: teacher, student alone, then each contender with its difference and verdict."""
    header = ["run", "test accuracy % (mean ± std)", "per seed", "Δ vs alone, points [95 % CI]", "outcome",
              "agreement with teacher %", "KL(teacher ‖ student)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if comparison.teacher_accuracy is not None:
        lines.append(f"| teacher | {100 * comparison.teacher_accuracy:.2f} | | | | | |")
    rows = [("student alone", comparison.alone, "—", "—")]
    rows += [(r.label, r.seeds, format_diff(r.difference), r.outcome) for r in comparison.results]
    for label, seeds, diff, verdict_text in rows:
        mean, std = mean_std([100 * s.accuracy for s in seeds])
        per_seed = " / ".join(f"{100 * s.accuracy:.2f}" for s in seeds)
        lines.append(f"| {label} | {mean:.2f} ± {std:.2f} | {per_seed} | {diff} | {verdict_text} | "
                     f"{_fidelity_text(seeds, 'agreement', 100, '.1f')} | {_fidelity_text(seeds, 'kl', 1, '.3f')} |")
    return "\n".join(lines) + "\n"


def _fidelity_text(seeds: Sequence[SeedResult], name: str, scale: float, fmt: str) -> str:
    values = [scale * getattr(s.fidelity, name) for s in seeds if s.fidelity is not None]
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:{fmt}} ± {std:{fmt}}"


def plot_forest(results: Sequence[ContenderResult], path: Path, title: str) -> Path:
    """Each contender's mean difference to the student alone with its 95 % interval (a forest plot)."""
    colours = {"gain confirmed": "#2a7", "loss": "#c33"}
    return report_plots.plot_forest(
        [r.label for r in results], [r.difference for r in results], [colours.get(r.outcome, "#888") for r in results],
        path, title, "test accuracy − student alone, points (95 % CI; green gain, red loss)")


def comparison_dict(comparison: Comparison) -> dict[str, Any]:
    """The comparison as plain values (accuracies as fractions, differences in points) for results.json."""
    def seeds(results: Sequence[SeedResult]) -> list[dict[str, Any]]:
        return [{"seed": r.seed, "accuracy": r.accuracy,
                 "agreement": None if r.fidelity is None else r.fidelity.agreement,
                 "kl": None if r.fidelity is None else r.fidelity.kl} for r in results]

    return {
        "seeds": comparison.seeds, "teacher_accuracy": comparison.teacher_accuracy,
        "student_alone": seeds(comparison.alone),
        "contenders": [{"label": r.label, "stages": r.stages, "seeds": seeds(r.seeds), "outcome": r.outcome,
                        "difference_points": {"mean": r.difference.mean, "low": r.difference.low,
                                              "high": r.difference.high, "n": r.difference.n}}
                       for r in comparison.results],
        "warnings": comparison.warnings, "skipped": [list(s) for s in comparison.skipped],
        "teacher_time": comparison.teacher_time.as_dict(),
    }


def write_comparison(comparison: Comparison, config: RunConfig, out: Path, seconds: float) -> Path:
    """report.md, results.json and forest.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    forest = plot_forest(comparison.results, out / "forest.png", f"{config.name}: methods against the student alone")
    lines = [f"# {config.name}: distillation methods against the student alone\n",
             *_header(config, comparison, seconds), "", comparison_table(comparison), *_reading_notes(),
             ""]
    if comparison.warnings:
        lines += ["## Warnings\n", *[f"- {w}" for w in comparison.warnings], ""]
    if comparison.skipped:
        lines += ["## Left out\n", *[f"- {name}: {why}" for name, why in comparison.skipped], ""]
    lines += ["## Stages\n", *[f"- {r.label}: {r.stages}" for r in comparison.results], "",
              f"![forest plot]({forest.name})\n"]
    report = out / "report.md"
    atomic_write(report, "\n".join(lines))
    atomic_write(out / "results.json", json.dumps({"recipe": config.model_dump(mode="json"),
                                                  **comparison_dict(comparison), "seconds": seconds}, indent=2))
    return report


def _header(config: RunConfig, comparison: Comparison, seconds: float) -> list[str]:
    data = config.data
    return [f"- Teacher: {describe_model(config.teacher.model)} ({config.teacher.checkpoint}); student: "
            f"{describe_model(config.student.model)}, {config.student.train.epochs} epochs alone.",
            f"- Data: {data.dataset}, {data.train_subset or 'all'} training and {data.test_subset or 'all'} test "
            f"examples; seeds {', '.join(map(str, comparison.seeds))} (a seed fixes the data subset, the initial "
            "weights and the batch order of every run of that seed).",
            f"- This invocation: {seconds / 60:.1f} min (finished runs are reused, unfinished ones continued).",
            f"- Teacher time {comparison.teacher_time.describe()}."]


def _reading_notes() -> list[str]:
    return ["Δ is the mean of the per-seed differences to the student alone with a 95 % Student-t interval; "
            "'gain confirmed' when the interval lies above 0, 'loss' when below, 'no reliable gain' when it spans 0. "
            "Agreement (top-1) and KL are measured on the test split against the recipe's teacher for every row, "
            "the student alone's giving the level a student reaches without imitating it."]

