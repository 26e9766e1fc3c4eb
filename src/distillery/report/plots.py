"""Plots (PNG): learning curves of runs, forest plots of paired differences, and saving a figure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from distillery.stats import PairedDifference  # noqa: E402


def plot_learning_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path,
                         title: str = "") -> Path:
    """Test accuracy and test cross-entropy per epoch, one line per run, final values annotated.

    Both panels measure every model the same way on the test split (a distilled student's training
    loss holds its method's other terms and is not comparable with the others' cross-entropy).
    Returns the PNG's path.
    """
    path = Path(path)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for label, history in histories.items():
        if not history:
            continue
        epochs = list(range(1, len(history) + 1))
        for ax, values, text in ((ax_acc, [100 * r["test_accuracy"] for r in history], "{:.2f} %"),
                                 (ax_loss, [r["test_loss"] for r in history], "{:.3f}")):
            line, = ax.plot(epochs, values, marker="o", ms=3, label=label)
            ax.annotate(text.format(values[-1]), (epochs[-1], values[-1]), textcoords="offset points",
                        xytext=(4, 0), fontsize=8, color=line.get_color(), va="center")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="test cross-entropy", title="test cross-entropy (every model alike)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Lay out, write (110 dpi, the folder made if missing) and close ``fig``; returns its path."""
    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_forest(labels: Sequence[str], differences: Sequence[PairedDifference], colours: Sequence[str],
                path: str | Path, title: str, xlabel: str, fontsize: int = 8) -> Path:
    """Each difference's mean (a dot) with its 95 % interval (a line, when there is one), one row
    per label in the given colour, against a line at zero: a forest plot."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.6))
    for i, (d, colour) in enumerate(zip(differences, colours)):
        if d.has_interval:
            ax.plot([d.low, d.high], [i, i], color=colour, lw=2)
        ax.plot(d.mean, i, "o", color=colour)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=fontsize)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)
