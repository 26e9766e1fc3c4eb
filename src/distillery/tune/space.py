"""Search spaces of ``distillery tune``: the recipe's ``tune`` section, and the recipe keys a trial sets.

A search space is a list of named parameters, each setting one recipe key. By default it holds

- each stage's method parameters that the method declares (``Method.search_space``): Hinton's
  temperature log-uniform over [1, 32] and kd_weight over [0, 1] with ce_weight = 1 − kd_weight,
  Tf-KD_reg's a, label smoothing's ε, DKD's α/β, DIST's β/γ, FitNets' hint weight;
- each stage's learning rate, log-uniform over [lr/10, 10·lr] around the recipe's;
- the epochs of each stage but the last (the first stage of FitNets and FSP), whole numbers over
  [1, E], E the larger of its own and the last stage's epochs.

With one stage the names are the parameters' own (``temperature``, ``lr``); with several they
carry the stage, counted from 1 (``stage1_epochs``, ``stage2_temperature``).

The recipe's ``tune`` section (or ``--set tune.…``) narrows or widens a range
(``tune.space.temperature: {low: 2, high: 8}``), adds any other parameter of the stages' methods or
their ``lr``, ``weight_decay`` and ``epochs`` (``tune.space.standardize: {choices: [false, true]}``),
fixes one (``tune.fixed.kd_weight: 0.5``) or searches only some (``tune.only: [temperature]``). A
tied parameter (ce_weight) is set free by a range or a value of its own. An unknown name, an
empty range or a range the method's parameters refuse fails before any trial, naming it.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from distillery.config import (
    ConfigError,
    RangeSetting,
    TuneConfig,
    Value,
    apply_override,
    default_recipe,
    format_errors,
    read_yaml_mapping,
    resolve_recipe,
)
from distillery.methods import method_class
from distillery.methods.base import OneMinus, SearchRange
from distillery.recipe import (
    RunConfig,
    method_stages_override,
    validate_config,
)

# The training settings of a stage a search may set: name → key under ``distill.stages.<k>.train``.
STAGE_SETTINGS = {"lr": "optimizer.lr", "weight_decay": "optimizer.weight_decay", "epochs": "epochs"}


# ---------------------------------------------------------------- the space


@dataclass(frozen=True)
class Dimension:
    """A searched parameter: ``name``, the recipe ``key`` it sets, and its range or choices."""

    name: str
    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Value, ...] | None = None

    def suggest(self, trial: Any) -> Value:
        """This parameter's value for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def corner(self, end: str) -> Value:
        """The range's low or high end (the first or last choice)."""
        if self.choices is not None:
            return self.choices[0 if end == "low" else -1]
        value = self.low if end == "low" else self.high
        return int(value) if self.integer else value

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        kind = "whole numbers" if self.integer else ("log-uniform" if self.log else "uniform")
        return f"[{self.low:g}, {self.high:g}], {kind}"


@dataclass(frozen=True)
class Tied:
    """A parameter set to 1 − the searched or fixed parameter ``source``."""

    name: str
    key: str
    source: str


@dataclass(frozen=True)
class SearchSpace:
    """What a trial sets: searched dimensions, fixed values and tied parameters, each by name."""

    dimensions: tuple[Dimension, ...]
    fixed: tuple[tuple[str, str, Value], ...] = ()  # (name, key, value)
    tied: tuple[Tied, ...] = ()

    def sample(self, trial: Any) -> dict[str, Value]:
        """Every parameter's value for an Optuna trial (the searched ones suggested by it)."""
        return self.complete({d.name: d.suggest(trial) for d in self.dimensions})

    def complete(self, searched: Mapping[str, Value]) -> dict[str, Value]:
        """The searched values (a trial's ``params``) with the fixed and tied ones added."""
        values = dict(searched)
        values.update({name: value for name, _, value in self.fixed})
        values.update({t.name: 1 - values[t.source] for t in self.tied})
        return values

    def assignments(self, values: Mapping[str, Value]) -> dict[str, Value]:
        """Recipe key → value for the parameters named in ``values``."""
        keys = {d.name: d.key for d in self.dimensions} | {n: k for n, k, _ in self.fixed}
        keys |= {t.name: t.key for t in self.tied}
        return {keys[name]: value for name, value in values.items()}

    def describe(self) -> list[tuple[str, str]]:
        """(name, what the search does with it) for the report."""
        rows = [(d.name, d.describe()) for d in self.dimensions]
        rows += [(name, f"fixed at {json.dumps(value)}") for name, _, value in self.fixed]
        return rows + [(t.name, f"1 − {t.source}") for t in self.tied]

    def as_dict(self) -> dict[str, Any]:
        return {"dimensions": [asdict(d) for d in self.dimensions], "fixed": [list(f) for f in self.fixed],
                "tied": [asdict(t) for t in self.tied]}


@dataclass(frozen=True)
class Candidate:
    """A parameter a search may set: its ``name``, recipe ``key``, default search (None: only when
    asked) and kind of value."""

    name: str
    key: str
    default: SearchRange | OneMinus | None
    numeric: bool
    integer: bool
    stage_prefix: str


def candidates(config: RunConfig) -> dict[str, Candidate]:
    """Every parameter of ``config``'s stages a search may set, by name (see the module docstring)."""
    stages = config.distill.stages
    last_epochs = (stages[-1].train or config.student.train).epochs
    found: dict[str, Candidate] = {}
    for k, stage in enumerate(stages):
        prefix = f"stage{k + 1}_" if len(stages) > 1 else ""
        cls = method_class(stage.method.name)
        declared = cls.search_space()
        fields = {name: f for name, f in cls.Params.model_fields.items() if name != "name"}
        for name in set(declared) - set(fields):
            raise ValueError(f"method {cls.name!r}: search_space names {name!r}, which is not one of its parameters")
        for name, f in fields.items():
            found[prefix + name] = Candidate(prefix + name, f"distill.stages.{k}.method.{name}", declared.get(name),
                                             numeric=f.annotation in (int, float), integer=f.annotation is int,
                                             stage_prefix=prefix)
        train = stage.train or config.student.train
        lr = train.optimizer.lr
        defaults: dict[str, SearchRange] = {"lr": SearchRange(lr / 10, lr * 10, log=True)}
        if k < len(stages) - 1 and max(train.epochs, last_epochs) > 1:
            defaults["epochs"] = SearchRange(1, max(train.epochs, last_epochs), integer=True)
        for name, key in STAGE_SETTINGS.items():
            found[prefix + name] = Candidate(prefix + name, f"distill.stages.{k}.train.{key}", defaults.get(name),
                                             numeric=True, integer=name == "epochs", stage_prefix=prefix)
    return found


def resolve_space(config: RunConfig, tune: TuneConfig) -> SearchSpace:
    """The search space of ``config``'s stages with ``tune``'s changes; a ConfigError names a bad entry."""
    found = candidates(config)
    for where, names in (("tune.space", tune.space), ("tune.fixed", tune.fixed), ("tune.only", tune.only or ())):
        for name in names:
            if name not in found:
                close = difflib.get_close_matches(name, found, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where}.{name}: unknown parameter.{hint} The stages "
                                  f"({' → '.join(s.method.name for s in config.distill.stages)}) have: "
                                  f"{', '.join(found)}")
    for name in set(tune.space) & set(tune.fixed):
        raise ConfigError(f"tune.space.{name} and tune.fixed.{name}: a parameter is either searched or fixed")
    defaults = {n for n, c in found.items() if isinstance(c.default, SearchRange)}
    searched = ((set(tune.only) if tune.only is not None else defaults) | set(tune.space)) - set(tune.fixed)
    dimensions = tuple(_dimension(found[n], tune.space.get(n)) for n in found if n in searched)
    if not dimensions:
        raise ConfigError("tune: nothing to search: every parameter is fixed or left out by tune.only "
                          f"(parameters here: {', '.join(found)})")
    fixed = tuple((name, found[name].key, value) for name, value in tune.fixed.items())
    tied = tuple(Tied(n, c.key, c.stage_prefix + c.default.of) for n, c in found.items()
                 if isinstance(c.default, OneMinus) and n not in searched and n not in tune.fixed
                 and (c.stage_prefix + c.default.of in searched or c.stage_prefix + c.default.of in tune.fixed))
    return SearchSpace(dimensions, fixed, tied)


def _dimension(candidate: Candidate, setting: RangeSetting | None) -> Dimension:
    """A searched parameter from its default range and the user's changes, checked."""
    name, where = candidate.name, f"tune.space.{candidate.name}"
    if setting is not None and setting.choices is not None:
        return Dimension(name, candidate.key, choices=tuple(setting.choices))
    default = candidate.default if isinstance(candidate.default, SearchRange) else None
    setting = setting or RangeSetting()
    low = setting.low if setting.low is not None else (default.low if default else None)
    high = setting.high if setting.high is not None else (default.high if default else None)
    log = setting.log if setting.log is not None else (default.log if default else False)
    if low is None or high is None:
        raise ConfigError(f"{where}: {name} has no default range; give both low and high (or choices)")
    if not candidate.numeric:
        raise ConfigError(f"{where}: {name} is not a number; give choices: [...] instead of a range")
    if candidate.integer and (low != int(low) or high != int(high)):
        raise ConfigError(f"{where}: {name} takes whole numbers; got the range [{low:g}, {high:g}]")
    if not low < high:
        raise ConfigError(f"{where}: empty range: low {low:g} must lie below high {high:g} "
                          f"(to use one value, set tune.fixed.{name})")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log-uniform range needs low > 0, got {low:g}")
    return Dimension(name, candidate.key, low, high, log, candidate.integer)


# ---------------------------------------------------------------- recipes


def load_tune_recipe(path: str | Path | None, overrides: Sequence[str] = (),
                     method: str | None = None) -> tuple[RunConfig, TuneConfig]:
    """A recipe and its ``tune`` section: the file (or the shipped default), ``method``'s default
    stages if given, then the ``--set`` overrides (``tune.…`` ones go to the tune section)."""
    source = resolve_recipe(path) if path is not None else default_recipe()
    raw = read_yaml_mapping(source)
    tune_raw = raw.pop("tune", None) or {}
    if not isinstance(tune_raw, dict):
        raise ConfigError(f"{source}: tune must be a section of keys, got {type(tune_raw).__name__}")
    recipe_overrides = [o for o in overrides if not o.startswith("tune.")]
    if method is not None:
        recipe_overrides.insert(0, method_stages_override(method, raw, recipe_overrides, str(source)))
    for item in recipe_overrides:
        apply_override(raw, item)
    config = validate_config(raw, source=str(source))
    for item in overrides:
        if item.startswith("tune."):
            apply_override(tune_raw, item.removeprefix("tune."))
    try:
        return config, TuneConfig.model_validate(tune_raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, section=f"{source} (tune)", schema=TuneConfig, prefix="tune.")) from None


def materialised(config: RunConfig) -> dict[str, Any]:
    """``config`` as a plain mapping with every stage's ``train`` written out (a stage without one
    trains with ``student.train``), so a trial may change one stage's settings alone."""
    raw = config.model_dump(mode="json")
    for stage, dumped in zip(config.distill.stages, raw["distill"]["stages"]):
        dumped["train"] = (stage.train or config.student.train).model_dump(mode="json")
    return raw


def recipe_with(raw: Mapping[str, Any], assignments: Mapping[str, Any], source: str = "tune") -> RunConfig:
    """The recipe ``raw`` (as :func:`materialised` gives it) with each dotted key set to its value, validated."""
    changed = copy.deepcopy(dict(raw))
    for key, value in assignments.items():
        *path, last = key.split(".")
        node: Any = changed
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[int(last) if isinstance(node, list) else last] = value
    return validate_config(changed, source=source)


def check_space(space: SearchSpace, raw: Mapping[str, Any]) -> None:
    """Fail before any trial if either end of the space gives a recipe its parameters refuse."""
    for end in ("low", "high"):
        values = space.complete({d.name: d.corner(end) for d in space.dimensions})
        try:
            recipe_with(raw, space.assignments(values), source=f"tune.space at the {end} end of every range")
        except ConfigError as err:
            raise ConfigError(f"{err}\n(the search space sets: {json.dumps(values)})") from None


def tune_folder(config: RunConfig, tune: TuneConfig) -> Path:
    """Where a search writes: ``tune.folder``, else ``<output_dir>/<name>/tune-<method>[+<method>…]``."""
    if tune.folder is not None:
        return Path(tune.folder)
    return Path(config.output_dir) / config.name / f"tune-{'+'.join(s.method.name for s in config.distill.stages)}"
