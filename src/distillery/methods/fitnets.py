"""FitNets hints (Romero et al. 2015), stage 1: a guided student layer learns to predict a teacher hint layer.

A learned regressor r (a 1×1 convolution of the maps' rank for feature maps, a linear map for
vectors) takes the guided layer's output v_g(x) to the hint's shape, and r and the student's
layers up to the guided one minimise the L2 hint loss. Stage 2 trains the whole student with KD
from there: run ``fitnets`` then ``hinton`` as two stages (``distillery distill --method fitnets``
does; the shipped recipe ``fitnets`` is the full run).

``store_teacher`` (``auto``) keeps the teacher's hint map of every training example in the
teacher-output cache (entry ``hint_<layer>``) and reads it back each step instead of running the
teacher; see :mod:`distillery.stored_targets` for when ``auto`` stores.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from distillery.losses import hint_loss, pool_to_common_size
from distillery.methods.base import Method, MethodParams, ModelOutputs, OneMinus, SearchRange
from distillery.methods.features import (
    STAGE1_OPTIMIZER,
    StoredRows,
    store_dir_field,
    store_teacher_field,
)
from distillery.methods.registry import register_method
from distillery.taps import UnknownLayerError
from distillery.teacher import StoreMode, TargetRequest, Teacher, entry_name, probe_student

CONVOLUTIONS = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}  # a map's rank (N×C×…) → its 1×1 convolution


class FitNetsParams(MethodParams):
    student_layer: str = Field("stage2", description="the guided student layer (a module path)")
    teacher_layer: str = Field("stage2", description="the teacher's hint layer (a module path)")
    hint_weight: float = Field(1.0, gt=0, le=1e6, description="weight of the hint loss ½·mean (u_h(x) − r(v_g(x)))²")
    store_teacher: StoreMode = store_teacher_field()
    store_dir: str | None = store_dir_field()


@register_method("fitnets")
class FitNets(Method):
    """L = hint_weight · ½ · mean over the hint's elements of (u_h(x) − r(v_g(x)))², averaged over examples.

    Feature maps of different sizes are max-pooled to the smaller one (after r). The loss ignores
    the classifier, so the teacher may have been trained on another task or class count.
    """

    Params = FitNetsParams
    trains_classifier = False

    @classmethod
    def search_space(cls) -> dict[str, SearchRange | OneMinus]:
        """The hint weight; the tuner adds this stage's epochs and learning rate, as for every first stage."""
        return {"hint_weight": SearchRange(0.1, 10.0, log=True)}

    def __init__(self, params: MethodParams | None = None) -> None:
        super().__init__(params)
        self.student_layers = (self.params.student_layer,)
        self.teacher_layers = (self.params.teacher_layer,)
        self.regressor: nn.Module | None = None
        self._hint_shape: tuple[int, ...] | None = None  # one example's hint, known after setup
        self._stored: StoredRows | None = None

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
        self._hint_shape = tuple(hint.shape[1:])
        self.regressor = build_regressor(guided, hint, p.student_layer, p.teacher_layer).to(example.device)

    # ------------------------------------------------------------------ stored teacher hints

    def target_request(self) -> TargetRequest | None:
        p = self.params
        if p.store_teacher is False:
            return None
        if self._hint_shape is None:
            raise RuntimeError("fitnets: call setup(student, teacher, example) before asking for stored targets")
        name = entry_name("hint", p.teacher_layer)
        return TargetRequest(self.name, p.store_teacher, p.store_dir, entries={name: self._hint_shape},
                             layers=self.teacher_layers, targets=lambda out: {name: out.features[p.teacher_layer]})

    def use_stored_targets(self, targets: dict[str, Tensor]) -> None:
        self._stored = StoredRows(self.name, targets)

    @property
    def runs_teacher_every_step(self) -> bool:
        return self._stored is None

    # ------------------------------------------------------------------ the loss

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        if self.regressor is None:
            raise RuntimeError("fitnets: call setup(student, teacher, example) first to build the regressor")
        p = self.params
        predicted = self.regressor(student.features[p.student_layer])
        if self._stored is not None:
            hint = self._stored.rows(entry_name("hint", p.teacher_layer), index)
        elif teacher is None:
            raise ValueError("fitnets needs the teacher's outputs (method.teacher_outputs(teacher, inputs))")
        else:
            hint = teacher.features[p.teacher_layer]
        if predicted.dim() > 2:
            predicted, hint = pool_to_common_size(predicted, hint)
        return {"hint": p.hint_weight * hint_loss(predicted, hint)}

    @classmethod
    def default_stages(cls) -> list[dict[str, Any]]:
        """Stage 1 hints with the feature methods' optimiser
        (:data:`~distillery.methods.features.STAGE1_OPTIMIZER`), stage 2 KD with τ = 3 as in the FSP
        paper's FitNets baseline."""
        return [{"method": {"name": cls.name}, "train": {"optimizer": STAGE1_OPTIMIZER}},
                {"method": {"name": "hinton", "temperature": 3.0, "kd_weight": 0.9, "ce_weight": 0.1}}]


def build_regressor(guided: Tensor, hint: Tensor, student_layer: str, teacher_layer: str) -> nn.Module:
    """r: a 1×1 convolution of the maps' rank (N×C×L, N×C×H×W, N×C×D×H×W) or a linear map (N×D vectors)."""
    where = f"fitnets: guided student layer {student_layer!r} {tuple(guided.shape[1:])}, " \
            f"teacher hint layer {teacher_layer!r} {tuple(hint.shape[1:])}"
    if guided.dim() == 2 and hint.dim() == 2:
        return nn.Linear(guided.shape[1], hint.shape[1])
    if guided.dim() != hint.dim() or guided.dim() not in CONVOLUTIONS:
        raise ValueError(f"{where}: the regressor maps feature maps to maps of the same rank (N×C×L, N×C×H×W or "
                         "N×C×D×H×W) or vectors to vectors (N×D); choose layers of the same kind")
    regressor = CONVOLUTIONS[guided.dim()](guided.shape[1], hint.shape[1], kernel_size=1).to(guided.device)
    try:
        pool_to_common_size(hint, regressor(guided))
    except ValueError as err:
        raise ValueError(f"{where}: spatial sizes cannot be pooled to match ({err})") from None
    return regressor
