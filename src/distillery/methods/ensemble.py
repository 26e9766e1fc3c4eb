"""Distil an ensemble of teachers (Hinton et al. 2015): the target is the members' averaged soft outputs."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distillery.losses import ensemble_probs, soft_target_loss
from distillery.methods.base import Method, ModelOutputs, OneMinus, SearchRange
from distillery.methods.hinton import PAPER_SOFT_TARGETS, SOFT_TARGET_SPACE, SoftTargetParams, soft_inputs
from distillery.methods.registry import register_method
from distillery.teacher import Teacher, probe_student


@register_method("ensemble")
class EnsembleKD(Method):
    """L = ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(p_ens(T) ‖ q_s(T)), p_ens = (1/M) Σ_m q_m(T).

    Any number of teacher networks (``Teacher([net1, net2, ...])``); with one it is exactly ``hinton``.
    """

    Params = SoftTargetParams
    PRESETS = {"paper": PAPER_SOFT_TARGETS}
    accepts_ensemble = True
    compares_logits = True

    def setup(self, student: nn.Module, teacher: Teacher | None, example: Tensor) -> None:
        if teacher is not None:  # before the base checks, which run the members together
            counts = [probe_student(member, example[:2]).logits.shape[-1] for member in teacher.members]
            if len(set(counts)) > 1:
                raise ValueError(f"method 'ensemble' averages its members' probabilities class by class, but the "
                                 f"members output {counts} classes; give members trained on the same classes")
        super().setup(student, teacher, example)

    @classmethod
    def search_space(cls) -> dict[str, SearchRange | OneMinus]:
        return dict(SOFT_TARGET_SPACE)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        assert teacher is not None
        p = self.params
        student_z, teacher_z = soft_inputs(student.logits, teacher.logits.detach(), p.standardize)
        target = ensemble_probs(teacher_z, p.temperature)
        return {
            "ce": p.ce_weight * F.cross_entropy(student.logits.float(), targets),
            "kd": p.kd_weight * soft_target_loss(student_z, target, p.temperature),
        }
