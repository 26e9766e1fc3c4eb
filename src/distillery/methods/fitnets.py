"""FitNets hints (Romero et al. 2015), stage 1: a guided student layer learns to predict a teacher hint layer.

A learned regressor r (a 1×1 convolution for feature maps, a linear map for vectors) takes the
guided layer's output v_g(x) to the hint's shape, and r and the student's layers up to the guided
one minimise the L2 hint loss. Stage 2 trains the whole student with KD from there: run
``fitnets`` then ``hinton`` as two stages (``distillery distill --method fitnets`` does; the
shipped recipe ``fitnets`` is the full run).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from distillery.losses import hint_loss, pool_to_common_size
from distillery.methods.base import Method, MethodParams, ModelOutputs, Teacher, probe_student
from distillery.methods.fsp import STAGE1_OPTIMIZER
from distillery.taps import UnknownLayerError


class FitNetsParams(MethodParams):
    student_layer: str = Field("stage2", description="the guided student layer (a module path)")
    teacher_layer: str = Field("stage2", description="the teacher's hint layer (a module path)")
    hint_weight: float = Field(1.0, gt=0, description="weight of the hint loss ½·‖u_h(x) − r(v_g(x))‖²")


class FitNets(Method):
    """L = hint_weight · ½ · ‖u_h(x) − r(v_g(x))‖², averaged over examples; the regressor r is learned.

    Feature maps of different spatial sizes are max-pooled to the smaller one (after r). The loss
    ignores the classifier, so the teacher may have been trained on another task or class count.
    """

    name = "fitnets"
    Params = FitNetsParams

    def __init__(self, params: MethodParams | None = None) -> None:
        super().__init__(params)
        self.student_layers = (self.params.student_layer,)
        self.teacher_layers = (self.params.teacher_layer,)
        self.regressor: nn.Module | None = None

    def setup(self, student: nn.Module, teacher: Teacher | None, example: Tensor) -> None:
        p = self.params
        try:
            super().setup(student, teacher, example)
        except UnknownLayerError as err:
            raise UnknownLayerError(f"method 'fitnets' (parameters student_layer={p.student_layer!r}, "
                                    f"teacher_layer={p.teacher_layer!r}): {err} The defaults fit the ResNets of "
                                    "the shipped recipe (--config fitnets).") from None
        assert teacher is not None
        guided = probe_student(student, example, self.student_layers).features[p.student_layer]
        hint = teacher(example, self.teacher_layers).features[p.teacher_layer]
        where = f"fitnets: guided student layer {p.student_layer!r} {tuple(guided.shape[1:])}, " \
                f"teacher hint layer {p.teacher_layer!r} {tuple(hint.shape[1:])}"
        if guided.dim() == 4 and hint.dim() == 4:
            self.regressor = nn.Conv2d(guided.shape[1], hint.shape[1], kernel_size=1)
            try:
                pool_to_common_size(hint, self.regressor(guided))
            except ValueError as err:
                raise ValueError(f"{where}: spatial sizes cannot be pooled to match ({err})") from None
        elif guided.dim() == 2 and hint.dim() == 2:
            self.regressor = nn.Linear(guided.shape[1], hint.shape[1])
        else:
            raise ValueError(f"{where}: the regressor maps feature maps to feature maps (N×C×H×W) or "
                             "vectors to vectors (N×D); choose layers of the same kind")
        self.regressor.to(example.device)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        assert teacher is not None
        if self.regressor is None:
            raise RuntimeError("fitnets: call setup(student, teacher, example) first to build the regressor")
        p = self.params
        predicted = self.regressor(student.features[p.student_layer])
        hint = teacher.features[p.teacher_layer]
        if predicted.dim() == 4:
            predicted, hint = pool_to_common_size(predicted, hint)
        return {"hint": p.hint_weight * hint_loss(predicted, hint)}

    @classmethod
    def default_stages(cls) -> list[dict[str, Any]]:
        """Stage 1 hints, stage 2 KD with τ = 3 as in the FSP paper's FitNets baseline.

        Stage 1 uses AdamW at learning rate 0.001 without weight decay: the hint loss sums over every
        element of the hint map, so its scale depends on the nets and data, and Adam's step does not.
        Other settings come from ``student.train``.
        """
        return [{"method": {"name": cls.name}, "train": {"optimizer": STAGE1_OPTIMIZER}},
                {"method": {"name": "hinton", "temperature": 3.0, "kd_weight": 0.9, "ce_weight": 0.1}}]
