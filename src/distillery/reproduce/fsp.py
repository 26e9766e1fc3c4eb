"""Yim et al. (CVPR 2017), "A gift from knowledge distillation": FSP matrices.

Per seed, with a teacher ResNet A and a shallower ResNet B of the same stage widths:

- fast optimisation: A trained alone for ``teacher_epochs`` (the teacher, and the reference
  curve); a fresh A initialised by FSP stage 1 (``stage1_epochs``, AdamW, no augmentation, the
  teacher's matrices stored once) then trained on the task for a third of the teacher's epochs
  (stage 2, cross-entropy); the same A trained alone for that third (the control). Accuracy
  against training iterations is plotted for all three.
- network minimisation: B trained alone for ``small_epochs``; B with FitNets (stage 1 hints
  stage2 → stage2, stage 2 KD at τ = 3 for ``small_epochs``); B with FSP (stage 1, then
  ``small_epochs`` of cross-entropy).
- ensembles: ``ensemble_size`` students like the fast-optimisation one, each fitting differently
  shuffled teacher matrices (``shuffle_seed`` 1, 2, ...; other initial weights), against the
  ensemble of ``ensemble_size`` independently trained A's (the teacher and more like it).

FSP pairs: (stem, stage1), (stage1, stage2), (stage2, stage3), equal weights, as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillery.config import describe_model
from distillery.methods.features import STAGE1_OPTIMIZER
from distillery.reproduce.experiment import Env, Experiment, Measured
from distillery.reproduce.report import Claim, Row, plot_curves
from distillery.reproduce.runs import DataSpec, ExperimentRunner, RunSpec, TeacherRef, run_spec, stage
from distillery.spec import StageSpec
from distillery.train import evaluate_ensemble, resolve_device


@dataclass(frozen=True)
class FSPBudget:
    train_size: int | None
    test_size: int | None
    teacher_epochs: int
    stage1_epochs: int
    small_epochs: int
    teacher: dict[str, Any] = field(default_factory=lambda: {"name": "resnet14"})
    student: dict[str, Any] = field(default_factory=lambda: {"name": "resnet8"})
    ensemble_size: int = 3
    augment: dict[str, Any] = field(default_factory=lambda: {"crop_padding": 2, "hflip": True})
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    store_teacher: bool = True
    dataset: str = "fashion_mnist"
    pixels: int = 28 * 28

    @property
    def fast_epochs(self) -> int:
        """Stage-2 epochs of the fast-optimisation students: a third of the teacher's (at least 1)."""
        return max(1, round(self.teacher_epochs / 3))


BUDGETS = {
    # Long enough for the teacher and the students to saturate (the premise of "a third of the
    # iterations"): 2,000 images, 30 teacher epochs; about 90 min on one CPU thread for 3 seeds.
    "quick": FSPBudget(train_size=2000, test_size=2000, teacher_epochs=30, stage1_epochs=2, small_epochs=30),
    # Paper-like (a GPU): ResNet-26 → ResNet-8 (the paper's CIFAR-10 pair), all data, ~64k teacher iterations.
    "full": FSPBudget(train_size=None, test_size=None, teacher_epochs=150, stage1_epochs=10, small_epochs=150,
                      teacher={"name": "resnet26"}, store_teacher=False),
    "smoke": FSPBudget(train_size=96, test_size=None, teacher_epochs=3, stage1_epochs=1, small_epochs=1,
                       ensemble_size=2, augment={"crop_padding": 1, "hflip": False}, batch_size=32, pixels=64),
}


def _train(budget: FSPBudget, epochs: int, augment: bool = True, optimizer: dict | None = None) -> dict[str, Any]:
    opt = optimizer or {"name": "sgd", "lr": budget.lr, "momentum": 0.9, "weight_decay": budget.weight_decay}
    return {"epochs": epochs, "batch_size": budget.batch_size, "optimizer": opt, "schedule": {"name": "cosine"},
            "augment": budget.augment if augment else {"crop_padding": 0, "hflip": False}}


def _stage1(budget: FSPBudget, method: str, params: dict[str, Any]) -> StageSpec:
    return stage(method, params, _train(budget, budget.stage1_epochs, augment=False, optimizer=STAGE1_OPTIMIZER))


def _fsp(budget: FSPBudget, shuffle_seed: int | None = None) -> StageSpec:
    return _stage1(budget, "fsp", {"store_teacher": budget.store_teacher, "shuffle_seed": shuffle_seed})


# The FitNets baseline as Yim et al. ran it: stage 2 is KD at τ = 3 with the soft term's weight
# annealed linearly from 4 to 1, beside the full cross-entropy.
FITNETS_KD = {"temperature": 3.0, "kd_weight_schedule": (4.0, 1.0), "ce_weight": 1.0}

TEACHER = "teacher (full iterations)"
FAST = "FSP student, 1/3 iterations"
FAST_ALONE = "same net alone, 1/3 iterations"
SMALL = {"alone": "small net alone", "fitnets": "small net FitNets", "fsp": "small net FSP"}


def ensemble_names(budget: FSPBudget) -> tuple[str, str]:
    m = budget.ensemble_size
    return f"ensemble of {m} shuffled-FSP students", f"ensemble of {m} independent nets"


def plan(budget: FSPBudget, seed: int, env: Env) -> dict[str, RunSpec]:
    data = DataSpec(budget.dataset, env.data_root, budget.train_size, 0, budget.test_size, seed)
    big, small = budget.teacher, budget.student

    def run(label: str, model: dict, stages: tuple[StageSpec, ...], teachers: tuple[TeacherRef, ...] = (),
            run_seed: int = seed) -> RunSpec:
        return run_spec(label, model, stages, data, run_seed, teachers, device=env.device)

    full, third = _train(budget, budget.teacher_epochs), _train(budget, budget.fast_epochs)
    teacher = run("teacher", big, (stage("ce", {}, full),))
    t = (TeacherRef(teacher),)
    runs = {"teacher": teacher,
            "fast FSP": run("FSP student (same size)", big, (_fsp(budget), stage("ce", {}, third)), t),
            "fast alone": run("same net alone, third", big, (stage("ce", {}, third),))}
    for m in range(1, budget.ensemble_size):
        runs[f"independent {m + 1}"] = run("teacher (extra, for the independent ensemble)", big,
                                           (stage("ce", {}, full),), run_seed=seed + 1000 * m)
    for k in range(1, budget.ensemble_size + 1):
        runs[f"shuffled {k}"] = run(f"FSP student shuffled {k}", big, (_fsp(budget, k), stage("ce", {}, third)), t,
                                    run_seed=seed + 1000 * (k - 1))
    small_train = _train(budget, budget.small_epochs)
    runs["small alone"] = run("small net alone", small, (stage("ce", {}, small_train),))
    runs["small fitnets"] = run("small net FitNets", small, (
        _stage1(budget, "fitnets", {"student_layer": "stage2", "teacher_layer": "stage2", "hint_weight": 1.0}),
        stage("hinton", FITNETS_KD, small_train)), t)
    runs["small fsp"] = run("small net FSP", small, (_fsp(budget), stage("ce", {}, small_train)), t)
    return runs


def steps_per_epoch(budget: FSPBudget, n_train: int) -> int:
    """Batches per epoch, as the Trainer's loader makes them (drop_last when the data fill a batch)."""
    return n_train // budget.batch_size if n_train >= budget.batch_size else 1


def curve(history: list[dict[str, Any]], steps: int, stage1_steps: int = 0) -> list[tuple[float, float]]:
    """(iteration, test accuracy %) after each main-task epoch; stage-1 iterations shift the curve right."""
    main = [r for r in history if r["method"] == "ce"]
    return [(stage1_steps + k * steps, 100 * r["test_accuracy"]) for k, r in enumerate(main, start=1)]


def measure(budget: FSPBudget, runs: dict[str, RunSpec], runner: ExperimentRunner) -> Measured:
    device = resolve_device(runs["teacher"].device)
    test = runner.data.test(runs["teacher"].data)
    values = {TEACHER: runner.accuracy(runs["teacher"]), FAST: runner.accuracy(runs["fast FSP"]),
              FAST_ALONE: runner.accuracy(runs["fast alone"])}
    for key, name in SMALL.items():
        values[name] = runner.accuracy(runs[f"small {key}"])
    shuffled_name, independent_name = ensemble_names(budget)
    independent = [runs["teacher"], *[runs[f"independent {m + 1}"] for m in range(1, budget.ensemble_size)]]
    shuffled = [runs[f"shuffled {k}"] for k in range(1, budget.ensemble_size + 1)]
    groups = {}
    for name, members in ((shuffled_name, shuffled), (independent_name, independent)):
        result = evaluate_ensemble([runner.train(m).model for m in members], test, device=device)
        values[name] = 100 * result["ensemble"]["accuracy"]
        groups[name] = [100 * r["accuracy"] for r in result["members"]]
    n_train = len(runner.data.train_val(runs["teacher"].data)[0])
    steps = steps_per_epoch(budget, n_train)
    stage1 = budget.stage1_epochs * steps
    curves = {"teacher (trained alone)": curve(runner.train(runs["teacher"]).history, steps),
              "FSP student (stage 2; shifted by stage-1 iterations)":
                  curve(runner.train(runs["fast FSP"]).history, steps, stage1),
              "same net alone, 1/3 schedule": curve(runner.train(runs["fast alone"]).history, steps)}
    return Measured(values, {"curves": curves, "ensemble_members": groups, "steps_per_epoch": steps})


def claims(budget: FSPBudget) -> list[Claim]:
    shuffled_name, independent_name = ensemble_names(budget)
    return [
        Claim(TEACHER, None, "reference: the teacher's own training (CIFAR-10 ResNet-26: 91.75 %)"),
        Claim(FAST, TEACHER, "CIFAR-10: ResNet-26 students after ~1/3 of the iterations 92.14 % vs teachers 91.75 %",
              +1),
        Claim(FAST_ALONE, None, "control: the same schedule without the FSP initialisation (not in the paper)"),
        Claim(FAST, FAST_ALONE, "implied by the claim above: the FSP initialisation is what speeds training up", +1),
        Claim(SMALL["alone"], None, "CIFAR-10 ResNet-8 alone: 87.91 %"),
        Claim(SMALL["fitnets"], SMALL["alone"], "CIFAR-10 ResNet-26 → ResNet-8: 87.91 → 88.57 %", +1),
        Claim(SMALL["fsp"], SMALL["alone"], "CIFAR-10 ResNet-26 → ResNet-8: 87.91 → 88.70 %", +1),
        Claim(SMALL["fsp"], SMALL["fitnets"], "CIFAR-10: FitNets 88.57 vs FSP 88.70 %", +1),
        Claim(independent_name, None, "CIFAR-10: ensemble of the teachers 93.48 %"),
        Claim(shuffled_name, independent_name, "CIFAR-10: shuffled-FSP students 93.67 vs teachers 93.48 %", +1),
    ]


def header(budget: FSPBudget) -> list[str]:
    train = "all" if budget.train_size is None else f"{budget.train_size:,}"
    test = "the whole test split's" if budget.test_size is None else f"{budget.test_size:,}"
    return [
        f"Paper: Yim et al. 2017 (CIFAR-10/100, CUB-200); here {budget.dataset}, so only the direction of each effect "
        "is compared, not the numbers.",
        f"Data: {train} training images per seed (a random subset, its own per seed), {test} test images; "
        f"augmentation {budget.augment} in every main-task stage, none in stage 1.",
        f"Networks: teacher and same-size students {describe_model(budget.teacher)}; small student "
        f"{describe_model(budget.student)}. Teacher: {budget.teacher_epochs} epochs; fast-optimisation students: "
        f"{budget.stage1_epochs} stage-1 epoch(s) + {budget.fast_epochs} main-task epochs; small students: "
        f"{budget.stage1_epochs} stage-1 epoch(s) (FitNets, FSP) + {budget.small_epochs} main-task epochs, the same "
        "for the small net alone.",
        f"Training: SGD (momentum 0.9, lr {budget.lr}, weight decay {budget.weight_decay}, cosine), batch "
        f"{budget.batch_size}; stage 1 (FSP, FitNets): AdamW lr 0.001 without decay. FSP pairs (stem, stage1), "
        "(stage1, stage2), (stage2, stage3), equal weights; FitNets hint stage2 → stage2, then KD at τ = 3 "
        "(soft-term weight annealed 4 → 1 over the stage, ce_weight 1, as in the FSP paper's baseline). "
        f"Ensembles of {budget.ensemble_size}: shuffled students use shuffle_seed "
        f"1..{budget.ensemble_size}.",
    ]


def finish(budget: FSPBudget, measured: dict[int, Measured], rows: list[Row], out: Path,
           ) -> tuple[list[Path], list[tuple[str, str]]]:
    seeds = sorted(measured)
    labels = measured[seeds[0]].extras["curves"]
    curves = {label: [measured[s].extras["curves"][label] for s in seeds] for label in labels}
    plot = plot_curves(curves, out / "accuracy_vs_iteration.png",
                       "FSP fast optimisation: test accuracy vs training iterations", "training iterations (batches)")
    lines = []
    for name in ensemble_names(budget):
        per_seed = "; ".join(", ".join(f"{a:.2f}" for a in measured[s].extras["ensemble_members"][name])
                             for s in seeds)
        lines.append(f"- {name}: members' own accuracy (%) per seed: {per_seed}")
    steps = measured[seeds[0]].extras["steps_per_epoch"]
    text = (f"One epoch is {steps} iterations. The FSP student's curve starts after its "
            f"{budget.stage1_epochs * steps} stage-1 iterations (which fit the FSP matrices and do not train the "
            "classifier), so both curves are drawn against all the iterations each network has had.\n")
    return [plot], [("Fast optimisation", text), ("Ensembles", "\n".join(lines) + "\n")]


EXPERIMENT = Experiment(
    name="fsp", title="Yim et al. 2017: FSP fast optimisation, network minimisation, shuffled ensembles",
    budgets=BUDGETS, plan=plan, measure=measure, claims=claims, header=header, finish=finish,
)
