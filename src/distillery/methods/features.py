"""What the feature methods (FSP, FitNets) share: their stage-1 optimiser, the ``store_teacher``
parameters, the stored-target rows they read, and the shape checks of their set-up.

Feature methods compare intermediate layers, so their losses have a scale set by the networks and
the data rather than by the number of classes; their first stage therefore defaults to Adam(W),
whose step size does not depend on the loss scale (:data:`STAGE1_OPTIMIZER`).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor

from distillery.losses import pool_to_common_size

# The optimiser of a feature method's default first stage (``default_stages``): AdamW at 0.001, no decay.
STAGE1_OPTIMIZER: dict[str, Any] = {"name": "adamw", "lr": 0.001, "weight_decay": 0.0}


def store_teacher_field() -> Any:
    """The ``store_teacher`` parameter of a method with stored teacher targets."""
    return Field("auto", description="store the teacher's per-example targets once instead of running the teacher "
                                     "every step: auto (when the teacher cache is on, the stage does not augment and "
                                     "they fit in teacher.cache_max_mb), true (always; error with augmentation), "
                                     "false (never)")


def store_dir_field() -> Any:
    """The ``store_dir`` parameter of a method with stored teacher targets."""
    return Field(None, description="folder for the stored targets (default: the teacher cache folder, else the "
                                   "run folder)")


class StoredRows:
    """Stored per-example teacher targets by entry name, read by the batch's dataset indices."""

    def __init__(self, method: str, targets: dict[str, Tensor]) -> None:
        self.method = method
        self.targets = targets

    def rows(self, name: str, index: Tensor | None) -> Tensor:
        if index is None:
            raise ValueError(f"{self.method} with stored teacher targets needs the batch's dataset indices: "
                             "call method(student_out, None, targets, index)")
        store = self.targets[name]
        return store[index.to(store.device)].to(index.device)


def spatial_shape(features: Tensor) -> tuple[int, ...]:
    """The positions of a feature map N×C×(L | H×W | D×H×W): () for an N×D vector."""
    return tuple(features.shape[2:])


def check_poolable(where: str, first: tuple[str, Tensor], second: tuple[str, Tensor]) -> None:
    """Two layers' maps must be of one kind (maps of one rank ≥ 3) whose sizes max-pool to match.

    ``where`` starts the message (``fsp pair 1: student``); it names both layers with their sizes.
    """
    (name_a, a), (name_b, b) = first, second
    if a.dim() != b.dim() or a.dim() < 3:
        raise ValueError(f"{where} layers {name_a!r} {tuple(a.shape[1:])} and {name_b!r} {tuple(b.shape[1:])} "
                         "must both give feature maps N×C×… of the same rank (N×C×L, N×C×H×W or N×C×D×H×W)")
    try:
        pool_to_common_size(a, b)
    except ValueError:
        sizes = [("×".join(str(n) for n in spatial_shape(t))) for t in (a, b)]
        raise ValueError(f"{where} layers {name_a!r} ({sizes[0]}) and {name_b!r} ({sizes[1]}) have spatial sizes "
                         "that cannot be max-pooled to match: in every dimension the larger must be a whole "
                         "multiple of the smaller") from None
