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
import statistics
import subprocess
import sys
import time
from pathlib import Path

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
    for seed in args.seeds:
        common = ["--config", str(BUDGET), "--set", f"seed={seed}", "--set", f"output_dir={out}/s{seed}"]
        cli("train", "--role", "teacher", *common, threads=args.threads)
        cli("train", "--role", "student", *common, threads=args.threads)
        teachers[seed] = out / f"s{seed}/methods/teacher/checkpoint.pt"
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        base = out / f"s{seed}/methods"
        results.setdefault("teacher (cnn)", []).append(final_accuracy(base / "teacher"))
        results.setdefault("student alone (resnet8)", []).append(final_accuracy(base / "student_alone"))
        for method in METHODS:
            if method == "ensemble":  # the teachers of all seeds, this seed's first
                teacher = [str(teachers[seed])] + [str(t) for s, t in teachers.items() if s != seed]
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
    rows = ["| run | test accuracy % (mean) | per seed | minus alone, per seed | minus alone (mean) |",
            "|---|---|---|---|---|"]
    for name, accs in results.items():
        row = f"| {name} | {100 * statistics.mean(accs):.2f} | {' / '.join(f'{100 * a:.2f}' for a in accs)} |"
        if name.startswith("student alone"):
            row += " | |"
        else:
            diffs = [100 * (a - b) for a, b in zip(accs, alone)]
            row += f" {' / '.join(f'{d:+.2f}' for d in diffs)} | {statistics.mean(diffs):+.2f} |"
        rows.append(row)
    text = (f"# Every method on one small budget\n\nBudget [`budget.yaml`](budget.yaml): CNN teacher (width 16, "
            "30 epochs) and ResNet-8 student (20 epochs; FitNets and FSP first run 5 epochs of their stage 1), "
            "both on the same 4,000 Fashion-MNIST training images "
            "with crop and flip, tested on 5,000 test images; every method with its default parameters "
            f"(`distillery methods` lists them); seeds {', '.join(map(str, seeds))}. Made by "
            f"`python docs/results/methods/run.py --seeds {' '.join(map(str, seeds))}` "
            f"({seconds / 60:.0f} min for this invocation; finished runs are reused).\n\n" + "\n".join(rows) + "\n")
    Path(__file__).with_name("README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
