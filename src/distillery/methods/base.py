"""The interface every distillation method implements.

A method is one small ``nn.Module`` (so learnable parts such as a FitNets regressor are trained and
checkpointed with the student). Each training step it receives the student's and the teacher's
outputs, including the features of the layers it asked to tap, and returns its loss terms by name,
already weighted; the trainer minimises their sum and logs each term.

In a plain training loop (``loader`` yields inputs, targets and dataset indices):

    method = create_method("hinton", temperature=4, kd_weight=0.5, ce_weight=0.5)
    method.setup(student, teacher, example_inputs)          # checks the pair, builds learnable parts
    for inputs, targets, index in loader:
        teacher_out = method.teacher_outputs(teacher, inputs)
        student_out = run_student(student, inputs, method.student_layers)
        terms = method(student_out, teacher_out, targets, index)   # {"ce": ..., "kd": ...}
        sum(terms.values()).backward()

Optimise ``method.parameters()`` together with the student's (FitNets' regressor lives there).
Methods never run the teacher-output cache themselves: one that can read stored per-example
teacher targets says so in :meth:`Method.target_request`, and whoever trains it (the trainer, or
:func:`distillery.stored_targets.serve_targets` in a user loop) hands them to
:meth:`Method.use_stored_targets`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from distillery.taps import check_layer_names
from distillery.teacher import ModelOutputs, TargetRequest, Teacher, probe_student


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are errors, values are frozen.

    :func:`~distillery.methods.registry.register_method` derives each method's own class from the
    one it declares, adding ``name: Literal["<method>"]``, so a stage's ``method`` section is one
    discriminated union keyed by ``name`` (:data:`distillery.methods.MethodSpec`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str = ""

    def options(self) -> dict[str, Any]:
        """The parameters without ``name``, as plain values."""
        return self.model_dump(mode="json", exclude={"name"})


@dataclass(frozen=True)
class SearchRange:
    """A range ``distillery tune`` searches for one parameter: [low, high], log-uniform when ``log``
    (for scales such as a temperature or a learning rate), whole numbers when ``integer``."""

    low: float
    high: float
    log: bool = False
    integer: bool = False


@dataclass(frozen=True)
class OneMinus:
    """A parameter the search sets to 1 − the parameter ``of`` (Hinton's ce_weight = 1 − kd_weight),
    unless the user gives it a range of its own or fixes it."""

    of: str


class Method(nn.Module):
    """Base class: declare ``Params``, implement :meth:`forward`, register with ``@register_method``.

    ``needs_teacher`` says whether a teacher network must be given; ``accepts_ensemble`` whether
    that teacher may be several networks (only methods that combine the members say yes: the
    others would silently read the first member's features or mix the members' logits);
    ``compares_logits`` whether the loss compares logits class by class (counts must agree);
    ``trains_classifier`` whether the loss reaches the classifier (not so for FSP's and FitNets'
    first stage, after which the test accuracy is that of an untrained head).
    ``student_layers`` and ``teacher_layers`` name the submodules whose outputs the method reads.
    """

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_teacher: ClassVar[bool] = True
    accepts_ensemble: ClassVar[bool] = False
    compares_logits: ClassVar[bool] = False
    trains_classifier: ClassVar[bool] = True  # False for a stage-1 feature method: accuracy means nothing after it
    # Named parameter sets, e.g. {"paper": {...}}: ``preset: paper`` in a stage (or
    # ``create_method(name, preset="paper")``) starts from these values instead of the defaults.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, params: MethodParams | None = None) -> None:
        super().__init__()
        if params is not None and not isinstance(params, self.Params) and issubclass(self.Params, type(params)):
            # the class the method declared, before registering named it: the same values, named
            params = self.Params.model_validate({**params.model_dump(exclude={"name"}), "name": self.Params().name})
        self.params = params if params is not None else self.Params()
        if not isinstance(self.params, self.Params):
            raise TypeError(f"method {getattr(self, 'name', type(self).__name__)!r} takes {self.Params.__name__}, "
                            f"got {type(self.params).__name__}")
        self.student_layers: tuple[str, ...] = ()
        self.teacher_layers: tuple[str, ...] = ()

    def setup(self, student: nn.Module, teacher: Teacher | None, example: Tensor) -> None:
        """Check the pair and build any learnable parts, before training starts.

        ``example`` is one input batch (on the training device) for shape inference. The default
        checks the teacher and the tapped layer names; methods extend it (and raise ``ValueError``
        naming the layers or sizes that do not fit).
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

    def target_request(self) -> TargetRequest | None:
        """The per-example teacher targets this method could read instead of running the teacher
        (FSP matrices, FitNets hints), or None (the default: the teacher runs every step)."""
        return None

    def use_stored_targets(self, targets: dict[str, Tensor]) -> None:
        """Receive the targets of :meth:`target_request` (rows = dataset examples)."""
        raise NotImplementedError(f"method {self.name!r} reads no stored teacher targets")

    @property
    def runs_teacher_every_step(self) -> bool:
        """Whether each training step needs the teacher's forward pass (false for teacher-free
        methods and for methods reading stored targets)."""
        return self.needs_teacher

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before each epoch (0-based) of the stage's ``epochs``; a no-op by
        default. Methods with a schedule of their own (a warm-up, a curriculum) follow it here."""

    def teacher_outputs(self, teacher: Teacher | None, inputs: Tensor,
                        index: Tensor | None = None) -> ModelOutputs | None:
        """The teacher's forward pass this step needs (logits and ``teacher_layers``), or None.

        None when the method has no teacher or reads only stored targets; the trainer and user loops
        call this instead of running the teacher themselves, so a method with stored targets costs
        no teacher forward pass. ``index`` (``Batch.index``) lets a cached teacher serve stored outputs.
        """
        if teacher is None or not self.runs_teacher_every_step:
            return None
        return teacher(inputs, self.teacher_layers, index=index)

    def forward(self, student: ModelOutputs, teacher: ModelOutputs | None, targets: Tensor,
                index: Tensor | None = None) -> dict[str, Tensor]:
        """The weighted loss terms by name.

        ``index`` holds the batch's dataset indices (``Batch.index``); only methods with stored
        per-example targets read it.
        """
        raise NotImplementedError

    @classmethod
    def search_space(cls) -> dict[str, SearchRange | OneMinus]:
        """The parameters ``distillery tune`` searches by default, by name, and their ranges.

        Empty by default: the method has nothing worth searching beyond the training settings
        (learning rate, the epochs of a first stage) that the tuner adds for every stage. Users
        narrow, widen, fix or add parameters in the recipe's ``tune`` section.
        """
        return {}

    @classmethod
    def default_stages(cls) -> list[dict[str, Any]]:
        """The ``distill.stages`` that ``distillery distill --method NAME`` runs: this method alone.

        Two-stage methods (a stage-1 initialisation followed by a main-task stage) override this.
        """
        return [{"method": {"name": cls.name}}]


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
