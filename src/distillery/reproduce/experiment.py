"""The shape every reproduction shares, and the driver that runs one.

An :class:`Experiment` (one per paper, in its own module) says, for a budget and a seed, which
networks to train (:attr:`Experiment.plan`: named :class:`~distillery.reproduce.runs.RunSpec`
objects), what to measure on them (:attr:`Experiment.measure`: one value per setting), what the
paper claims (:attr:`Experiment.claims`) and what to draw. :func:`run_experiment` prints the plan
with its estimated cost, trains or reuses every run (seed by seed), and writes ``report.md``,
``results.json`` and the plots into the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distillery.config import ConfigError
from distillery.fsio import atomic_write
from distillery.reproduce.report import Claim, Row, build_rows, plot_differences, plot_settings, write_markdown
from distillery.reproduce.runs import (
    ExperimentRunner,
    RunSpec,
    estimate_seconds,
    format_minutes,
    plan_table,
    run_status,
)
from distillery.runner import default_folder


@dataclass(frozen=True)
class Env:
    """Where and on what the runs happen (not part of a budget: the same budget runs anywhere)."""

    device: str = "cpu"
    data_root: str | None = None


@dataclass
class Measured:
    """One seed's measurements: ``values`` (setting → number, % unless said) and anything the plots need."""

    values: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    budgets: Mapping[str, Any]
    plan: Callable[[Any, int, Env], dict[str, RunSpec]]
    measure: Callable[[Any, dict[str, RunSpec], ExperimentRunner], Measured]
    claims: Callable[[Any], list[Claim]]
    header: Callable[[Any], list[str]]
    finish: Callable[[Any, dict[int, Measured], list[Row], Path], tuple[list[Path], list[tuple[str, str]]]]
    """Experiment-specific plots and report sections: (plots, [(heading, markdown), ...])."""


@dataclass
class ExperimentResult:
    out: Path
    specs: list[RunSpec]
    estimate_seconds: float | None
    counts: dict[str, int]
    rows: list[Row] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    report: Path | None = None
    plots: list[Path] = field(default_factory=list)


def budget_of(experiment: Experiment, name: str) -> Any:
    if name not in experiment.budgets:
        public = [b for b in experiment.budgets if b != "smoke"]
        raise ConfigError(f"experiment {experiment.name!r} has no budget {name!r}; choose one of {', '.join(public)}")
    return experiment.budgets[name]


def plan_runs(experiment: Experiment, budget: Any, seeds: Sequence[int], env: Env,
              ) -> tuple[dict[int, dict[str, RunSpec]], list[RunSpec]]:
    """Each seed's named runs, and every distinct run once, in the order to train them (seed by seed,
    each run after its teachers)."""
    plans = {seed: experiment.plan(budget, seed, env) for seed in seeds}
    ordered: dict[str, RunSpec] = {}

    def add(spec: RunSpec) -> None:
        for ref in spec.teachers:
            add(ref.run)
        ordered.setdefault(spec.key, spec)

    for seed in seeds:
        for spec in plans[seed].values():
            add(spec)
    return plans, list(ordered.values())


def run_experiment(experiment: Experiment, budget_name: str, seeds: int, out: str | Path, *, env: Env = Env(),
                   dry_run: bool = False, progress: bool = True,
                   echo: Callable[[str], None] = print) -> ExperimentResult:
    """Plan, train or reuse, measure and report one experiment; see the module docstring."""
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    budget = budget_of(experiment, budget_name)
    out = Path(out)
    seed_list = list(range(seeds))
    plans, specs = plan_runs(experiment, budget, seed_list, env)
    estimates, total = _announce(experiment, budget, budget_name, seeds, specs, out, echo)
    result = ExperimentResult(out, specs, total, {"trained": 0, "reused": 0})
    if dry_run:
        echo(plan_table(specs, out, estimates))
        return result

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runner = ExperimentRunner(out, progress=progress, echo=echo)
    for spec in specs:
        runner.train(spec)
    measured = {seed: experiment.measure(budget, plans[seed], runner) for seed in seed_list}
    values: dict[str, list[float]] = {}
    for seed in seed_list:
        for name, value in measured[seed].values.items():
            values.setdefault(name, []).append(value)
    rows = build_rows(experiment.claims(budget), values)
    plots = [plot_settings(values, out / "settings.png", f"{experiment.name}: every setting (mean ± std; dots: seeds)"),
             plot_differences(rows, out / "differences.png", f"{experiment.name}: differences to the baselines")]
    extra_plots, sections = experiment.finish(budget, measured, rows, out)
    logged = sum(r.get("seconds", 0.0) for s in specs for r in runner.train(s).history)
    header = [*experiment.header(budget),
              f"Seeds: {', '.join(map(str, seed_list))} (a seed fixes the training subset, the initial weights and "
              "the batch order of every run of that seed).",
              f"Device: {env.device}, {torch.get_num_threads()} CPU threads. Runs: {len(specs)} "
              f"({runner.counts['trained']} trained or continued now, {runner.counts['reused']} reused). "
              f"Training time logged by the runs: {logged / 60:.1f} min (evaluation excluded); "
              f"this invocation: {(time.perf_counter() - started) / 60:.1f} min; "
              f"planned estimate for all runs: {format_minutes(total)} min.",
              "Every run is in runs/<setting>-s<seed>-<config hash>/ with its checkpoint and metrics.jsonl; "
              "running the same command again reuses finished runs and continues unfinished ones."]
    report = write_markdown(out / "report.md", experiment.title, header, rows, values, seed_list, sections,
                            [*plots, *extra_plots], unit="")
    atomic_write(out / "results.json", json.dumps({
        "experiment": experiment.name, "budget": budget_name, "budget_settings": _plain(budget), "seeds": seed_list,
        "values": values, "extras": {str(s): m.extras for s, m in measured.items()},
        "rows": [{"setting": r.claim.setting, "baseline": r.claim.baseline, "mean": r.mean, "std": r.std, "n": r.n,
                  "diff": None if r.diff is None else {"mean": r.diff.mean, "low": r.diff.low, "high": r.diff.high},
                  "paper": r.claim.paper, "reproduced": r.reproduced} for r in rows],
        "runs": {s.key: {"label": s.label, "seed": s.seed, "dir": str(default_folder(out)(s).relative_to(out))}
                 for s in specs},
    }, indent=2, default=str))
    result.counts = dict(runner.counts)
    result.rows, result.values, result.report, result.plots = rows, values, report, [*plots, *extra_plots]
    echo(f"report: {report}")
    return result


def _announce(experiment: Experiment, budget: Any, budget_name: str, seeds: int, specs: list[RunSpec], out: Path,
              echo: Callable[[str], None]) -> tuple[dict[str, float | None], float | None]:
    """Print the plan's size and estimated minutes; return each run's estimate and their total.

    ``seeds`` is the experiment's seed count: runs' own seeds are not, since an ensemble member trains
    with a seed of its own (fsp's shuffled teachers use seed + 1000 × member)."""
    estimates = {s.key: estimate_seconds(s, s.data.train_size or 60000, s.data.test_size or 10000, budget.pixels)
                 for s in specs}
    todo = [s for s in specs if run_status(s, out) != "done"]
    total = None if any(estimates[s.key] is None for s in specs) else sum(estimates[s.key] for s in specs)
    remaining = None if any(estimates[s.key] is None for s in todo) else sum(estimates[s.key] for s in todo)
    echo(f"{experiment.title} — budget {budget_name}, {seeds} seed(s): {len(specs)} runs "
         f"({len(specs) - len(todo)} already done). Estimated {format_minutes(remaining)} min to go "
         f"({format_minutes(total)} min for all runs; one CPU thread, from measured per-image costs; "
         "a GPU is far faster). Output: " + str(out))
    return estimates, total


def _plain(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(value) if is_dataclass(value) else value
