"""DIST (Huang et al., NeurIPS 2022): distil the teacher's relations between predictions, not the predictions.

The student's softened outputs must correlate (Pearson) with the teacher's per example, across
the classes (inter-class relation), and per class, across the batch (intra-class relation).
Correlation ignores scale and shift, so a student is not pushed to reproduce the exact, often
much sharper, probabilities of a stronger teacher. See :func:`distillery.losses.dist_loss`.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distillery.losses import dist_loss
from distillery.methods.base import Method, MethodParams, ModelOutputs, OneMinus, SearchRange
from distillery.methods.registry import register_method


class DISTParams(MethodParams):
    beta: float = Field(1.0, ge=0, description="β, weight of the inter-class relation 1 − mean_i ρ(rows) (paper: 1)")
    gamma: float = Field(1.0, ge=0, description="γ, weight of the intra-class relation 1 − mean_j ρ(columns) "
                                                "(paper: 1)")
    temperature: float = Field(1.0, gt=0, description="T of both softmaxes; the terms carry T² (paper: 1 on "
                                                      "ImageNet)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the hard-label cross-entropy (paper: 1)")


@register_method("dist")
class DIST(Method):
    """L = ce_weight · CE(y, softmax(z_s)) + T² · (β · L_inter + γ · L_intra) on softmax(z/T).

    The intra-class term correlates each class's probabilities across the batch, so it depends on
    the batch: it needs at least 2 examples to mean anything (with one it is the constant γ·T²).
    """

    Params = DISTParams
    # the paper's own settings (CIFAR-100 for DKD; ImageNet for DIST)
    PRESETS = {"paper": {"beta": 1.0, "gamma": 1.0, "temperature": 1.0, "ce_weight": 1.0}}

    compares_logits = True

    @classmethod
    def search_space(cls) -> dict[str, SearchRange | OneMinus]:
        """β and γ log-uniform around the paper's 1 (2 on CIFAR-100), T 1–8 (the paper: 1 on ImageNet, 4 on CIFAR)."""
        return {"beta": SearchRange(0.25, 4.0, log=True), "gamma": SearchRange(0.25, 4.0, log=True),
                "temperature": SearchRange(1.0, 8.0, log=True)}

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        p = self.params
        if teacher is None:
            raise ValueError("dist needs the teacher's outputs (method.teacher_outputs(teacher, inputs))")
        terms = dist_loss(student.logits, teacher.logits, p.beta, p.gamma, p.temperature)
        return {
            "ce": p.ce_weight * F.cross_entropy(student.logits.float(), targets),
            "inter_class": terms.inter,
            "intra_class": terms.intra,
        }
