"""Networks for a dataset: build the one a model spec names, or load a trained one from a file."""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

from pydantic import ValidationError
from torch import nn

from distillery.config import ModelConfig
from distillery.data import ImageDataset
from distillery.models import create_model
from distillery.models.registry import AllowCode, CodePolicy
from distillery.train.checkpoint import CheckpointError, load_model_state, load_weights


def build_model(spec: ModelConfig, data: ImageDataset, num_classes: int | None = None,
                allow_code: AllowCode | CodePolicy = False) -> nn.Module:
    """The network ``spec`` names, sized for ``data`` (``num_classes`` overrides the data's class count).

    A ``package.module:callable`` is imported and called only as ``allow_code`` permits (the user's
    ``--allow-code`` consent; see :class:`~distillery.models.registry.CodePolicy`).
    """
    in_channels, input_size = input_geometry(tuple(data.inputs.shape[1:]))
    try:
        return create_model(spec.name, in_channels=in_channels, num_classes=num_classes or data.num_classes,
                            input_size=input_size, allow_code=allow_code, **spec.kwargs)
    except TypeError as err:  # an option the factory does not take, or a missing one
        raise ValueError(f"model {spec.name!r} cannot be built with kwargs {spec.kwargs}: {err}") from None


def input_geometry(sample_shape: tuple[int, ...]) -> tuple[int, int]:
    """What a model factory is told of one sample: (channels, side) of a square C×H×W image, else
    (the number of input values, 1) — what a network that flattens its input (an MLP) needs. Models
    of other shapes (a 1-D convolution) are the user's own and read their sizes from their kwargs."""
    if len(sample_shape) == 3 and sample_shape[1] == sample_shape[2]:
        return sample_shape[0], sample_shape[1]
    return math.prod(sample_shape), 1


def load_trained_model(path: str | Path, spec: ModelConfig | None, data: ImageDataset,
                       trusted_models: Collection[str] = (),
                       allow_code: AllowCode | CodePolicy = False) -> tuple[nn.Module, ModelConfig]:
    """A network from a distillery checkpoint (built from its own model spec unless ``spec`` is
    given) or from a plain ``state_dict`` file (``spec`` required).

    A spec read from the file may name only a registered model, or a ``package.module:callable``
    listed in ``trusted_models`` (the user's own config): otherwise a tampered file could make us
    import and call any function with arguments of its choosing.

    A distillery checkpoint keeps its own class count, so a teacher trained on another task loads
    as it was trained (feature methods such as fsp and fitnets can use it).
    """
    weights, meta = load_weights(path)
    if spec is None:
        if meta is None:
            raise CheckpointError(f"{path}: a plain state_dict needs the model named in the config")
        try:
            spec = ModelConfig.model_validate(meta["model"])
        except (KeyError, TypeError, ValidationError):
            raise CheckpointError(f"{path}: its model description is missing or malformed") from None
        if ":" in spec.name and spec.name not in trusted_models:
            raise CheckpointError(
                f"{path}: the checkpoint names the user model {spec.name!r}; code named by a file is not imported. "
                "Name the same model in your config (teacher.model or student.model) to allow it."
            )
    model = build_model(spec, data, (meta or {}).get("num_classes"), allow_code)
    load_model_state(model, weights, str(path))
    return model, spec
