"""Distillation methods, one small class per method, and the registry that names them.

    method = create_method("hinton", temperature=4, kd_weight=0.5, ce_weight=0.5)

Each method module registers its class with ``@register_method``; importing this package imports
them all. :data:`MethodSpec` is the union of every registered method's parameters keyed by
``name``: what a config's ``distill.stages[i].method`` section is validated against.
"""

from __future__ import annotations

from distillery.methods import (  # noqa: F401 (each module registers its method)
    cross_entropy,
    dist,
    dkd,
    ensemble,
    fitnets,
    fsp,
    hinton,
    label_smoothing,
    logits,
    tfkd,
)
from distillery.methods.base import Method, MethodParams
from distillery.methods.registry import (
    METHODS,
    MethodSpec,
    create_method,
    method_class,
    parse_method_spec,
    register_method,
)
from distillery.teacher import ModelOutputs, Teacher, run_student

__all__ = ["METHODS", "Method", "MethodParams", "MethodSpec", "ModelOutputs", "Teacher", "create_method",
           "method_class", "parse_method_spec", "register_method", "run_student"]
