"""Plain cross-entropy: training a teacher, or a student alone (the baseline every method beats)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillery.methods.base import Method, ModelOutputs


class CrossEntropy(Method):
    """L = CE(y, softmax(z_s)). No teacher."""

    name = "ce"
    needs_teacher = False

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(student.logits.float(), targets)}
