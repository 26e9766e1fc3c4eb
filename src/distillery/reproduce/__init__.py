"""Reproductions of the papers' experiments: ``distillery reproduce hinton|fsp|tfkd|little_data``.

Each experiment trains its settings over several seeds (every run cached in its own folder, keyed
by a hash of its full configuration), then writes ``report.md`` (mean ± std per setting, the
paired difference to its baseline with a 95 % interval, the paper's claim and whether its direction
is reproduced) and PNG plots. See docs/reproduce.md.
"""

from __future__ import annotations

from distillery.reproduce import fsp, hinton, little_data, tfkd
from distillery.reproduce.experiment import Env, Experiment, ExperimentResult, run_experiment

EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (hinton.EXPERIMENT, fsp.EXPERIMENT, tfkd.EXPERIMENT,
                                                         little_data.EXPERIMENT)}


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


__all__ = ["EXPERIMENTS", "Env", "Experiment", "ExperimentResult", "get_experiment", "run_experiment"]
