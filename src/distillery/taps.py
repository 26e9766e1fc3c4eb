"""Feature taps: capture the outputs of named submodules with forward hooks.

Names are the dotted paths of ``model.named_modules()`` (``"stage2.0.conv1"``). Hooks live only
inside the ``with`` block; a wrong name fails at once with the closest valid names.

    with FeatureTaps(model, ["stage1", "stage2"]) as taps:
        logits = model(x)
    taps.features["stage1"]  # the stage-1 output of this forward pass
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from torch import Tensor, nn


class UnknownLayerError(ValueError):
    """A layer name that is not a submodule of the model."""


def check_layer_names(model: nn.Module, names: Iterable[str], role: str = "model") -> None:
    """Raise :class:`UnknownLayerError` for any name that is not in ``model.named_modules()``."""
    find_layers(model, names, role)


def find_layers(model: nn.Module, names: Iterable[str], role: str = "model") -> list[nn.Module]:
    """The submodules with these dotted names, in order; :class:`UnknownLayerError` (with the
    closest valid names) for a name that is not in ``model.named_modules()``."""
    names = list(names)
    if not names:
        return []  # no walk over the modules: the trainer taps no layer on most steps
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.4)
            suggestion = f" Closest names: {', '.join(close)}." if close else ""
            raise UnknownLayerError(
                f"{role} ({type(model).__name__}) has no layer named {name!r}.{suggestion} "
                f"List them with: [n for n, _ in model.named_modules()]"
            )
    return [modules[name] for name in names]


class FeatureTaps:
    """Context manager recording the output tensor of each named submodule on every forward."""

    def __init__(self, model: nn.Module, names: Iterable[str], role: str = "model") -> None:
        self.model = model
        self.names = tuple(dict.fromkeys(names))
        self._layers = find_layers(model, self.names, role)
        self.features: dict[str, Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> FeatureTaps:
        self.features = {}
        for name, layer in zip(self.names, self._layers):
            self._handles.append(layer.register_forward_hook(self._recorder(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, name: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            if not isinstance(output, Tensor):
                raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a Tensor; tap another layer")
            self.features[name] = output

        return hook
