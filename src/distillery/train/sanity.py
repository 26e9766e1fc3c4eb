"""Warnings a user should never miss: a student that collapsed, dead layers, a loss that does not fall.

:class:`SanityChecks` is one of the trainer's built-in callbacks. After each stage it checks the
student: test accuracy at chance level, or a layer whose outputs are all zero on a probe batch
(every ReLU dead, as a too-large learning rate leaves them), each gives a warning naming the stage,
the layer and what to try. Within a stage's first epoch it compares the mean loss of the epoch's
first tenth of steps with the whole epoch's: a loss that has not fallen is said too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from distillery.train.callbacks import Callback, EpochEvent, StageEvent, StepEvent

CHANCE_FACTOR = 1.5  # accuracy below CHANCE_FACTOR / K counts as chance level on K classes


class TrainingWarning(UserWarning):
    """Training went on, but its result is probably useless (collapsed, dead layers, no progress)."""


class SanityChecks(Callback):
    """See the module docstring. ``probe`` returns one input batch on the training device;
    ``num_classes`` sets the chance level; warnings go to ``echo`` and :mod:`warnings`."""

    def __init__(self, label: str, probe: Callable[[], Tensor], num_classes: int,
                 echo: Callable[[str], None]) -> None:
        self.label, self.probe, self.num_classes, self.echo = label, probe, num_classes, echo
        self.messages: list[str] = []
        self._early_loss: float | None = None
        self._last_accuracy: float | None = None

    def _warn(self, message: str) -> None:
        self.messages.append(message)
        self.echo(f"[{self.label}] warning: {message}")
        warnings.warn(message, TrainingWarning, stacklevel=2)

    def on_step_end(self, event: StepEvent) -> None:
        early = max(1, event.stage.steps // 10)  # the first tenth of the first epoch's steps
        if event.epoch == 0 and event.step + 1 == early < event.stage.steps:
            self._early_loss = event.sums.mean_loss()

    def on_epoch_end(self, event: EpochEvent) -> None:
        self._last_accuracy = event.record["test_accuracy"]
        if event.epoch == 0 and self._early_loss is not None:
            loss = event.record["train_loss"]
            if not loss < self._early_loss:
                self._warn(f"stage {event.stage.stage + 1} ({event.stage.method}): the loss has not fallen in its "
                           f"first epoch ({self._early_loss:.4g} over its first steps, {loss:.4g} over the epoch); "
                           "lower the stage's learning rate or check the data")
        self._early_loss = None

    def on_stage_end(self, event: StageEvent) -> None:
        where = f"after stage {event.stage + 1} ({event.method})"
        trains_classifier = event.trainer.stages[event.stage].method.trains_classifier
        if trains_classifier and self._last_accuracy is not None and \
                self._last_accuracy < CHANCE_FACTOR / self.num_classes:
            self._warn(f"{where} the student is at chance level ({100 * self._last_accuracy:.2f} % test accuracy on "
                       f"{self.num_classes} classes); lower that stage's learning rate (train.optimizer.lr)")
        dead = dead_layers(event.trainer.student, self.probe())
        if dead:
            self._warn(f"{where} the student's layer(s) {', '.join(dead[:5])} output only zeros on a probe batch "
                       "(dead units); lower that stage's learning rate (train.optimizer.lr)")


@torch.no_grad()
def dead_layers(model: nn.Module, inputs: Tensor) -> list[str]:
    """The names of ``model``'s leaf modules whose output is all zeros on ``inputs`` (eval mode)."""
    found: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if name and not any(module.children()) and not isinstance(module, (nn.Dropout, nn.Identity)):
            def record(mod: nn.Module, args: object, output: object, name: str = name) -> None:
                if isinstance(output, Tensor) and output.numel() > 1 and not output.any():
                    found.append(name)
            hooks.append(module.register_forward_hook(record))
    was_training = model.training
    model.eval()
    try:
        model(inputs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return found
