"""Teacher-free KD (Yuan et al. CVPR 2020): a student teaching itself, or a hand-made virtual teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from distillery.losses import soft_target_loss, soften, virtual_teacher_probs
from distillery.methods.base import Method, MethodParams, ModelOutputs, OneMinus, SearchRange
from distillery.methods.hinton import HintonKD, SoftTargetParams
from distillery.methods.registry import register_method
from distillery.teacher import Teacher


@register_method("tfkd_self")
class TfKDSelf(HintonKD):
    """Tf-KD_self: Hinton KD whose teacher is a trained copy of the student's own architecture.

    L = ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(q_t(T) ‖ q_s(T)). ``setup`` refuses a
    teacher of another architecture (use ``hinton`` for that). Several generations (generation k
    teaches k + 1) are run by ``distillery distill --method tfkd_self --generations N``.
    """

    Params = SoftTargetParams


    def setup(self, student: nn.Module, teacher: Teacher | None, example: Tensor) -> None:
        super().setup(student, teacher, example)
        assert teacher is not None
        check_same_architecture(student, teacher.members[0])


def check_same_architecture(student: nn.Module, teacher: nn.Module) -> None:
    """Tf-KD_self's teacher is the student's architecture: same class, same parameter names and shapes."""
    s_shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    t_shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    if type(student) is not type(teacher) or s_shapes != t_shapes:
        differing = sorted(k for k in s_shapes.keys() | t_shapes.keys() if s_shapes.get(k) != t_shapes.get(k))
        detail = f"; first differing parameters: {', '.join(differing[:3])}" if differing else ""
        raise ValueError(
            f"method 'tfkd_self' needs a teacher of the student's architecture, got a {type(teacher).__name__} "
            f"teacher for a {type(student).__name__} student{detail}; use method 'hinton' for another teacher"
        )


class TfKDRegParams(MethodParams):
    correct_prob: float = Field(0.99, gt=0, lt=1, description="a: the virtual teacher's probability of the true class")
    temperature: float = Field(20.0, gt=0, description="T softening both the virtual teacher and the student")
    kd_weight: float = Field(0.1, ge=0, description="weight of the soft term T²·KL(p_d(T) ‖ q_s(T)) (the paper's α)")
    ce_weight: float = Field(0.9, ge=0, description="weight of the hard-label cross-entropy (1 − α)")


@register_method("tfkd_reg")
class TfKDReg(Method):
    """Tf-KD_reg: KD from a virtual teacher, no teacher network.

    p_d(k) = a on the true class, (1 − a)/(K − 1) elsewhere; softened as p_d(T) ∝ p_d^(1/T) (the
    softened softmax of the logits log p_d, the same softening a real teacher's outputs get).
    L = ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(p_d(T) ‖ q_s(T)). (Yuan et al.'s code
    instead applies a softmax to p_d/T and compares with the unsoftened student times a multiplier;
    this keeps the documented KD form and its T²-scaled gradient.)
    """

    Params = TfKDRegParams
    needs_teacher = False

    @classmethod
    def search_space(cls) -> dict[str, SearchRange | OneMinus]:
        """a from a near-uniform to a near-certain virtual teacher; T log-uniform (the paper uses 20 and 40)."""
        return {"correct_prob": SearchRange(0.5, 0.99), "temperature": SearchRange(1.0, 40.0, log=True),
                "kd_weight": SearchRange(0.0, 1.0), "ce_weight": OneMinus("kd_weight")}

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        p = self.params
        logits = student.logits.float()
        virtual = virtual_teacher_probs(targets, logits.shape[-1], p.correct_prob)
        target = soften(torch.log(virtual), p.temperature)
        return {
            "ce": p.ce_weight * F.cross_entropy(logits, targets),
            "kd": p.kd_weight * soft_target_loss(logits, target, p.temperature),
        }
