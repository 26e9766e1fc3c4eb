"""Copy the reports of the runs behind this folder's README into it (not their runs or study), then
print the README's table from the copied results.json files.

    python docs/results/tune/collect.py /tmp/tune    # the output_dir the runs used

Per recipe ``<pair>.yaml``: the hinton search goes to ``<pair>/``, every other method's search
(``tune --method NAME``) to ``<pair>/<NAME>/``, and a ``compare`` run to ``<pair>/compare/``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
KEPT = ("report.md", "results.json", "best.yaml", "history.png", "importances.png", "confirmation.png",
        "forest.png")


def copy_reports(run: Path, target: Path) -> None:
    """The files of ``KEPT`` that ``run`` holds, copied into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (run / name).exists():
            shutil.copyfile(run / name, target / name)
    print(f"{run} -> {target}")


def main(root: Path) -> None:
    for recipe in sorted(HERE.glob("*.yaml")):
        runs = root / yaml.safe_load(recipe.read_text())["name"]
        if not runs.is_dir():
            print(f"{recipe.stem}: no runs in {runs}")
            continue
        for search in sorted(runs.glob("tune-*")):
            method = search.name.removeprefix("tune-")
            copy_reports(search, HERE / recipe.stem / ("" if method == "hinton" else method))
        if (runs / "compare").is_dir():
            copy_reports(runs / "compare", HERE / recipe.stem / "compare")


def accuracy(rows: list[dict]) -> str:
    """Mean ± standard deviation over seeds, in %."""
    values = [100 * r["accuracy"] for r in rows]
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def difference(contender: dict) -> str:
    d = contender["difference_points"]
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def table_row(pair: str, method: str, results: dict) -> str:
    """pair | method | teacher | alone (best's settings) | tuned | Δ | alone (recipe's) | Δ | verdict | trials |
    the trials' summed minutes."""
    same, recipe = results["confirmation"], results.get("confirmation_recipe_settings")
    tuned = same["contenders"][0]
    cells = [pair, method, f"{100 * same['teacher_accuracy']:.2f}" if same["teacher_accuracy"] else "—",
             accuracy(same["student_alone"]), accuracy(tuned["seeds"]), difference(tuned),
             accuracy(recipe["student_alone"]) if recipe else "(same)",
             difference(recipe["contenders"][0]) if recipe else "(same)",
             f"**{results.get('verdict') or tuned['outcome']}**", str(len(results["trials"])),
             f"{sum(t.get('seconds') or 0 for t in results['trials']) / 60:.1f}"]
    return "| " + " | ".join(cells) + " |"


def print_table() -> None:
    print("| pair | method | teacher % | alone, best's lr % | tuned % | tuned − alone [95 % CI] "
          "| alone, recipe's lr % | tuned − alone [95 % CI] | verdict | trials | search min |")
    print("|---" * 11 + "|")
    for recipe in sorted(HERE.glob("*.yaml")):
        for results in sorted((HERE / recipe.stem).glob("**/results.json")):
            method = results.parent.name if results.parent.name != recipe.stem else "hinton"
            data = json.loads(results.read_text())
            if "trials" in data and data.get("confirmation"):
                print(table_row(recipe.stem, method, data))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))
    print_table()
