"""Learning-curve plots (PNG) from the per-epoch metrics of runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
