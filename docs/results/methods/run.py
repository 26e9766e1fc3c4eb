"""Every method on one fixed small budget (issue 3): ResNet-26 teacher -> ResNet-8 student, recipe
`fsp` with a 4,000-image training subset and a 5,000-image test subset, the same seeds for all; writes README.md beside this file.

    python docs/results/methods/run.py [--seeds 0 1] [--out runs/methods]

Each method runs with `distillery distill --method NAME`; runs already finished are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ["hinton", "logits", "ensemble", "label_smoothing", "fitnets", "fsp", "tfkd_self", "tfkd_reg"]
BUDGET = ["--set", "data.train_subset=4000", "--set", "data.test_subset=5000"]


def cli(*args: str) -> None:
    cmd = [sys.executable, "-m", "distillery", *args, "--no-progress"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def final_accuracy(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="runs/methods")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.time()
    results: dict[str, list[float]] = {}
    teachers = {}
    for seed in args.seeds:
        common = ["--config", "fsp", *BUDGET, "--set", f"seed={seed}", "--set", f"output_dir={out}/s{seed}"]
        cli("train", "--role", "teacher", *common)
        cli("train", "--role", "student", *common)
        teachers[seed] = out / f"s{seed}/fsp/teacher/checkpoint.pt"
    for seed in args.seeds:
        base = out / f"s{seed}/fsp"
        results.setdefault("teacher (resnet26)", []).append(final_accuracy(base / "teacher"))
        results.setdefault("student alone (resnet8)", []).append(final_accuracy(base / "student_alone"))
        for method in METHODS:
            common = ["--config", "fsp", *BUDGET, "--set", f"seed={seed}", "--set", f"output_dir={out}/s{seed}",
                      "--set", f"name=fsp-{method}"]
            if method == "ensemble":  # the teachers of all seeds, this seed's first
                teacher = [str(teachers[seed])] + [str(t) for s, t in teachers.items() if s != seed]
            elif method == "tfkd_self":
                teacher = [str(base / "student_alone/checkpoint.pt")]
            else:
                teacher = [str(teachers[seed])]
            cli("distill", "--method", method, "--teacher", *teacher, *common)
            results.setdefault(method, []).append(final_accuracy(out / f"s{seed}/fsp-{method}/student_distilled"))
    alone = results["student alone (resnet8)"]
    rows = ["| run | test accuracy % (mean over seeds) | per seed | minus alone (mean) |", "|---|---|---|---|"]
    for name, accs in results.items():
        diff = statistics.mean(a - b for a, b in zip(accs, alone)) if "teacher" not in name else float("nan")
        rows.append(f"| {name} | {100 * statistics.mean(accs):.2f} | {' / '.join(f'{100 * a:.2f}' for a in accs)} "
                    f"| {'' if diff != diff else f'{100 * diff:+.2f}'} |")
    text = (f"# Every method on one small budget\n\nRecipe `fsp` (ResNet-26 teacher, ResNet-8 student, Fashion-MNIST), "
            f"training subset of 4,000 images, test subset of 5,000 images; seeds {args.seeds}; made by "
            f"`python docs/results/methods/run.py --seeds {' '.join(map(str, args.seeds))}` in "
            f"{(time.time() - started) / 60:.0f} min on 2 CPU cores.\n\n" + "\n".join(rows) + "\n")
    Path(__file__).with_name("README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
