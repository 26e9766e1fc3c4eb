"""Decoupled KD (Zhao et al., CVPR 2022): Hinton's soft term split into target and non-target parts, weighted apart.

KL(p^T ‖ p^S) = TCKD + (1 − p_t^T)·NCKD: in plain KD the non-target knowledge (NCKD, how the
teacher ranks the wrong classes) is scaled down exactly where the teacher is confident. DKD gives
each part its own weight, L = ce_weight·CE + w(e)·T²·(α·TCKD + β·NCKD), and ramps the two in over
the first epochs, w(e) = min(e / warmup_epochs, 1). See :func:`distillery.losses.dkd_loss`.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distillery.losses import dkd_loss, dkd_warmup_factor
from distillery.methods.base import Method, MethodParams, ModelOutputs, OneMinus, SearchRange
from distillery.methods.hinton import soft_inputs
from distillery.methods.registry import register_method


class DKDParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="α, weight of the target-class term T²·TCKD (paper: 1)")
    beta: float = Field(8.0, ge=0, description="β, weight of the non-target-class term T²·NCKD (paper: 8 on "
                                               "CIFAR-100, 0.5 on ImageNet)")
    temperature: float = Field(4.0, gt=0, description="T of both softmaxes (paper: 4 on CIFAR-100, 1 on ImageNet)")
    warmup_epochs: float = Field(20.0, ge=0, description="epochs over which the DKD terms ramp in linearly from 0 "
                                                         "(paper: 20 on CIFAR-100); 0 for no warm-up")
    ce_weight: float = Field(1.0, ge=0, description="weight of the hard-label cross-entropy (paper: 1)")
    standardize: bool = Field(False, description="z-score both nets' logits per example before softening them "
                                                 "(logit standardisation, Sun et al. CVPR 2024)")


@register_method("dkd")
class DKD(Method):
    """L = ce_weight · CE(y, softmax(z_s)) + min(e/E, 1) · T² · (α · TCKD + β · NCKD), averaged over examples.

    The warm-up needs the training progress e: whoever runs the steps (the trainer, or a user's
    loop) sets ``epoch_progress`` to the number of epochs completed so far, fractions included
    (``epoch + step / steps_per_epoch``), before each step. It starts unset, and with
    ``warmup_epochs`` > 0 a step without it is an error rather than a silent 0 or 1.
    """

    Params = DKDParams
    # the paper's own settings (CIFAR-100 for DKD; ImageNet for DIST)
    PRESETS = {"paper": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_epochs": 20.0, "ce_weight": 1.0}}

    compares_logits = True

    @classmethod
    def search_space(cls) -> dict[str, SearchRange | OneMinus]:
        """α and β log-uniform around the paper's values (α = 1; β from 0.5 on ImageNet to 8 on CIFAR-100), T 1–8."""
        return {"alpha": SearchRange(0.25, 4.0, log=True), "beta": SearchRange(0.25, 16.0, log=True),
                "temperature": SearchRange(1.0, 8.0, log=True)}

    def __init__(self, params: MethodParams | None = None) -> None:
        super().__init__(params)
        self.epoch_progress: float | None = None

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        p = self.params
        if teacher is None:
            raise ValueError("dkd needs the teacher's outputs (method.teacher_outputs(teacher, inputs))")
        student_z, teacher_z = soft_inputs(student.logits, teacher.logits, p.standardize)
        terms = dkd_loss(student_z, teacher_z, targets, p.alpha, p.beta, p.temperature)
        ramp = dkd_warmup_factor(self._progress(), p.warmup_epochs)
        return {
            "ce": p.ce_weight * F.cross_entropy(student.logits.float(), targets),
            "tckd": ramp * terms.tckd,
            "nckd": ramp * terms.nckd,
        }

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """The trainer's progress: epoch ``epoch`` (0-based) has started, so the paper's counter is
        ``epoch + 1`` (its warm-up gives the first epoch min(1/E, 1))."""
        self.epoch_progress = float(epoch + 1)

    def _progress(self) -> float:
        if self.epoch_progress is not None:
            return self.epoch_progress
        if self.params.warmup_epochs == 0:
            return 0.0  # any value: no warm-up
        raise ValueError(
            f"dkd: warmup_epochs={self.params.warmup_epochs} ramps the loss in by training progress, but "
            "method.epoch_progress is not set; set it to the epochs completed so far (fractional) before each "
            "step, or use warmup_epochs=0"
        )
