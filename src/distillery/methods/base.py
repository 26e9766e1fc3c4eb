"""The interface every distillation method implements, and the frozen-teacher wrapper.

A method is one small ``nn.Module`` (so learnable parts such as a FitNets regressor are trained and
checkpointed with the student). Each training step it receives the student's and the teacher's
outputs, including the features of the layers it asked to tap, and returns its loss terms by name,
already weighted; the trainer minimises their sum and logs each term.

In a plain training loop (``loader`` yields inputs, targets and dataset indices):

    method = create_method("hinton", temperature=4, kd_weight=0.9, ce_weight=0.1)
    method.setup(student, teacher, example_inputs)          # checks the pair, builds learnable parts
    method.prepare(teacher, batch_loader, Path("cache"))    # FSP, FitNets: store teacher targets there
    for inputs, targets, index in loader:
        teacher_out = method.teacher_outputs(teacher, inputs)
        student_out = run_student(student, inputs, method.student_layers)
        terms = method(student_out, teacher_out, targets, index)   # {"ce": ..., "kd": ...}
        sum(terms.values()).backward()

Optimise ``method.parameters()`` together with the student's (FitNets' regressor lives there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from distillery.taps import FeatureTaps, check_layer_names

if TYPE_CHECKING:
    from distillery.data.loader import BatchLoader


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ModelOutputs:
    """A forward pass: the logits and the tapped features by layer name."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base class: set ``name``, ``Params`` and implement :meth:`forward`.

    ``needs_teacher`` says whether a teacher network must be given; ``accepts_ensemble`` whether
    that teacher may be several networks (only methods that combine the members say yes: the
    others would silently read the first member's features or mix the members' logits).
    ``student_layers`` and ``teacher_layers`` name the submodules whose outputs the method reads.
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_teacher: ClassVar[bool] = True
    accepts_ensemble: ClassVar[bool] = False
    compares_logits: ClassVar[bool] = False  # the loss compares logits class by class: counts must agree

    def __init__(self, params: MethodParams | None = None) -> None:
        super().__init__()
        self.params = params if params is not None else self.Params()
        self.student_layers: tuple[str, ...] = ()
        self.teacher_layers: tuple[str, ...] = ()

    def setup(self, student: nn.Module, teacher: Teacher | None, example: Tensor) -> None:
        """Check the pair and build any learnable parts, before training starts.

        ``example`` is one input batch (on the training device) for shape inference. The default
        checks the tapped layer names; methods extend it (and raise ``ValueError`` naming the layers
        or sizes that do not fit).
        """
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher")
        if self.needs_teacher and teacher is not None and teacher.is_ensemble and not self.accepts_ensemble:
            raise ValueError(
                f"method {self.name!r} takes a single teacher, got an ensemble of {len(teacher.members)}; "
                "use method 'ensemble' to distil an ensemble"
            )
        check_layer_names(student, self.student_layers, "student")
        if teacher is not None and self.needs_teacher:
            for member in teacher.members:
                check_layer_names(member, self.teacher_layers, "teacher")
        if self.compares_logits:
            check_same_classes(student, teacher, example, self.name)

    def prepare(self, teacher: Teacher | None, loader: BatchLoader, cache_dir: Path | None = None, *,
                run_dir: Path | None = None, max_mb: float | None = None) -> None:
        """Called once with the stage's training loader before the stage trains; a no-op by default.

        Methods that precompute per-example teacher targets (FSP's matrices, FitNets' hints; see
        :mod:`distillery.methods.stored`) do it here, in ``cache_dir`` (the teacher-output cache
        folder; None when caching is off), or ``run_dir`` when told explicitly to store, within
        ``max_mb`` when deciding on their own; they never store for augmented batches (a stored
        target would not match the input).
        """

    def teacher_outputs(self, teacher: Teacher | None, inputs: Tensor,
                        index: Tensor | None = None) -> ModelOutputs | None:
        """The teacher's forward pass this step needs (logits and ``teacher_layers``), or None.

        None when the method has no teacher or reads only stored targets; the trainer and user loops
        call this instead of running the teacher themselves, so a method with stored targets costs
        no teacher forward pass. ``index`` (``Batch.index``) lets a cached teacher serve stored outputs.
        """
        if teacher is None or not self.needs_teacher or self.uses_stored_targets:
            return None
        return teacher(inputs, self.teacher_layers, index=index)

    @property
    def uses_stored_targets(self) -> bool:
        """Whether :meth:`prepare` stored the teacher targets this method reads (FSP matrices, FitNets
        hints): then :meth:`teacher_outputs` runs no teacher forward pass."""
        return False

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        """The weighted loss terms by name.

        ``index`` holds the batch's dataset indices (``Batch.index``); only methods with stored
        per-example targets read it.
        """
        raise NotImplementedError

    @classmethod
    def default_stages(cls) -> list[dict[str, Any]]:
        """The ``distill.stages`` that ``distillery distill --method NAME`` runs: this method alone.

        Two-stage methods (a stage-1 initialisation followed by a main-task stage) override this.
        """
        return [{"method": {"name": cls.name}}]


class Teacher:
    """One or more frozen networks: always in eval mode, never trained, run without grad.

    Not an ``nn.Module`` on purpose: it can never be registered inside the student or a method,
    so its parameters cannot reach an optimiser or a student checkpoint. An ensemble's members are
    returned together: ``logits`` is M×N×K for M > 1 members (their features are the first
    member's) and N×K for a single teacher.
    """

    def __init__(self, members: nn.Module | Sequence[nn.Module]) -> None:
        self.members = [members] if isinstance(members, nn.Module) else list(members)
        if not self.members:
            raise ValueError("a teacher needs at least one network")
        for member in self.members:
            member.eval()
            member.requires_grad_(False)

    def to(self, device: torch.device | str) -> Teacher:
        for member in self.members:
            member.to(device)
        return self

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    @torch.no_grad()
    def __call__(self, inputs: Tensor, layers: Sequence[str] = (), index: Tensor | None = None) -> ModelOutputs:
        """The members' outputs on ``inputs`` (``index``, the batch's dataset indices, is for cached
        teachers such as :class:`distillery.cache.CachedTeacher` and is not needed here)."""
        outputs = []
        for member in self.members:
            member.eval()  # guard against a caller having switched it back to training mode
            with FeatureTaps(member, layers, "teacher") as taps:
                logits = member(inputs)
            outputs.append(ModelOutputs(logits, dict(taps.features)))
        if not self.is_ensemble:
            return outputs[0]
        return ModelOutputs(torch.stack([o.logits for o in outputs]), outputs[0].features)


def run_student(student: nn.Module, inputs: Tensor, layers: Sequence[str] = ()) -> ModelOutputs:
    """The student's forward pass with its tapped features (with grad)."""
    with FeatureTaps(student, layers, "student") as taps:
        logits = student(inputs)
    return ModelOutputs(logits, dict(taps.features))


@torch.no_grad()
def probe_student(student: nn.Module, example: Tensor, layers: Sequence[str] = ()) -> ModelOutputs:
    """One student forward pass in eval mode without grad, for shape checks in ``setup``.

    Eval mode leaves batch-norm statistics untouched; the training flag is restored afterwards.
    """
    was_training = student.training
    student.eval()
    try:
        return run_student(student, example, layers)
    finally:
        student.train(was_training)


def check_same_classes(student: nn.Module, teacher: Teacher | None, example: Tensor, method: str) -> None:
    """Logit methods compare class by class: the teacher and student must output as many classes."""
    if teacher is None:
        return
    k_student = probe_student(student, example[:2]).logits.shape[-1]
    k_teacher = teacher(example[:2]).logits.shape[-1]
    if k_student != k_teacher:
        raise ValueError(
            f"method {method!r} compares logits, but the teacher outputs {k_teacher} classes and the "
            f"student {k_student}; use a feature method (fsp, fitnets) for a teacher of another task"
        )
