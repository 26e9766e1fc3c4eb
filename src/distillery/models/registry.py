"""The model registry: names to factories, plus ``package.module:callable`` for user models."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a factory under its function name.

    Factories take ``in_channels``, ``num_classes`` and ``input_size`` keywords (ignoring what they
    don't need) plus their own options.
    """
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 28,
    **kwargs: Any,
) -> nn.Module:
    """Build a model by registry name or ``"package.module:callable"``.

    A callable is given ``in_channels``, ``num_classes`` and ``input_size`` only if its signature
    names them (and ``kwargs`` does not), so any ``nn.Module`` class or factory works.
    """
    if ":" in name:
        factory = _load_callable(name)
        data_args = {"in_channels": in_channels, "num_classes": num_classes, "input_size": input_size}
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepted = {}
        extra = {k: v for k, v in data_args.items() if k in accepted and k not in kwargs}
        return factory(**extra, **kwargs)
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}; "
            "or give a user model as 'package.module:callable'."
        )
    return _MODELS[name](in_channels=in_channels, num_classes=num_classes, input_size=input_size, **kwargs)


def _load_callable(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} for model {spec!r}: {err}") from err
    try:
        factory = getattr(module, attr)
    except AttributeError as err:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})") from err
    if not callable(factory):
        raise ValueError(f"model {spec!r} is not callable")
    return factory


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered as ``name`` (for listing its options)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]
