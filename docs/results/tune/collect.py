"""Copy the reports of the tune runs behind this folder's README into it (not their runs or study).

    python docs/results/tune/collect.py /tmp/tune    # the output_dir the runs used
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
KEPT = ("report.md", "results.json", "best.yaml", "history.png", "importances.png", "confirmation.png")


def main(root: Path) -> None:
    for recipe in sorted(HERE.glob("*.yaml")):
        run = root / yaml.safe_load(recipe.read_text())["name"] / "tune-hinton"
        if not run.is_dir():
            print(f"{recipe.stem}: no run in {run}")
            continue
        target = HERE / recipe.stem
        target.mkdir(exist_ok=True)
        for name in KEPT:
            if (run / name).exists():
                shutil.copyfile(run / name, target / name)
        print(f"{recipe.stem}: copied to {target}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))
