"""Hinton, Vinyals & Dean (2015), section 6: soft targets let a student learn from far less data.

The paper's speech model trained on 3 % of the data with hard labels overfitted badly and, stopped
early, reached 44.5 % frame accuracy; the same model trained on the same 3 % with the full model's
soft targets reached 57.0 % without early stopping, close to the 58.9 % of hard labels on all the
data. Here, per seed:

- one teacher trained on the whole training split less a validation slice (the same teacher for
  every seed: it is what is being learnt from, not what is compared);
- the student trained on ``fractions`` of the training split (a random subset per seed) with hard
  labels (cross-entropy) and with the teacher's soft targets only (``hinton`` with
  ce_weight 0: L = T²·KL(q_teacher^T ‖ q_student^T));
- the student trained on all the data with hard labels.

Every run evaluates ``val_size`` held-out training images after each epoch; a run's *best-epoch*
accuracy is its test accuracy at the epoch of its highest validation accuracy (early stopping,
as the paper did for the hard-label model), its *last-epoch* accuracy the test accuracy at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillery.config import describe_model
from distillery.reproduce.experiment import Env, Experiment, Measured
from distillery.reproduce.report import Claim, Row, plot_lines
from distillery.reproduce.runs import DataSpec, ExperimentRunner, RunSpec, TeacherRef, run_spec, stage

TRAIN_SPLIT = 60000  # Fashion-MNIST's training split: the fractions are of this
ALL = "all the data, hard labels"  # the student on the whole training split less the validation slice


@dataclass(frozen=True)
class LittleDataBudget:
    fractions: tuple[float, ...]
    epochs: tuple[int, ...]
    """Epochs of the students on each fraction: smaller subsets get more epochs, so that every
    student has a comparable number of steps and the hard-label ones have time to overfit."""
    full_epochs: int
    teacher_epochs: int
    val_size: int = 5000
    test_size: int | None = None
    teacher: dict[str, Any] = field(default_factory=lambda: {"name": "cnn", "kwargs": {"width": 16, "fc_width": 128}})
    student: dict[str, Any] = field(default_factory=lambda: {"name": "mlp", "kwargs": {"hidden": [800, 800]}})
    temperature: float = 4.0
    lr: float = 0.05
    weight_decay: float = 5e-4
    batch_size: int = 128
    split_size: int = TRAIN_SPLIT
    dataset: str = "fashion_mnist"
    pixels: int = 28 * 28

    def __post_init__(self) -> None:
        if len(self.fractions) != len(self.epochs):
            raise ValueError(f"one epoch count per fraction: {len(self.fractions)} fractions, {len(self.epochs)} "
                             "epoch counts")

    def size(self, fraction: float) -> int:
        return max(1, round(fraction * self.split_size))


BUDGETS = {
    # ~35 min on one CPU thread for 5 seeds: the teacher once (~5 min), then ~6 min of students per seed.
    "quick": LittleDataBudget(fractions=(0.01, 0.03, 0.10), epochs=(100, 60, 30), full_epochs=15, teacher_epochs=10),
    # Paper-like length (a GPU): the same fractions, longer training, a ResNet teacher.
    "full": LittleDataBudget(fractions=(0.01, 0.03, 0.10), epochs=(400, 200, 100), full_epochs=60,
                             teacher_epochs=100, teacher={"name": "resnet20"}),
    "smoke": LittleDataBudget(fractions=(0.2, 0.5), epochs=(3, 2), full_epochs=1, teacher_epochs=2, val_size=40,
                              teacher={"name": "mlp", "kwargs": {"hidden": [32]}},
                              student={"name": "mlp", "kwargs": {"hidden": [16]}}, batch_size=32, split_size=200,
                              pixels=64),
}


def _train(budget: LittleDataBudget, epochs: int) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": budget.batch_size,
            "optimizer": {"name": "sgd", "lr": budget.lr, "momentum": 0.9, "nesterov": True,
                          "weight_decay": budget.weight_decay},
            "schedule": {"name": "cosine"}, "augment": {"crop_padding": 0, "hflip": False}}


def setting(fraction: float, targets: str) -> str:
    return f"{100 * fraction:g} % of the data, {targets}"


def plan(budget: LittleDataBudget, seed: int, env: Env) -> dict[str, RunSpec]:
    def data(size: int | None, split_seed: int) -> DataSpec:
        return DataSpec(budget.dataset, env.data_root, size, budget.val_size, budget.test_size, split_seed)

    teacher = run_spec("teacher", budget.teacher, (stage("ce", {}, _train(budget, budget.teacher_epochs)),),
                       data(budget.split_size - budget.val_size, 0), 0, device=env.device)
    full = data(budget.split_size - budget.val_size, seed)
    runs = {"teacher": teacher,
            ALL: run_spec("student, all the data, hard labels", budget.student,
                            (stage("ce", {}, _train(budget, budget.full_epochs)),), full, seed, device=env.device)}
    soft = {"temperature": budget.temperature, "kd_weight": 1.0, "ce_weight": 0.0}
    for fraction, epochs in zip(budget.fractions, budget.epochs):
        subset, train = data(budget.size(fraction), seed), _train(budget, epochs)
        runs[setting(fraction, "hard labels")] = run_spec(
            setting(fraction, "hard labels"), budget.student, (stage("ce", {}, train),), subset, seed,
            device=env.device)
        runs[setting(fraction, "soft targets")] = run_spec(
            setting(fraction, "soft targets"), budget.student, (stage("hinton", soft, train),), subset, seed,
            (TeacherRef(teacher),), device=env.device)
    return runs


def best_and_last(history: list[dict[str, Any]]) -> tuple[float, float, int]:
    """(test accuracy % at the epoch of the highest validation accuracy, at the last epoch, that epoch)."""
    best = max(range(len(history)), key=lambda k: (history[k]["val_accuracy"], -k))
    return 100 * history[best]["test_accuracy"], 100 * history[-1]["test_accuracy"], best + 1


def measure(budget: LittleDataBudget, runs: dict[str, RunSpec], runner: ExperimentRunner) -> Measured:
    values = {"teacher": runner.accuracy(runs["teacher"])}
    epochs: dict[str, int] = {}
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, spec in runs.items():
        if name == "teacher":
            continue
        history = runner.train(spec).history
        values[f"{name}: best epoch"], values[f"{name}: last epoch"], epochs[name] = best_and_last(history)
        curves[name] = [(k + 1, 100 * r["val_accuracy"]) for k, r in enumerate(history)]
    return Measured(values, {"best_epoch": epochs, "val_curves": curves})


def claims(budget: LittleDataBudget) -> list[Claim]:
    rows = [Claim("teacher", None, "reference: the teacher, trained on all the data"),
            Claim(f"{ALL}: best epoch", None, "speech, all the data, hard labels: 58.9 %")]
    for fraction in budget.fractions:
        hard, soft = setting(fraction, "hard labels"), setting(fraction, "soft targets")
        paper = ("speech, 3 %: soft targets 57.0 % (no early stopping) vs hard labels 44.5 % (stopped early)"
                 if abs(fraction - 0.03) < 1e-9 else "no figure at this fraction; the paper's claim is for 3 %")
        rows += [Claim(f"{hard}: best epoch", None, "the hard-label student, stopped at its best validation epoch"),
                 Claim(f"{soft}: last epoch", f"{hard}: best epoch", paper, +1),
                 Claim(f"{soft}: best epoch", f"{hard}: best epoch", "both stopped early (not in the paper)", +1),
                 Claim(f"{hard}: last epoch", f"{hard}: best epoch",
                       "the hard-label model overfits: its last epoch is below its best", -1),
                 Claim(f"{soft}: last epoch", f"{soft}: best epoch",
                       "soft targets need no early stopping (last epoch ≈ best; the paper says it 'simply converged')")]
    return rows


def header(budget: LittleDataBudget) -> list[str]:
    sizes = ", ".join(f"{100 * f:g} % = {budget.size(f):,} images ({e} epochs)"
                      for f, e in zip(budget.fractions, budget.epochs))
    return [
        f"Paper: Hinton, Vinyals & Dean 2015, section 6 (speech); here {budget.dataset}, so only the direction of "
        "each effect is compared, not the numbers.",
        f"Teacher: {describe_model(budget.teacher)}, {budget.teacher_epochs} epochs on "
        f"{budget.split_size - budget.val_size:,} training images (one teacher for every seed). Student: "
        f"{describe_model(budget.student)} on {sizes}, and on all {budget.split_size - budget.val_size:,} "
        f"images ({budget.full_epochs} epochs, hard labels). Each seed draws its own subsets.",
        f"Soft targets: the teacher's outputs at T = {budget.temperature:g} only (ce_weight 0, kd_weight 1). "
        f"Training: SGD (momentum 0.9, Nesterov, lr {budget.lr}, weight decay {budget.weight_decay}, cosine), "
        f"batch {budget.batch_size}, no augmentation.",
        f"Early stopping: every run evaluates {budget.val_size:,} held-out training images after each epoch; "
        "'best epoch' is the test accuracy at the epoch with the highest validation accuracy, 'last epoch' the "
        "test accuracy at the end. The test split never chooses anything.",
    ]


def finish(budget: LittleDataBudget, measured: dict[int, Measured], rows: list[Row], out: Path,
           ) -> tuple[list[Path], list[tuple[str, str]]]:
    seeds = sorted(measured)
    per = {name: [measured[s].values[name] for s in seeds] for name in measured[seeds[0]].values}
    series = {f"{targets}, {when} epoch": {100 * f: per[f"{setting(f, targets)}: {when} epoch"]
                                          for f in budget.fractions}
              for targets in ("hard labels", "soft targets") for when in ("best", "last")}
    plot = plot_lines(series, out / "accuracy_vs_data.png", "Soft targets vs hard labels with little data",
                      "share of the training split (%)", log_x=True,
                      references={ALL: per[f"{ALL}: best epoch"],
                                  "teacher": per["teacher"]})
    lines = [f"- {label}: " + ", ".join(str(measured[s].extras["best_epoch"][label]) for s in seeds)
             for label in measured[seeds[0]].extras["best_epoch"]]
    text = ("The epoch each run's validation accuracy peaked at, per seed (of its "
            f"{', '.join(map(str, budget.epochs))} epochs on the fractions, {budget.full_epochs} on all the data):\n\n"
            + "\n".join(lines) + "\n")
    return [plot], [("Best epochs", text)]


EXPERIMENT = Experiment(
    name="little_data", title="Hinton et al. 2015: soft targets let a student learn from little data",
    budgets=BUDGETS, plan=plan, measure=measure, claims=claims, header=header, finish=finish,
)
