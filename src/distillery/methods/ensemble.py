"""Distil an ensemble of teachers (Hinton et al. 2015): the target is the members' averaged soft outputs."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distillery.losses import ensemble_probs, soft_target_loss
from distillery.methods.base import Method, MethodParams, ModelOutputs


class EnsembleParams(MethodParams):
    temperature: float = Field(4.0, gt=0, description="T of the softened softmax, shared by members and student")
    kd_weight: float = Field(0.9, ge=0, le=1, description="weight of the soft term T²·KL(p_ens ‖ q_s) (Hinton's α)")
    ce_weight: float = Field(0.1, ge=0, le=1, description="weight of the hard-label cross-entropy (1 − α)")


class EnsembleKD(Method):
    """L = ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(p_ens(T) ‖ q_s(T)), p_ens = (1/M) Σ_m q_m(T).

    Any number of teacher networks (``Teacher([net1, net2, ...])``); with one it is exactly ``hinton``.
    """

    name = "ensemble"
    Params = EnsembleParams
    accepts_ensemble = True

    compares_logits = True

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        assert teacher is not None
        p = self.params
        target = ensemble_probs(teacher.logits.detach(), p.temperature)
        return {
            "ce": p.ce_weight * F.cross_entropy(student.logits.float(), targets),
            "kd": p.kd_weight * soft_target_loss(student.logits, target, p.temperature),
        }
