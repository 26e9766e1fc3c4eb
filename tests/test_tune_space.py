"""The search space of `distillery tune`: defaults declared by the methods, the recipe's tune section,
and the errors that stop a search before any trial. Nothing here trains."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from distillery.config import ConfigError, TuneConfig
from distillery.methods import METHODS
from distillery.methods.base import OneMinus, SearchRange
from distillery.recipe import load_config
from distillery.tune.space import (
    candidates,
    check_space,
    load_tune_recipe,
    materialised,
    recipe_with,
    resolve_space,
)


def space_of(overrides: list[str], method: str | None = None):
    config, tune = load_tune_recipe(None, overrides, method)
    return config, resolve_space(config, tune)


def by_name(space) -> dict:
    return {d.name: d for d in space.dimensions}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_declared_range_names_a_parameter_and_is_not_empty(name: str) -> None:
    cls = METHODS[name]
    for param, declared in cls.search_space().items():
        assert param in cls.Params.model_fields
        if isinstance(declared, SearchRange):
            assert declared.low < declared.high and (declared.low > 0 or not declared.log)
            cls.Params(**{param: declared.low})  # both ends are values the method accepts
            cls.Params(**{param: declared.high})
        else:
            assert isinstance(declared, OneMinus) and declared.of in cls.Params.model_fields


def test_default_space_of_one_stage_hinton_ties_ce_weight_to_kd_weight() -> None:
    config, space = space_of([])
    dims = by_name(space)
    assert list(dims) == ["temperature", "kd_weight", "lr"]
    t = dims["temperature"]
    assert (t.low, t.high, t.log, t.key) == (1.0, 32.0, True, "distill.stages.0.method.temperature")
    lr = config.distill.stages[0].train or config.student.train
    assert dims["lr"].low == pytest.approx(lr.optimizer.lr / 10) and dims["lr"].high == pytest.approx(
        lr.optimizer.lr * 10)
    values = space.complete({"temperature": 3.0, "kd_weight": 0.3, "lr": 0.01})
    assert values["ce_weight"] == pytest.approx(0.7)
    assert space.assignments(values)["distill.stages.0.method.ce_weight"] == pytest.approx(0.7)


def test_two_stage_method_names_carry_the_stage_and_search_stage1_epochs() -> None:
    config, space = space_of([], method="fitnets")
    dims = by_name(space)
    assert set(dims) == {"stage1_hint_weight", "stage1_lr", "stage1_epochs", "stage2_temperature",
                         "stage2_kd_weight", "stage2_lr"}
    epochs = dims["stage1_epochs"]
    assert epochs.integer and (epochs.low, epochs.high) == (1, config.student.train.epochs)
    assert epochs.key == "distill.stages.0.train.epochs"
    # fitnets' stage 1 trains with AdamW at 0.001: its lr range is around that, not student.train's
    assert dims["stage1_lr"].low == pytest.approx(1e-4) and dims["stage1_lr"].high == pytest.approx(1e-2)
    assert [t.name for t in space.tied] == ["stage2_ce_weight"]


def test_a_narrowed_bound_keeps_the_other_bound_and_the_scale() -> None:
    _, space = space_of(["tune.space.temperature.low=2"])
    t = by_name(space)["temperature"]
    assert (t.low, t.high, t.log) == (2, 32, True)


def test_fixed_and_only_leave_the_rest_at_the_recipe_values() -> None:
    _, space = space_of(["tune.fixed.kd_weight=0.25", "tune.only=[temperature]"])
    assert [d.name for d in space.dimensions] == ["temperature"]
    values = space.complete({"temperature": 5.0})
    assert values == {"temperature": 5.0, "kd_weight": 0.25, "ce_weight": 0.75}  # lr: the recipe's


def test_a_tied_parameter_given_a_range_is_searched_freely() -> None:
    _, space = space_of(["tune.space.ce_weight={low: 0, high: 1}"])
    assert "ce_weight" in by_name(space) and not space.tied


def test_choices_and_added_parameters() -> None:
    _, space = space_of(["tune.space.standardize.choices=[false, true]",
                         "tune.space.weight_decay={low: 1e-5, high: 1e-3, log: true}"])
    dims = by_name(space)
    assert dims["standardize"].choices == (False, True)
    assert dims["weight_decay"].key == "distill.stages.0.train.optimizer.weight_decay" and dims["weight_decay"].log


@pytest.mark.parametrize(("overrides", "words"), [
    (["tune.space.temprature.low=2"], ["tune.space.temprature: unknown parameter", "Did you mean 'temperature'"]),
    (["tune.fixed.alpha=1"], ["tune.fixed.alpha: unknown parameter", "temperature, kd_weight"]),
    (["tune.only=[temperature, betta]"], ["tune.only.betta: unknown parameter"]),
    (["tune.space.temperature={low: 8, high: 2}"], ["tune.space.temperature: empty range", "low 8", "high 2"]),
    (["tune.space.temperature={low: 4, high: 4}"], ["tune.space.temperature: empty range", "tune.fixed.temperature"]),
    (["tune.space.temperature.low=0"], ["tune.space.temperature: a log-uniform range needs low > 0"]),
    (["tune.space.weight_decay.high=0.1"], ["tune.space.weight_decay: weight_decay has no default range"]),
    (["tune.space.temperature={low: 2}", "tune.fixed.temperature=3"], ["either searched or fixed"]),
    (["tune.fixed.temperature=3", "tune.fixed.kd_weight=0.5", "tune.fixed.lr=0.1"], ["nothing to search"]),
], ids=["unknown", "unknown-fixed", "unknown-only", "reversed", "single-point", "log-zero", "no-default",
        "both", "nothing"])
def test_bad_space_fails_naming_the_entry(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        space_of(overrides)
    for w in words:
        assert w in str(err.value)


def test_range_on_a_text_parameter_or_fractional_epochs_is_refused() -> None:
    with pytest.raises(ConfigError, match="stage1_student_layer is not a number"):
        space_of(["tune.space.stage1_student_layer={low: 1, high: 2}"], method="fitnets")
    with pytest.raises(ConfigError, match="stage1_epochs takes whole numbers"):
        space_of(["tune.space.stage1_epochs={low: 1.5, high: 4}"], method="fitnets")


def test_a_range_the_method_refuses_fails_before_any_trial_naming_the_key() -> None:
    config, space = space_of(["tune.space.kd_weight.high=2"])
    with pytest.raises(ConfigError) as err:
        check_space(space, materialised(config))
    assert "distill.stages.0.method.kd_weight" in str(err.value) and "less than or equal to 1" in str(err.value)
    default_config, default_space = space_of([])
    check_space(default_space, materialised(default_config))  # the default space passes


def test_tune_section_in_the_recipe_file_and_its_errors(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {model: {name: cnn}}\nstudent: {model: {name: mlp}}\n"
                      "tune:\n  n_trials: 7\n  space: {temperature: {high: 8}}\n  fixed: {kd_weight: 0.5}\n")
    config, tune = load_tune_recipe(recipe, ["tune.pruner.name=successive_halving"])
    assert (tune.n_trials, tune.space["temperature"].high, tune.fixed, tune.pruner.name) == (
        7, 8, {"kd_weight": 0.5}, "successive_halving")
    assert config.student.model.name == "mlp"
    with pytest.raises(ConfigError, match=r"tune.n_trails: unknown key. Did you mean 'n_trials'"):
        load_tune_recipe(recipe, ["tune.n_trails=3"])
    with pytest.raises(ConfigError, match="confirm_seeds must be 0"):
        load_tune_recipe(recipe, ["tune.confirm_seeds=2"])
    with pytest.raises(ConfigError, match="student.train.epocs: unknown key"):  # the recipe part is checked too
        load_tune_recipe(recipe, ["student.train.epocs=3"])


def test_method_stages_lay_stage1_settings_over_student_train() -> None:
    config, _ = load_tune_recipe(None, ["student.train.epochs=7"], method="fsp")
    plain = load_config(None, ["student.train.epochs=7"])
    stage1 = config.distill.stages[0].train
    assert [s.method.name for s in config.distill.stages] == ["fsp", "ce"]
    assert stage1.epochs == 7 and stage1.optimizer.name == "adamw"
    assert stage1.batch_size == plain.student.train.batch_size


def test_sampled_values_lie_in_their_ranges_and_reach_the_recipe() -> None:
    config, space = space_of(["tune.space.standardize.choices=[false, true]"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    raw = materialised(config)
    for _ in range(5):
        values = space.sample(study.ask())
        t = values["temperature"]
        assert 1 <= t <= 32 and 0 <= values["kd_weight"] <= 1 and values["standardize"] in (False, True)
        trial_config = recipe_with(raw, space.assignments(values))
        method = trial_config.distill.stages[0].method
        assert (method.temperature, method.kd_weight, method.ce_weight) == (t, values["kd_weight"],
                                                                             1 - values["kd_weight"])
        assert math.isclose(trial_config.distill.stages[0].train.optimizer.lr, values["lr"])
        assert trial_config.student.train == config.student.train  # only the stage's own settings change


def test_recipe_with_keeps_values_as_given() -> None:
    config = load_config(None)
    changed = recipe_with(materialised(config), {"distill.stages.0.train.optimizer.lr": 1e-5})
    assert changed.distill.stages[0].train.optimizer.lr == 1e-5  # not the text "1e-05" YAML would read


def test_candidates_cover_every_method_parameter_and_stage_setting() -> None:
    config = load_config(None, ["distill.stages=[{method: {name: dkd}}]"])
    names = set(candidates(config))
    assert {"alpha", "beta", "temperature", "warmup_epochs", "ce_weight", "standardize", "lr", "weight_decay",
            "epochs"} == names
    assert TuneConfig().n_trials == 20
