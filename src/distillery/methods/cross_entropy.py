"""Plain cross-entropy: training a teacher, or a student alone (the baseline every method beats)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillery.methods.base import Method, ModelOutputs
from distillery.methods.registry import register_method


@register_method("ce")
class CrossEntropy(Method):
    """L = CE(y, softmax(z_s)). No teacher."""

    needs_teacher = False

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(student.logits.float(), targets)}
