"""Every method on one fixed small budget (issue 3); writes README.md beside this file.

    python docs/results/methods/run.py [--seeds 0 1] [--out runs/methods] [--threads 1]

The budget is budget.yaml beside this file: a CNN teacher and a ResNet-8 student, both trained
on the same 4,000 Fashion-MNIST images, tested on 5,000. Every method runs with
`distillery distill --method NAME` and its default parameters; the only additions are the layer
names the feature methods need for this pair of networks (METHOD_SETTINGS). Finished runs are
reused and interrupted ones resumed, so the table continues where it stopped; to use two cores,
run `--seeds 0` and `--seeds 1` side by side with `--threads 1`, then `--seeds 0 1` for the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distillery.stats import mean_std, paired_difference

BUDGET = Path(__file__).with_name("budget.yaml")
METHODS = ["hinton", "logits", "ensemble", "label_smoothing", "fitnets", "fsp", "tfkd_self", "tfkd_reg"]
# The CNN teacher's 16- and 32-channel maps are stage1.0 (28×28), stage1 (14×14) and stage2 (7×7);
# the ResNet-8's are stem and stage1 (28×28) and stage2 (14×14). FSP pairs them by channel count
# (each FSP matrix is 16×16 or 16×32 on both sides); FitNets' default stage2 → stage2 hint fits as it is.
# Their stage 1 (hints, FSP) runs 5 epochs before the 20 of stage 2.
STAGE1_EPOCHS = ["--set", "distill.stages.0.train.epochs=5"]
METHOD_SETTINGS = {
    "fsp": ["--set", "distill.stages.0.method.pairs=[[stem, stage1], [stage1, stage2]]",
            "--set", "distill.stages.0.method.teacher_pairs=[[stage1.0, stage1], [stage1, stage2]]", *STAGE1_EPOCHS],
    "fitnets": STAGE1_EPOCHS,
}


def cli(*args: str, threads: int) -> None:
    cmd = [sys.executable, "-m", "distillery", *args, "--no-progress", "--resume"]
    print("$", " ".join(["distillery", *args]), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def final_accuracy(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="runs/methods")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of every run")
    args = parser.parse_args()
    out = Path(args.out)
    started = time.time()
    teachers: dict[int, Path] = {}
    second_teachers: dict[int, Path] = {}  # the ensemble's other member: same budget, seed + 1000
    for seed in args.seeds:
        common = ["--config", str(BUDGET), "--set", f"seed={seed}", "--set", f"output_dir={out}/s{seed}"]
        cli("train", "--role", "teacher", *common, threads=args.threads)
        cli("train", "--role", "student", *common, threads=args.threads)
        cli("train", "--role", "teacher", "--config", str(BUDGET), "--set", f"seed={seed + 1000}",
            "--set", f"output_dir={out}/s{seed}-second-teacher", threads=args.threads)
        teachers[seed] = out / f"s{seed}/methods/teacher/checkpoint.pt"
        second_teachers[seed] = out / f"s{seed}-second-teacher/methods/teacher/checkpoint.pt"
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        base = out / f"s{seed}/methods"
        results.setdefault("teacher (cnn)", []).append(final_accuracy(base / "teacher"))
        results.setdefault("second teacher (ensemble member)", []).append(
            final_accuracy(second_teachers[seed].parent))
        results.setdefault("student alone (resnet8)", []).append(final_accuracy(base / "student_alone"))
        for method in METHODS:
            if method == "ensemble":  # this seed's teacher and a second one trained alike
                teacher = [str(teachers[seed]), str(second_teachers[seed])]
            elif method == "tfkd_self":  # the student's own architecture, trained alone with this seed
                teacher = [str(base / "student_alone/checkpoint.pt")]
            else:
                teacher = [str(teachers[seed])]
            cli("distill", "--method", method, "--teacher", *teacher, "--config", str(BUDGET),
                "--set", f"seed={seed}", "--set", f"output_dir={out}/s{seed}", "--set", f"name=methods-{method}",
                *METHOD_SETTINGS.get(method, []), threads=args.threads)
            results.setdefault(method, []).append(final_accuracy(out / f"s{seed}/methods-{method}/student_distilled"))
    write_table(results, args.seeds, time.time() - started)


def write_table(results: dict[str, list[float]], seeds: list[int], seconds: float) -> None:
    alone = results["student alone (resnet8)"]
    rows = ["| run | test accuracy % (mean ± std) | per seed | minus alone, per seed | minus alone [95 % CI] |",
            "|---|---|---|---|---|"]
    for name, accs in results.items():
        mean, std = mean_std([100 * a for a in accs])
        row = f"| {name} | {mean:.2f} ± {std:.2f} | {' / '.join(f'{100 * a:.2f}' for a in accs)} |"
        if name.startswith("student alone"):
            row += " | |"
        else:
            diff = paired_difference([100 * a for a in accs], [100 * b for b in alone])
            interval = f" [{diff.low:+.2f}, {diff.high:+.2f}]" if diff.has_interval else ""
            row += (f" {' / '.join(f'{100 * (a - b):+.2f}' for a, b in zip(accs, alone))} |"
                    f" {diff.mean:+.2f}{interval} |")
        rows.append(row)
    text = (f"# Every method on one small budget\n\nBudget [`budget.yaml`](budget.yaml): CNN teacher (width 16, "
            "30 epochs) and ResNet-8 student (20 epochs; FitNets and FSP first run 5 epochs of their stage 1), "
            "both on the same 4,000 Fashion-MNIST training images "
            "with crop and flip, tested on 5,000 test images; every method with its default parameters "
            "(`distillery methods` lists them); `ensemble` averages the seed's teacher and a second one trained "
            "alike (seed + 1000), `tfkd_self` learns from the seed's student alone; seeds "
            f"{', '.join(map(str, seeds))}. Made by "
            f"`python docs/results/methods/run.py --seeds {' '.join(map(str, seeds))}` "
            f"({seconds / 60:.0f} min for this invocation; finished runs are reused). The interval is a Student-t "
            "interval of the per-seed differences (paired: same seed, same initial weights and batch order).\n\n"
            + "\n".join(rows) + "\n")
    Path(__file__).with_name("README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
