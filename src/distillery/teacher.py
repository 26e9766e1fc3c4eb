"""The frozen teacher, the outputs of a forward pass, and requests for stored teacher targets.

This module is the ground floor every other layer stands on: methods read :class:`ModelOutputs`,
the trainer runs the :class:`Teacher`, and the teacher-output cache stores what a
:class:`TargetRequest` asks for. It imports nothing of distillery but the layer taps.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from distillery.taps import FeatureTaps


@dataclass
class ModelOutputs:
    """A forward pass: the logits and the tapped features by layer name."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


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
            if not isinstance(member, nn.Module):
                raise TypeError(f"a teacher member must be an nn.Module, got {type(member).__name__}")
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


StoreMode = Literal["auto"] | bool


@dataclass(frozen=True)
class TargetRequest:
    """Per-example teacher targets a method can read instead of running the teacher every step.

    A frozen teacher on un-augmented data gives each example the same features every epoch, so a
    method whose loss reads only a function of them (FSP's matrices, FitNets' hint map) can have
    them computed once and read back by the batch's dataset indices. The method states what it
    needs; the trainer asks the teacher-output store (:mod:`distillery.stored_targets`) to serve it.

    ``entries``: each entry's name in the cache (``fsp_stem__stage1``) and per-example shape;
    ``layers``: the teacher layers to tap; ``targets``: a batch's teacher outputs → the entries
    (rows = examples); ``mode`` and ``folder``: the method's ``store_teacher`` and ``store_dir``.
    """

    method: str
    mode: StoreMode
    folder: str | None
    entries: dict[str, tuple[int, ...]]
    layers: tuple[str, ...]
    targets: Callable[[ModelOutputs], dict[str, Tensor]]


def entry_name(kind: str, *layers: str) -> str:
    """A cache entry name for ``kind`` of the teacher ``layers``, usable as a file name.

    ``entry_name("fsp", "stem", "stage1") == "fsp_stem__stage1"``. Characters other than letters,
    digits, ``.``, ``-`` and ``_`` become ``_``; when that changes a name, or a name holds the
    ``__`` separator, a short hash of the exact names is appended so different layers never share
    an entry.
    """
    safe = [re.sub(r"[^A-Za-z0-9_.-]", "_", layer) for layer in layers]
    name = f"{kind}_{'__'.join(safe)}"
    if safe != list(layers) or any("__" in layer for layer in layers) or not all(layers):
        name += "_" + hashlib.sha256(repr((kind, layers)).encode()).hexdigest()[:8]
    return name
