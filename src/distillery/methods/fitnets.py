"""FitNets hints (Romero et al. 2015), stage 1: a guided student layer learns to predict a teacher hint layer.

A learned regressor r (a 1×1 convolution for feature maps, a linear map for vectors) takes the
guided layer's output v_g(x) to the hint's shape, and r and the student's layers up to the guided
one minimise the L2 hint loss. Stage 2 trains the whole student with KD from there: run
``fitnets`` then ``hinton`` as two stages (``distillery distill --method fitnets`` does; the
shipped recipe ``fitnets`` is the full run).

``store_teacher`` (``auto`` by default) keeps the teacher's hint map of every training example in
the teacher-output cache (entry ``hint_<layer>``) and reads it back each step instead of running
the teacher: with ``auto`` where that is exact and fits the budget (``teacher.cache: auto``, a
stage without augmentation, at most ``teacher.cache_max_mb`` of hints; a ResNet stage2 hint on
60k 28×28 images is ~1,440 MB, so raise the budget to store it), ``true`` always (an error with
augmentation), ``false`` never. See :mod:`distillery.methods.stored`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from torch import Tensor, nn

from distillery.cache import entry_name
from distillery.data.loader import BatchLoader
from distillery.losses import hint_loss, pool_to_common_size
from distillery.methods.base import Method, MethodParams, ModelOutputs, Teacher, probe_student
from distillery.methods.fsp import STAGE1_OPTIMIZER
from distillery.methods.stored import StoreMode, store_dir_field, store_teacher_field, stored_targets
from distillery.taps import UnknownLayerError


class FitNetsParams(MethodParams):
    student_layer: str = Field("stage2", description="the guided student layer (a module path)")
    teacher_layer: str = Field("stage2", description="the teacher's hint layer (a module path)")
    hint_weight: float = Field(1.0, gt=0, description="weight of the hint loss ½·‖u_h(x) − r(v_g(x))‖²")
    store_teacher: StoreMode = store_teacher_field()
    store_dir: str | None = store_dir_field()


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
        self._hint_shape: tuple[int, ...] | None = None  # one example's hint, known after setup
        self._stored: Tensor | None = None

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

    def prepare(self, teacher: Teacher | None, loader: BatchLoader, cache_dir: Path | None = None, *,
                run_dir: Path | None = None, max_mb: float | None = None) -> None:
        """Load the teacher's per-example hints from the cache, or compute and store them, when
        ``store_teacher`` says so (see the module docstring); otherwise the teacher runs every step."""
        p = self.params
        if p.store_teacher is not False and self._hint_shape is None:
            raise RuntimeError("fitnets: call setup(student, teacher, example) before prepare")
        name = entry_name("hint", p.teacher_layer)
        stored = stored_targets(
            f"method {self.name!r}", p.store_teacher, p.store_dir, teacher, loader,
            shapes={name: self._hint_shape or ()}, layers=self.teacher_layers,
            targets=lambda out: {name: out.features[p.teacher_layer]},
            cache_dir=cache_dir, run_dir=run_dir, max_mb=max_mb)
        self._stored = None if stored is None else stored[name]

    @property
    def uses_stored_targets(self) -> bool:
        """Whether :meth:`prepare` loaded stored teacher hints (no teacher forward pass per step)."""
        return self._stored is not None

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        if self.regressor is None:
            raise RuntimeError("fitnets: call setup(student, teacher, example) first to build the regressor")
        p = self.params
        predicted = self.regressor(student.features[p.student_layer])
        if self._stored is not None:
            if index is None:
                raise ValueError("fitnets with stored teacher hints needs the batch's dataset indices: "
                                 "call method(student_out, None, targets, index)")
            hint = self._stored[index.to(self._stored.device)].to(index.device)
        elif teacher is None:
            raise ValueError("fitnets needs the teacher's outputs (method.teacher_outputs(teacher, inputs))")
        else:
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
