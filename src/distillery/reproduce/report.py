"""The report of a reproduction: one table of settings against their baselines, per-seed values, plots.

Each row is a :class:`Claim`: a setting, the baseline it is compared with (or none, for reference
rows such as the baseline itself), what the paper reports and the direction it claims. The table
gives the setting's mean ± std over seeds, the mean paired difference to the baseline with its
95 % t interval, and whether the paper's direction is reproduced here (:func:`stats.verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from distillery.fsio import atomic_write
from distillery.report.plots import plot_forest, save_figure  # noqa: E402
from distillery.stats import PairedDifference, format_diff, mean_std, paired_difference, verdict  # noqa: E402

Values = Mapping[str, Sequence[float]]  # setting -> one value per seed (seed order)


@dataclass(frozen=True)
class Claim:
    """A row of the table: ``setting`` (vs ``baseline``, if any), the paper's figure and claimed direction.

    ``direction`` is +1 when the paper says the setting beats the baseline (−1: falls below it);
    None for a reference row without a comparison.
    """

    setting: str
    baseline: str | None = None
    paper: str = ""
    direction: int | None = None


@dataclass(frozen=True)
class Row:
    claim: Claim
    mean: float
    std: float
    n: int
    diff: PairedDifference | None
    reproduced: str


def build_rows(claims: Sequence[Claim], values: Values) -> list[Row]:
    """The table rows; every setting and baseline a claim names must have values."""
    rows = []
    for claim in claims:
        for name in (claim.setting, claim.baseline):
            if name is not None and name not in values:
                raise KeyError(f"no values for setting {name!r} (have: {', '.join(values)})")
        setting = list(values[claim.setting])
        mean, std = mean_std(setting)
        diff, reproduced = None, "—"
        if claim.baseline is not None:
            diff = paired_difference(setting, list(values[claim.baseline]))
            reproduced = verdict(diff, claim.direction) if claim.direction is not None else "—"
        rows.append(Row(claim, mean, std, len(setting), diff, reproduced))
    return rows


def markdown_table(rows: Sequence[Row], unit: str = "") -> str:
    header = ["setting", "mean ± std", "baseline", "Δ vs baseline [95 % CI]", "paper", "reproduced here"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for row in rows:
        c = row.claim
        lines.append("| " + " | ".join([
            c.setting, f"{row.mean:.2f} ± {row.std:.2f}{unit}", c.baseline or "—", format_diff(row.diff, unit),
            c.paper or "—", row.reproduced,
        ]) + " |")
    return "\n".join(lines) + "\n"


def per_seed_table(values: Values, seeds: Sequence[int]) -> str:
    header = ["setting", *[f"seed {s}" for s in seeds]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for name, vals in values.items():
        lines.append("| " + " | ".join([name, *[f"{v:.2f}" for v in vals]]) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, title: str, header: Sequence[str], rows: Sequence[Row], values: Values,
                   seeds: Sequence[int], sections: Sequence[tuple[str, str]], plots: Sequence[Path],
                   unit: str = "") -> Path:
    """report.md: header lines, the claims table, extra sections, per-seed values, the plots."""
    parts = [f"# {title}\n", "\n".join(f"- {line}" for line in header) + "\n",
             "## Results\n",
             f"Test accuracy in % (Δ in percentage points). Mean ± std over {len(seeds)} seed(s); Δ is the mean "
             "of the per-seed differences to the baseline "
             "(paired: same seed, same data subset) with a 95 % Student-t interval; 'reproduced here' is yes when "
             "the interval lies wholly on the side the paper claims, no when wholly on the other side, "
             "inconclusive when it spans 0.\n",
             markdown_table(rows, unit)]
    for heading, text in sections:
        parts += [f"## {heading}\n", text.rstrip() + "\n"]
    parts += ["## Per-seed values\n", per_seed_table(values, seeds)]
    if plots:
        parts.append("## Plots\n")
        parts += [f"![{p.stem}]({p.name})\n" for p in plots]
    atomic_write(path, "\n".join(parts))
    return path


# ------------------------------------------------------------------ plots


def plot_settings(values: Values, path: Path, title: str, ylabel: str = "test accuracy (%)") -> Path:
    """Mean ± std of every setting as a bar, each seed's value as a dot."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4.5))
    for i, name in enumerate(names):
        vals = list(values[name])
        mean, std = mean_std(vals)
        ax.bar(i, mean, yerr=std, color="#9ab", capsize=4)
        ax.plot([i] * len(vals), vals, "o", color="#234", ms=3)
    finite = [v for vals in values.values() for v in vals if math.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        pad = max(0.5, 0.15 * (high - low))
        ax.set_ylim(max(0, low - pad), min(100, high + pad) if high <= 100 else high + pad)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_differences(rows: Sequence[Row], path: Path, title: str, unit: str = "points") -> Path:
    """Each comparison's mean difference to its baseline with its 95 % interval (a forest plot)."""
    compared = [r for r in rows if r.diff is not None]
    return plot_forest([f"{r.claim.setting}\nvs {r.claim.baseline}" for r in compared], [r.diff for r in compared],
                       [{"yes": "#2a7", "no": "#c33"}.get(r.reproduced, "#888") for r in compared], path, title,
                       f"difference to baseline ({unit}; 95 % CI; green: paper's direction reproduced)", fontsize=7)


def plot_curves(curves: Mapping[str, Sequence[Sequence[tuple[float, float]]]], path: Path, title: str,
                xlabel: str, ylabel: str = "test accuracy (%)") -> Path:
    """Mean curve over seeds (band: min–max) per label; ``curves[label]`` holds one [(x, y), ...] per seed."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, per_seed in curves.items():
        per_seed = [c for c in per_seed if c]
        if not per_seed:
            continue
        length = min(len(c) for c in per_seed)
        xs = [per_seed[0][k][0] for k in range(length)]
        ys = [[c[k][1] for c in per_seed] for k in range(length)]
        ax.plot(xs, [sum(y) / len(y) for y in ys], marker="o", ms=3, label=label)
        if len(per_seed) > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_lines(series: Mapping[str, Mapping[float, Sequence[float]]], path: Path, title: str, xlabel: str,
               references: Mapping[str, Sequence[float]] | None = None, log_x: bool = False,
               ylabel: str = "test accuracy (%)") -> Path:
    """Mean ± std of each series against x (e.g. accuracy vs temperature); ``references`` as
    horizontal lines with a ± std band."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_x in series.items():
        xs = sorted(by_x)
        stats = [mean_std(list(by_x[x])) for x in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)
    for k, (label, vals) in enumerate((references or {}).items()):
        mean, std = mean_std(list(vals))
        line = ax.axhline(mean, ls="--", color=f"C{k + len(series)}", label=f"{label} ({mean:.2f})")
        ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.12)
    if log_x:
        ax.set_xscale("log")
        xs_all = sorted({x for by_x in series.values() for x in by_x})
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
