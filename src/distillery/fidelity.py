"""How closely a distilled student imitates its teacher, and the sanity checks around a distillation.

Accuracy says how often the student is right; fidelity says how much it behaves like its teacher,
which is what distillation optimises (Stanton et al., NeurIPS 2021, "Does knowledge distillation
really work?", found the two can part ways). On an evaluation set of N examples:

    agreement = (1/N) Σ_n [argmax_k z_s,nk = argmax_k p_t,nk]          (top-1 agreement)
    KL(p_t ‖ p_s) = (1/N) Σ_n Σ_k p_t,nk · (log p_t,nk − log p_s,nk)   (nats; 0 · log 0 = 0)

with p = softmax(z) at temperature 1. For an ensemble teacher p_t is the members' averaged
probabilities (:func:`distillery.losses.ensemble_probs`), the distribution the ``ensemble`` method
distils.

The sanity checks return a plain sentence (or None) that commands print and put in their reports:
a teacher that is not clearly better than the student trained alone has little to teach, and a
student near chance accuracy after training has collapsed (diverged, or a weight drowned the labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distillery.data import BatchLoader, ImageDataset
from distillery.losses import ensemble_probs
from distillery.teacher import Teacher

# How far (a fraction: 0.01 is one percentage point) a teacher must beat the student alone to count as clearly better.
TEACHER_MARGIN = 0.01
# Points above chance (the most frequent class's share) within which a student counts as collapsed.
COLLAPSE_MARGIN = 0.05


@dataclass(frozen=True)
class Fidelity:
    """Top-1 agreement of student and teacher (a fraction) and KL(teacher ‖ student) in nats, over ``n`` examples."""

    agreement: float
    kl: float
    n: int


def _fidelity_sums(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """The number of agreeing examples and the summed per-example KL(p_t ‖ p_s) of one batch."""
    p_teacher = ensemble_probs(teacher_logits.float())
    log_p_student = torch.log_softmax(student_logits.float(), dim=-1)
    if p_teacher.shape != log_p_student.shape:
        raise ValueError(f"fidelity compares outputs class by class: the teacher gives {tuple(p_teacher.shape)} "
                         f"probabilities, the student {tuple(log_p_student.shape)}")
    kl = (torch.xlogy(p_teacher, p_teacher) - p_teacher * log_p_student).sum(-1)
    agree = (student_logits.argmax(-1) == p_teacher.argmax(-1)).sum()
    return agree, kl.sum()


def fidelity_from_logits(student_logits: Tensor, teacher_logits: Tensor) -> Fidelity:
    """Agreement and KL(p_t ‖ p_s) of N×K student logits against N×K (or M×N×K ensemble) teacher logits."""
    agree, kl = _fidelity_sums(student_logits, teacher_logits)
    n = student_logits.shape[0]
    return Fidelity(agree.item() / n, kl.item() / n, n)


@torch.inference_mode()
def measure_fidelity(student: torch.nn.Module, teacher: Teacher, data: ImageDataset, batch_size: int = 1000,
                     device: torch.device | str = "cpu") -> Fidelity:
    """The student's fidelity to ``teacher`` on ``data`` (both in eval mode; the student's mode is restored)."""
    was_training = student.training
    student.eval().to(device)
    teacher.to(device)
    agree = torch.zeros((), dtype=torch.long, device=device)
    kl = torch.zeros((), dtype=torch.float64, device=device)
    for batch in BatchLoader(data, batch_size, device=device).epoch(0):
        batch_agree, batch_kl = _fidelity_sums(student(batch.inputs), teacher(batch.inputs).logits)
        agree += batch_agree
        kl += batch_kl.double()
    student.train(was_training)
    return Fidelity(agree.item() / len(data), kl.item() / len(data), len(data))


# ---------------------------------------------------------------- sanity checks


def chance_accuracy(data: ImageDataset) -> float:
    """The accuracy of always answering the most frequent class of ``data`` (1/K when balanced)."""
    counts = torch.bincount(data.labels, minlength=data.num_classes)
    return counts.max().item() / max(len(data), 1)


def teacher_warning(teacher_accuracy: float, alone_accuracy: float, where: str,
                    margin: float = TEACHER_MARGIN) -> str | None:
    """A warning when the teacher is not ahead of the student alone by ``margin`` (accuracies as fractions)."""
    gap = teacher_accuracy - alone_accuracy
    if gap >= margin:
        return None
    return (f"the teacher is not clearly better than the student alone on {where}: teacher "
            f"{100 * teacher_accuracy:.2f} %, student alone {100 * alone_accuracy:.2f} % ({100 * gap:+.2f} points, "
            f"less than {100 * margin:.0f}); distilling from it is unlikely to pay — train a stronger teacher")


def collapse_warning(label: str, accuracy: float, chance: float, margin: float = COLLAPSE_MARGIN) -> str | None:
    """A warning when ``label``'s final accuracy is within ``margin`` of chance (the majority class's share)."""
    if accuracy > chance + margin:
        return None
    return (f"{label} collapsed: {100 * accuracy:.2f} % accuracy, chance is {100 * chance:.2f} %; its training "
            "diverged or a loss weight drowned the labels — lower the learning rate or the distillation weight")
