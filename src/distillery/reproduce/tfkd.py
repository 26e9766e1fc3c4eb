"""Yuan et al. (CVPR 2020), "Revisiting knowledge distillation via label smoothing regularization".

Per seed, with a larger teacher network and a smaller student network:

- the teacher and the student each trained alone (the baselines);
- normal KD (teacher → student);
- Reversed KD: the student, trained alone, teaches the teacher's architecture;
- Defective KD: the teacher's weights after only ``defective_epochs`` (fractions of an epoch
  allowed; snapshots of the teacher's own run) teach the student; their accuracy is reported;
- Tf-KD_self: the student trained alone teaches a fresh copy of itself;
- Tf-KD_reg: a virtual teacher (``correct_prob`` a on the true class, T = 20), no network;
- label smoothing (ε = 0.1).

KD, Re-KD, De-KD and Tf-KD_self run once per named setting of ``kd_settings``: the paper's own
(its released configurations: α = 0.6, T = 20) and, where the budget has them, weights tuned by
``distillery tune`` on a validation split; each row's name says which. Tf-KD_reg and label
smoothing use the methods' paper defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillery.config import describe_model
from distillery.reproduce.experiment import Env, Experiment, Measured
from distillery.reproduce.hinton import TUNED_FMNIST_10K
from distillery.reproduce.report import Claim, Row
from distillery.reproduce.runs import DataSpec, ExperimentRunner, RunSpec, TeacherRef, run_spec, stage

# The paper's released configurations for normal KD and Re-KD: α = 0.6 on the soft term, T = 20.
PAPER_KD = {"temperature": 20.0, "kd_weight": 0.6, "ce_weight": 0.4}
# The quick budget's tuned rows: hinton's weights from the tune run of the same pair and data size.
TUNED_KD = TUNED_FMNIST_10K


@dataclass(frozen=True)
class TfKDBudget:
    train_size: int | None
    test_size: int | None
    teacher_epochs: int
    student_epochs: int
    teacher: dict[str, Any] = field(default_factory=lambda: {"name": "cnn", "kwargs": {"width": 16}})
    student: dict[str, Any] = field(default_factory=lambda: {"name": "mlp", "kwargs": {"hidden": [800, 800]}})
    teacher_augment: dict[str, Any] = field(default_factory=lambda: {"crop_padding": 2, "hflip": True})
    student_augment: dict[str, Any] = field(default_factory=lambda: {"crop_padding": 0, "hflip": False})
    defective_epochs: tuple[float, ...] = (0.02, 1.0)
    kd_settings: dict[str, dict[str, float]] = field(default_factory=lambda: {"paper": PAPER_KD})
    """Named KD settings (temperature, kd_weight, ce_weight, and optionally the student's lr)."""
    smoothing: float = 0.1
    lr: float = 0.05
    nesterov: bool = False
    weight_decay: float = 5e-4
    batch_size: int = 128
    dataset: str = "fashion_mnist"
    pixels: int = 28 * 28


BUDGETS = {
    # ~25 min on one CPU thread for 3 seeds: the pair and data of docs/results/tune/fmnist-10k, so that the
    # tuned rows use that search's weights.
    "quick": TfKDBudget(train_size=10000, test_size=None, teacher_epochs=10, student_epochs=15,
                        teacher={"name": "cnn", "kwargs": {"width": 16, "fc_width": 128}},
                        student={"name": "mlp", "kwargs": {"hidden": [100, 100]}},
                        teacher_augment={"crop_padding": 0, "hflip": False}, nesterov=True,
                        kd_settings={"paper": PAPER_KD, "tuned": TUNED_KD}),
    # Paper-like (a GPU): ResNet-26 teacher, ResNet-8 student, all data, 200 epochs, augmentation for both.
    "full": TfKDBudget(train_size=None, test_size=None, teacher_epochs=200, student_epochs=200,
                       teacher={"name": "resnet26"}, student={"name": "resnet8"},
                       student_augment={"crop_padding": 2, "hflip": True}, defective_epochs=(0.05, 1.0), lr=0.1),
    "smoke": TfKDBudget(train_size=160, test_size=None, teacher_epochs=2, student_epochs=1,
                        teacher={"name": "mlp", "kwargs": {"hidden": [32]}},
                        student={"name": "mlp", "kwargs": {"hidden": [16]}},
                        teacher_augment={"crop_padding": 1, "hflip": False}, defective_epochs=(0.2,),
                        batch_size=32, pixels=64),
}


def _train(budget: TfKDBudget, epochs: int, augment: dict[str, Any], lr: float | None = None) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": budget.batch_size,
            "optimizer": {"name": "sgd", "lr": budget.lr if lr is None else lr, "momentum": 0.9,
                          "nesterov": budget.nesterov, "weight_decay": budget.weight_decay},
            "schedule": {"name": "cosine"}, "augment": augment}


def defective(epoch: float, setting: str) -> str:
    return f"De-KD (teacher after {epoch:g} epochs) [{setting}]"


def probe(name: str, setting: str) -> str:
    """A KD probe's row name with the setting it used: ``normal KD (teacher → student) [paper]``."""
    return f"{name} [{setting}]"


KD, RE_KD, SELF = "normal KD (teacher → student)", "Re-KD (student → teacher)", "Tf-KD self"


def defective_teacher(epoch: float) -> str:
    return f"De-KD teacher after {epoch:g} epochs (its own accuracy)"


def plan(budget: TfKDBudget, seed: int, env: Env) -> dict[str, RunSpec]:
    data = DataSpec(budget.dataset, env.data_root, budget.train_size, 0, budget.test_size, seed)
    t_train = _train(budget, budget.teacher_epochs, budget.teacher_augment)

    def student(label: str, method: str, params: dict[str, Any], teachers: tuple[TeacherRef, ...] = (),
                lr: float | None = None) -> RunSpec:
        s_train = _train(budget, budget.student_epochs, budget.student_augment, lr)
        return run_spec(label, budget.student, (stage(method, params, s_train),), data, seed, teachers,
                       device=env.device)

    teacher = run_spec("teacher alone", budget.teacher, (stage("ce", {}, t_train),), data, seed,
                      snapshots=tuple(budget.defective_epochs), device=env.device)
    alone = student("student alone", "ce", {})
    runs = {"teacher alone": teacher, "student alone": alone}
    for name, setting in budget.kd_settings.items():
        kd = {k: v for k, v in setting.items() if k != "lr"}
        lr = setting.get("lr")
        runs[probe(KD, name)] = student(probe(KD, name), "hinton", kd, (TeacherRef(teacher),), lr)
        # Re-KD trains the teacher's architecture with the teacher's own schedule (a tuned lr is the student's)
        runs[probe(RE_KD, name)] = run_spec(probe(RE_KD, name), budget.teacher, (stage("hinton", kd, t_train),),
                                            data, seed, (TeacherRef(alone),), device=env.device)
        for e in budget.defective_epochs:
            runs[defective(e, name)] = student(defective(e, name), "hinton", kd, (TeacherRef(teacher, e),), lr)
        runs[probe(SELF, name)] = student(probe(SELF, name), "tfkd_self", kd, (TeacherRef(alone),), lr)
    runs["Tf-KD reg"] = student("Tf-KD reg", "tfkd_reg", {})
    runs["label smoothing"] = student("label smoothing", "label_smoothing", {"smoothing": budget.smoothing})
    return runs


def measure(budget: TfKDBudget, runs: dict[str, RunSpec], runner: ExperimentRunner) -> Measured:
    values = {"teacher alone": runner.accuracy(runs["teacher alone"]),
              "student alone": runner.accuracy(runs["student alone"])}
    for e in budget.defective_epochs:
        snapshot = runner.snapshot_model(TeacherRef(runs["teacher alone"], e))
        values[defective_teacher(e)] = runner.evaluate_model(snapshot, runs["teacher alone"])
    for name, spec in runs.items():
        if name not in values:
            values[name] = runner.accuracy(spec)
    return Measured(values)


def claims(budget: TfKDBudget) -> list[Claim]:
    rows = [
        Claim("teacher alone", None, "reference (the paper's teachers: ResNet18, ResNeXt29, ...)"),
        Claim("student alone", None, "reference; CIFAR-100 ResNet18 75.87 %, MobileNetV2 68.38 %"),
    ]
    rows += [Claim(defective_teacher(e), None, "CIFAR-100: De-KD ResNet18 teacher at 15.48 %")
             for e in budget.defective_epochs]
    for name in budget.kd_settings:
        rows += [
            Claim(probe(KD, name), "student alone", "KD improves the student (the paper's starting point)", +1),
            Claim(probe(RE_KD, name), "teacher alone", "Re-KD: a weaker student teaching the teacher still improves it",
                  +1),
            *[Claim(defective(e, name), "student alone",
                    "CIFAR-100: a 15.48 % ResNet18 teacher lifts MobileNetV2 68.38 → 70.65 %", +1)
              for e in budget.defective_epochs],
            Claim(probe(SELF, name), "student alone",
                  "CIFAR-100: ResNet18 75.87 → 77.10 %, MobileNetV2 68.38 → 70.96 %", +1),
        ]
    rows += [
        Claim("Tf-KD reg", "student alone", "CIFAR-100: ResNet18 75.87 → 77.36 % (a = 0.99, T ≥ 20)", +1),
        Claim("label smoothing", "student alone", "label smoothing regularises like KD (improves the baseline)", +1),
        Claim("Tf-KD reg", "label smoothing", "Tf-KD_reg beats label smoothing", +1),
    ]
    return rows


def header(budget: TfKDBudget) -> list[str]:
    train = "all" if budget.train_size is None else f"{budget.train_size:,}"
    test = "the whole test split's" if budget.test_size is None else f"{budget.test_size:,}"
    settings = "; ".join(f"[{name}] T = {kd['temperature']:g}, kd_weight {kd['kd_weight']:g}, ce_weight "
                         f"{kd['ce_weight']:g}" + (f", student lr {kd['lr']:g}" if "lr" in kd else "")
                         for name, kd in budget.kd_settings.items())
    return [
        f"Paper: Yuan et al. 2020 (CIFAR-100, Tiny-ImageNet); here {budget.dataset}, so only the direction of each "
        "effect is compared, not the numbers.",
        f"Data: {train} training images per seed (a random subset, its own per seed), {test} test images.",
        f"Teacher: {describe_model(budget.teacher)}, {budget.teacher_epochs} epochs, augmentation "
        f"{budget.teacher_augment}. "
        f"Student: {describe_model(budget.student)}, {budget.student_epochs} epochs, augmentation "
        f"{budget.student_augment}. Re-KD trains the teacher's architecture with the teacher's settings.",
        f"Training: SGD (momentum 0.9, lr {budget.lr}, weight decay {budget.weight_decay}, cosine), batch "
        f"{budget.batch_size}. KD, Re-KD, De-KD and Tf-KD_self, once per setting (the row names say which): "
        f"{settings}. [paper]: the paper's released configurations for normal KD and Re-KD, reused for De-KD and "
        "Tf-KD_self; [tuned]: found by `distillery tune` on a validation split for normal KD with this teacher, "
        "student and data size (docs/results/tune/fmnist-10k), reused for the probes. "
        "Tf-KD_reg: a = 0.99, T = 20, ce_weight 0.9, kd_weight 0.1 "
        f"(the method's defaults). Label smoothing ε = {budget.smoothing}. De-KD teachers: the teacher's weights "
        f"after {', '.join(f'{e:g}' for e in budget.defective_epochs)} epochs of its own run.",
    ]


def finish(budget: TfKDBudget, measured: dict[int, Measured], rows: list[Row], out: Path,
           ) -> tuple[list[Path], list[tuple[str, str]]]:
    seeds = sorted(measured)
    lines = []
    for e in budget.defective_epochs:
        accs = ", ".join(f"{measured[s].values[defective_teacher(e)]:.2f}" for s in seeds)
        alone = ", ".join(f"{measured[s].values['student alone']:.2f}" for s in seeds)
        lines.append(f"- After {e:g} epochs the teacher's test accuracy was {accs} % (per seed); the student alone "
                     f"reached {alone} %.")
    text = ("The defective teachers are snapshots of each seed's teacher run, taken after the given fraction of "
            "its training (the weights at that step, before the learning rate had decayed).\n\n" + "\n".join(lines))
    return [], [("Defective teachers", text)]


EXPERIMENT = Experiment(
    name="tfkd", title="Yuan et al. 2020: Re-KD, De-KD, Tf-KD_self, Tf-KD_reg, label smoothing",
    budgets=BUDGETS, plan=plan, measure=measure, claims=claims, header=header, finish=finish,
)
