"""Label smoothing (Szegedy et al. 2016), the teacher-free baseline of Yuan et al. 2020."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from distillery.losses import label_smoothing_targets
from distillery.methods.base import Method, MethodParams, ModelOutputs, OneMinus, SearchRange
from distillery.methods.registry import register_method


class LabelSmoothingParams(MethodParams):
    smoothing: float = Field(0.1, ge=0, le=1, description="ε: the weight of the uniform distribution in the target")


@register_method("label_smoothing")
class LabelSmoothing(Method):
    """L = CE(q', softmax(z_s)) with q'(k) = (1 − ε)·onehot(y)_k + ε/K. No teacher.

    Yuan et al. read KD at T = 1 as this with the uniform u replaced by the teacher's p_t.
    """

    Params = LabelSmoothingParams
    needs_teacher = False

    @classmethod
    def search_space(cls) -> dict[str, SearchRange | OneMinus]:
        return {"smoothing": SearchRange(0.0, 0.5)}

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        logits = student.logits.float()
        smoothed = label_smoothing_targets(targets, logits.shape[-1], self.params.smoothing)
        return {"ls": F.cross_entropy(logits, smoothed)}
