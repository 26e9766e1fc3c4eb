"""What ``distillery tune`` writes: best.yaml, report.md (trials, plots, confirmation) and results.json.

The plots are the optimisation history (each trial's validation accuracy, the best so far, the
student alone for reference) and the parameters' importances. Importances are Optuna's PED-ANOVA
evaluator (Watanabe et al., IJCAI 2023), which needs no scikit-learn (fANOVA, Optuna's former
default, does): how much each parameter's distribution differs between the best trials and all
of them. With few completed trials they are rough, and the report says when they cannot be
computed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from optuna.importance import PedAnovaImportanceEvaluator  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from distillery.compare import comparison_dict, comparison_table, plot_forest  # noqa: E402
from distillery.config import describe_model  # noqa: E402
from distillery.fsio import atomic_write
from distillery.recipe import RunConfig  # noqa: E402
from distillery.report.plots import save_figure  # noqa: E402
from distillery.stats import format_diff  # noqa: E402
from distillery.train.cost import TeacherTime, teacher_time  # noqa: E402
from distillery.tune.confirmation import Confirmation  # noqa: E402
from distillery.tune.objective import Reference  # noqa: E402
from distillery.tune.space import SearchSpace  # noqa: E402
from distillery.tune.study import StudyPlan  # noqa: E402


def dump_recipe(config: RunConfig) -> str:
    """A recipe as YAML that :func:`distillery.recipe.load_config` reads back to ``config``."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def write_best_yaml(config: RunConfig, path: Path, best: FrozenTrial, plan: StudyPlan) -> Path:
    """best.yaml: the best trial's recipe, with a header saying where it comes from and how to run it."""
    header = (f"# The recipe of trial {best.number} of the tune study {plan.name!r} ({plan.url}):\n"
              f"# {100 * best.value:.2f} % validation accuracy. Run it with: distillery distill --config {path}\n"
              "# (the teacher is the checkpoint the search used; student.train is the distilled student's last\n"
              "# stage's, so `distillery run --config` trains the student alone with the same settings).\n")
    atomic_write(path, header + dump_recipe(config))
    return path


# ---------------------------------------------------------------- trials


def trial_rows(study: optuna.Study, space: SearchSpace, alone: float) -> list[dict[str, Any]]:
    """One row per trial: number, state, validation accuracy (%), minus the student alone, epochs,
    seconds from its start to its end (None while running), values."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        value = trial.value if trial.state == TrialState.COMPLETE else None
        state = "diverged" if "diverged" in trial.user_attrs else {
            TrialState.COMPLETE: "done", TrialState.PRUNED: "stopped"}.get(trial.state, trial.state.name.lower())
        rows.append({"trial": trial.number, "state": state, "validation_accuracy": value,
                     "minus_alone_points": None if value is None else 100 * (value - alone),
                     "epochs": len(trial.intermediate_values), "run_dir": trial.user_attrs.get("run_dir"),
                     "seconds": _duration(trial),
                     "values": {d.name: trial.params.get(d.name) for d in space.dimensions}})
    return rows


def _duration(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def trials_table(rows: Sequence[dict[str, Any]], space: SearchSpace) -> str:
    names = [d.name for d in space.dimensions]
    header = ["trial", "state", "validation acc %", "minus alone", "last-stage epochs", *names]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        accuracy = "—" if row["validation_accuracy"] is None else f"{100 * row['validation_accuracy']:.2f}"
        gain = "—" if row["minus_alone_points"] is None else f"{row['minus_alone_points']:+.2f}"
        values = [_value_text(row["values"][n]) for n in names]
        lines.append("| " + " | ".join([str(row["trial"]), row["state"], accuracy, gain, str(row["epochs"]),
                                        *values]) + " |")
    return "\n".join(lines) + "\n"


def _value_text(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value)


def parameter_importances(study: optuna.Study) -> dict[str, float] | str:
    """PED-ANOVA importances of the searched parameters, or why there are none."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return f"not computed: {len(done)} completed trial(s); at least 2 are needed"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dict(optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator()))
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        return f"not computed: {err}"


# ---------------------------------------------------------------- plots


def plot_history(rows: Sequence[dict[str, Any]], alone: float, path: Path) -> Path:
    """Validation accuracy of each completed trial, the best so far, and the student alone."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    done = [(r["trial"], 100 * r["validation_accuracy"]) for r in rows if r["validation_accuracy"] is not None]
    stopped = [r["trial"] for r in rows if r["state"] in ("stopped", "diverged")]
    if done:
        ax.plot(*zip(*done), "o", color="#234", label="completed trial")
        best, best_line = float("-inf"), []
        for number, value in done:
            best = max(best, value)
            best_line.append((number, best))
        ax.step(*zip(*best_line), where="post", color="#2a7", label="best so far")
    for number in stopped:
        ax.axvline(number, color="#c33", alpha=0.25, lw=3)
    ax.axhline(100 * alone, ls="--", color="#888", label=f"student alone ({100 * alone:.2f} %)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial (red bands: stopped early)", ylabel="validation accuracy (%)", title="optimisation history")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_importances(importances: dict[str, float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(importances) + 1.5))
    names = list(importances)
    ax.barh(range(len(names)), [importances[n] for n in names], color="#9ab")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="importance (PED-ANOVA, normalised to sum 1)", title="parameter importances")
    return save_figure(fig, path)


# ---------------------------------------------------------------- the report


def write_tune_report(folder: Path, config: RunConfig, space: SearchSpace, study: optuna.Study,
                      reference: Reference, best: FrozenTrial, confirmation: Confirmation | None,
                      plan: StudyPlan, seconds: float) -> Path:
    """report.md and results.json in ``folder`` (plots beside them)."""
    rows = trial_rows(study, space, reference.alone)
    spent = trials_teacher_time(study)
    importances = parameter_importances(study)
    plots = [plot_history(rows, reference.alone, folder / "history.png")]
    if isinstance(importances, dict) and importances:
        plots.append(plot_importances(importances, folder / "importances.png"))
    parts = [f"# {config.name}: tuning {' → '.join(s.method.name for s in config.distill.stages)}\n",
             *_header(config, plan, reference, rows, seconds, spent), "",
             "## Search space\n", "| parameter | searched |", "|---|---|",
             *[f"| {name} | {what} |" for name, what in space.describe()], "",
             "## Trials\n", _trials_note(space, reference), trials_table(rows, space),
             f"Best: trial {best.number}, {100 * best.value:.2f} % "
             f"({', '.join(f'{k} = {_value_text(v)}' for k, v in best.params.items())}); its recipe is "
             "[best.yaml](best.yaml).\n",
             "## Plots\n", *[f"![{p.stem}]({p.name})\n" for p in plots]]
    if not isinstance(importances, dict):
        parts.append(f"Parameter importances: {importances}.\n")
    parts += _confirmation_section(confirmation, folder)
    report = folder / "report.md"
    atomic_write(report, "\n".join(parts))
    atomic_write(folder / "results.json", json.dumps({
        "study": plan.name, "storage": plan.url, "space": space.as_dict(), "trials": rows,
        "reference": {"teacher": reference.teacher, "alone": reference.alone, "warnings": list(reference.warnings)},
        "best": {"trial": best.number, "validation_accuracy": best.value, "values": best.params},
        "importances": importances, **_confirmation_dict(confirmation),
        "teacher_time": spent.as_dict(),
        "seconds": seconds}, indent=2))
    return report


def trials_teacher_time(study: optuna.Study) -> TeacherTime:
    """The teacher's cost summed over the completed trials (each keeps its run's cost report)."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return teacher_time(trial.user_attrs.get("cost") for trial in done)


def _header(config: RunConfig, plan: StudyPlan, reference: Reference, rows: Sequence[dict[str, Any]],
            seconds: float, spent: TeacherTime) -> list[str]:
    tune = plan.tune
    done = sum(r["state"] == "done" for r in rows)
    teacher = "" if reference.teacher is None else f"teacher {100 * reference.teacher:.2f} %, "
    lines = [f"- Teacher {describe_model(config.teacher.model)}, student {describe_model(config.student.model)}; "
             f"{config.data.dataset}, {config.data.train_subset or 'all'} training examples of which "
             f"{100 * tune.validation_fraction:g} % are held out (stratified, seed {config.seed}) to score the "
             "trials; the test split is read only by the confirmation.",
             f"- {len(rows)} trials ({done} completed, {len(rows) - done} stopped or failed) of {tune.n_trials} asked; "
             f"TPE sampler, seed {tune.seed}, {tune.startup_trials} random trials first; pruner {tune.pruner.name}. "
             f"Study {plan.name!r} in {plan.url}.",
             f"- On the validation split: {teacher}student alone {100 * reference.alone:.2f} %.",
             f"- The trials took {sum(r['seconds'] or 0 for r in rows) / 60:.1f} min in all (each from its start "
             f"to its end, summed over any reruns); this invocation {seconds / 60:.1f} min.",
             f"- Teacher time of the search {spent.describe()}."]
    lines += [f"- **Warning:** {w}" for w in reference.warnings]
    return lines


def _trials_note(space: SearchSpace, reference: Reference) -> str:
    note = (f"Scored by validation accuracy; minus alone: against the student alone on the same split, trained "
            f"with the recipe's settings ({100 * reference.alone:.2f} %).")
    trained = [d.name for d in space.dimensions if ".train." in d.key]
    if trained:
        note += (f" The search also sets training settings ({', '.join(trained)}), so part of a trial's lead may "
                 "come from them rather than from distillation; the confirmation trains the student alone with "
                 "the best trial's settings to tell the two apart.")
    return note + "\n"


def _confirmation_section(confirmation: Confirmation | None, folder: Path) -> list[str]:
    if confirmation is None:
        return ["## Confirmation\n", "Skipped (tune.confirm_seeds: 0).\n"]
    same, recipe = confirmation.same_settings, confirmation.recipe_settings
    differences = [replace(same.results[0], label="vs alone, best's training settings")]
    lines = ["## Confirmation on the test split\n",
             f"The best parameters and the student alone (with the same training settings), seeds "
             f"{', '.join(map(str, same.seeds))}, on the full training split: best minus alone "
             f"{format_diff(same.results[0].difference)} points (95 % interval of the paired differences): "
             f"**{same.results[0].outcome}**.\n", comparison_table(same)]
    if recipe is not None:
        differences.append(replace(recipe.results[0], label="vs alone, recipe's training settings"))
        lines += ["The search also set training settings, which can suit distillation and not the student "
                  "alone; so the student alone again, with the recipe's own training settings: best minus "
                  f"alone {format_diff(recipe.results[0].difference)} points: **{recipe.results[0].outcome}**.\n",
                  comparison_table(recipe)]
    forest = plot_forest(differences, folder / "confirmation.png", "best parameters against the student alone")
    lines += [f"**Verdict: {confirmation.verdict}**"
              + (" (the weaker of the two)." if recipe is not None else ".") + "\n",
              f"![confirmation]({forest.name})\n"]
    lines += [f"- **Warning:** {w}" for c in confirmation.comparisons for w in c.warnings]
    return [*lines, ""]


def _confirmation_dict(confirmation: Confirmation | None) -> dict[str, Any]:
    """results.json's confirmation keys: each comparison, and the verdict (the weaker outcome)."""
    if confirmation is None:
        return {"confirmation": None, "confirmation_recipe_settings": None, "verdict": None}
    recipe = confirmation.recipe_settings
    return {"confirmation": comparison_dict(confirmation.same_settings),
            "confirmation_recipe_settings": None if recipe is None else comparison_dict(recipe),
            "verdict": confirmation.verdict}
