"""Distillation methods, one small class per method, and the registry that names them.

    method = create_method("hinton", temperature=4, kd_weight=0.9, ce_weight=0.1)
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from distillery.methods.base import Method, MethodParams, ModelOutputs, Teacher, run_student
from distillery.methods.cross_entropy import CrossEntropy
from distillery.methods.ensemble import EnsembleKD
from distillery.methods.fitnets import FitNets
from distillery.methods.fsp import FSP
from distillery.methods.hinton import HintonKD
from distillery.methods.label_smoothing import LabelSmoothing
from distillery.methods.logits import LogitMatching
from distillery.methods.tfkd import TfKDReg, TfKDSelf

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (CrossEntropy, HintonKD, LogitMatching, EnsembleKD, LabelSmoothing, FitNets, FSP, TfKDSelf, TfKDReg)
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def create_method(name: str, **params: Any) -> Method:
    """Build a method from its registry name and parameters (validated; unknown keys are errors)."""
    cls = method_class(name)
    try:
        return cls(cls.Params(**params))
    except ValidationError as err:
        raise ValueError(f"method {name!r}: {err}") from err


__all__ = ["METHODS", "Method", "MethodParams", "ModelOutputs", "Teacher", "create_method", "method_class",
           "run_student"]
