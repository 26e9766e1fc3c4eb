"""Copy the defaults experiment's compare reports here and print its table.

    python docs/results/tune/defaults/summarize.py /tmp/defaults   # the --out folders' parent

Each pair's ``compare`` run puts Hinton KD at the shipped defaults (row ``hinton``) beside the
candidates in this folder (``kd0.3``, ``kd0.4``: other soft weights at the same T; ``paper``: the
paper preset), ten seeds each. The table gives every row's paired difference to the student alone
and to the shipped default, per pair, and the mean over pairs of the difference to the student alone.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from distillery.stats import PairedDifference, format_diff, paired_difference

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from collect import copy_reports  # noqa: E402  (the tune folder's script, beside this folder)

DEFAULT = "hinton"


def accuracies(rows: list[dict]) -> list[float]:
    """Per-seed test accuracy in points, in seed order."""
    return [100 * r["accuracy"] for r in sorted(rows, key=lambda r: r["seed"])]


def pair_rows(results: dict) -> list[tuple[str, str, str, float]]:
    """(label, Δ vs alone, Δ vs the shipped default, mean Δ vs alone) for each contender of one pair;
    Δ vs alone is compare's own, Δ vs the default is paired by seed here."""
    default = next(accuracies(c["seeds"]) for c in results["contenders"] if c["label"] == DEFAULT)
    rows = []
    for contender in results["contenders"]:
        vs_alone = PairedDifference(**contender["difference_points"])
        vs_default = ("—" if contender["label"] == DEFAULT
                      else format_diff(paired_difference(accuracies(contender["seeds"]), default)))
        rows.append((contender["label"], format_diff(vs_alone), vs_default, vs_alone.mean))
    return rows


def main(root: Path) -> None:
    for pair in sorted(p for p in HERE.iterdir() if p.is_dir()):
        copy_reports(root / pair.name, pair)
    print("| pair | run | Δ vs alone, points [95 % CI] | Δ vs default (0.5 / 0.5) [95 % CI] |")
    print("|---|---|---|---|")
    per_label: dict[str, list[float]] = {}
    for results_file in sorted(HERE.glob("*/results.json")):
        for label, vs_alone, vs_default, mean in pair_rows(json.loads(results_file.read_text())):
            print(f"| {results_file.parent.name} | {label} | {vs_alone} | {vs_default} |")
            per_label.setdefault(label, []).append(mean)
    print()
    for label, means in per_label.items():
        print(f"{label}: mean Δ vs alone over {len(means)} pairs {statistics.mean(means):+.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
