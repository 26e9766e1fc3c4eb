"""Logit matching (Bucilă et al. 2006; Ba & Caruana 2014): regress the teacher's logits directly."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distillery.losses import logit_matching_loss
from distillery.methods.base import Method, MethodParams, ModelOutputs, OneMinus, SearchRange
from distillery.methods.registry import register_method


class LogitParams(MethodParams):
    logit_weight: float = Field(1.0, ge=0, description="weight of the squared logit difference "
                                                       "½·mean_i (z_s,i − z_t,i)² (on the scale of hinton's kd_weight)")
    ce_weight: float = Field(0.0, ge=0, description="weight of the hard-label cross-entropy (0: the papers use "
                                                    "the teacher's logits only)")


@register_method("logits")
class LogitMatching(Method):
    """L = logit_weight · ½·(1/K)·Σ_i (z_s,i − z_t,i)² + ce_weight · CE(y, softmax(z_s)), averaged over examples.

    The high-temperature limit of Hinton's T²-scaled soft term with zero-mean logits: the same
    gradient (z_s − z_t)/K, so ``logit_weight`` means what ``kd_weight`` means there.
    """

    Params = LogitParams

    compares_logits = True

    @classmethod
    def search_space(cls) -> dict[str, SearchRange | OneMinus]:
        return {"logit_weight": SearchRange(0.1, 10.0, log=True), "ce_weight": SearchRange(0.0, 1.0)}

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        assert teacher is not None
        p = self.params
        terms = {"logits": p.logit_weight * logit_matching_loss(student.logits, teacher.logits)}
        if p.ce_weight:
            terms["ce"] = p.ce_weight * F.cross_entropy(student.logits.float(), targets)
        return terms
