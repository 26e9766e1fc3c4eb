"""The method registry: ``@register_method("name")`` on a class, as ``@register_model`` on a factory.

Registering derives the method's parameter class with ``name: Literal["name"]``, so every
registered method's parameters together form one union keyed by ``name`` (:data:`MethodSpec`),
which a config validates once, at load.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, SerializeAsAny, TypeAdapter, ValidationError, create_model

from distillery.methods.base import Method, MethodParams

METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: register a :class:`Method` under ``name`` and give it ``name`` and its
    named ``Params`` class (derived from the ``Params`` it declares, so several methods may share one)."""

    def register(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        declared = getattr(cls, "Params", MethodParams)
        cls.name = name
        cls.Params = create_model(  # type: ignore[call-overload]
            f"{cls.__name__}Params", __base__=declared, __module__=cls.__module__, __doc__=declared.__doc__,
            name=(Literal[name], name))
        METHODS[name] = cls
        return cls

    return register


def method_class(name: str) -> type[Method]:
    """The registered method called ``name``, or a ValueError naming the closest names."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), METHODS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def with_preset(cls: type[Method], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over the method's named preset when they name one (``preset: paper``); the
    values given win over the preset's."""
    if "preset" not in values:
        return values
    values = dict(values)
    name = values.pop("preset")
    if name not in cls.PRESETS:
        known = ", ".join(sorted(cls.PRESETS)) or "none"
        raise ValueError(f"method {cls.name!r} has no preset {name!r}; its presets: {known}")
    return {**cls.PRESETS[name], **values}


def parse_method_spec(value: dict[str, Any] | MethodParams) -> MethodParams:
    """A method's parameters from a mapping such as ``{"name": "hinton", "temperature": 4}``
    (or ``{"name": "hinton", "preset": "paper"}``)."""
    if isinstance(value, MethodParams):
        return value
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError(f"a method is a mapping with a 'name' key, got {value!r}")
    cls = method_class(value["name"])
    value = with_preset(cls, value)
    try:
        return TypeAdapter(cls.Params).validate_python(value)
    except ValidationError as err:
        raise ValueError(f"method {cls.name!r}: {err}") from None


# A stage's ``method``: the parameters of whichever registered method its ``name`` names. Dispatch
# goes through the registry when the value is validated, so a method registered after import (a
# user's own) is as valid in a config as a built-in one; dumps keep the method's own fields.
MethodSpec = Annotated[SerializeAsAny[MethodParams], BeforeValidator(lambda value: parse_method_spec(value))]


def create_method(spec: str | MethodParams, **params: Any) -> Method:
    """Build a method from its parameters object, or from its name and parameters (validated;
    unknown keys are errors): ``create_method("hinton", temperature=4)``."""
    if isinstance(spec, MethodParams):
        if params:
            raise TypeError("create_method(params_object) takes no further keyword parameters")
        return method_class(spec.name)(spec)
    cls = method_class(spec)
    try:
        return cls(cls.Params(**with_preset(cls, params)))
    except ValidationError as err:
        raise ValueError(f"method {spec!r}: {err}") from err
