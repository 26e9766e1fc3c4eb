"""``distillery models``: every registered model with its options and size."""

from __future__ import annotations

import inspect

from distillery.models.registry import create_model, list_models, model_factory

DATA_ARGUMENTS = ("in_channels", "num_classes", "input_size")


def describe_models(in_channels: int = 1, num_classes: int = 10, input_size: int = 28) -> str:
    """One line per model: its options with their defaults, and its parameter count for the given
    input (Fashion-MNIST's 1×28×28, 10 classes, by default)."""
    lines = []
    for name in list_models():
        options = [f"{p.name}={p.default!r}" for p in inspect.signature(model_factory(name)).parameters.values()
                   if p.name not in DATA_ARGUMENTS and p.default is not inspect.Parameter.empty]
        model = create_model(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
        count = sum(p.numel() for p in model.parameters())
        lines.append(f"{name}({', '.join(options)}): {count:,} parameters at {in_channels}×{input_size}×{input_size}, "
                     f"{num_classes} classes")
    return "\n".join(lines)
