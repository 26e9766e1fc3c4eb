"""Hinton, Vinyals & Dean 2015: match the teacher's temperature-softened outputs."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distillery.losses import kd_loss
from distillery.methods.base import Method, MethodParams, ModelOutputs, Teacher, probe_student


class HintonParams(MethodParams):
    temperature: float = Field(4.0, gt=0, description="T of the softened softmax, shared by both nets")
    kd_weight: float = Field(0.9, ge=0, le=1, description="weight of the soft term T²·KL(q_t ‖ q_s) (Hinton's α)")
    ce_weight: float = Field(0.1, ge=0, le=1, description="weight of the hard-label cross-entropy (1 − α)")


class HintonKD(Method):
    """L = ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(q_t(T) ‖ q_s(T))."""

    name = "hinton"
    Params = HintonParams

    def setup(self, student: nn.Module, teacher: Teacher | None, example: Tensor) -> None:
        super().setup(student, teacher, example)
        check_same_classes(student, teacher, example, self.name)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        p = self.params
        assert teacher is not None
        return {
            "ce": p.ce_weight * F.cross_entropy(student.logits.float(), targets),
            "kd": p.kd_weight * kd_loss(student.logits, teacher.logits, p.temperature),
        }


def check_same_classes(student: nn.Module, teacher: Teacher | None, example: Tensor, method: str) -> None:
    """Logit methods compare class by class: the teacher and student must output as many classes."""
    if teacher is None:
        return
    k_student = probe_student(student, example[:2]).logits.shape[-1]
    k_teacher = teacher(example[:2]).logits.shape[-1]
    if k_student != k_teacher:
        raise ValueError(
            f"method {method!r} compares logits, but the teacher outputs {k_teacher} classes and the "
            f"student {k_student}; use a feature method (fsp, fitnets) for a teacher of another task"
        )
