"""Config validation: every mistake fails before any work, naming the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distillery.config import ConfigError, apply_override, default_recipe, fingerprint
from distillery.recipe import load_config


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
    return yaml.safe_load(default_recipe().read_text())


def test_default_recipe_is_valid() -> None:
    config = load_config()
    assert config.distill.stages[0].method.name == "hinton"
    assert config.teacher.model.name and config.student.model.name


def test_misspelled_key_names_key_and_suggestion(tmp_path: Path) -> None:
    data = base()
    data["student"]["train"]["epohcs"] = 3
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data))
    message = str(info.value)
    assert "student.train.epohcs" in message and "Did you mean 'epochs'" in message
    assert "batch_size" in message  # lists what is allowed there


def test_misspelled_method_parameter(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="temprature") as info:
        load_config(None, ["distill.stages.0.method.temprature=3"])
    assert "temperature" in str(info.value)


@pytest.mark.parametrize(
    "override,words",
    [
        ("distill.stages.0.method.temperature=0", ["temperature", "greater than 0"]),
        ("distill.stages.0.method.temperature=-2", ["temperature", "greater than 0"]),
        ("distill.stages.0.method.kd_weight=1.5", ["kd_weight", "less than or equal to 1"]),
        ("distill.stages.0.method.ce_weight=-0.1", ["ce_weight", "greater than or equal to 0"]),
        ("teacher.train.epochs=many", ["teacher.train.epochs", "integer"]),
        ("student.train.optimizer.name=rmsprop", ["student.train.optimizer.name", "sgd", "adamw"]),
        ("device=tpu", ["device", "cpu, cuda"]),
        ("distill.stages.0.method.name=hintonn", ["unknown method", "hinton"]),
        ("student.train.optimizer.lr=0", ["student.train.optimizer.lr", "greater than 0"]),
    ],
)
def test_out_of_range_and_wrong_types(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)


def test_set_overrides_any_key_with_yaml_values() -> None:
    config = load_config(None, ["seed=7", "student.model.kwargs.hidden=[10, 20]",
                                "distill.stages.0.method.temperature=8", "data.train_subset=100"])
    assert config.seed == 7
    assert config.student.model.kwargs["hidden"] == [10, 20]
    assert config.distill.stages[0].method.temperature == 8
    assert config.data.train_subset == 100


def test_bad_overrides() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "seed")
    with pytest.raises(ConfigError, match="must index the list"):
        apply_override({"a": [1]}, "a.3=2")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"a": 1}, "a.b.c=2")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "s.yaml"
    scalar.write_text("3")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_fingerprint_tracks_settings() -> None:
    a = load_config()
    b = load_config(None, ["seed=1"])
    assert fingerprint(a) == fingerprint(load_config())
    assert fingerprint(a) != fingerprint(b)


def test_an_option_added_later_stays_out_of_run_keys_while_off() -> None:
    """Runs made before grad_clip_norm existed keep their fingerprint; turning it on changes the key."""
    from distillery.config import TrainConfig

    assert "grad_clip_norm" not in TrainConfig().key_fields()
    assert TrainConfig(grad_clip_norm=1.0).key_fields()["grad_clip_norm"] == 1.0
    assert TrainConfig().key_fields() == {k: v for k, v in TrainConfig().model_dump(mode="json").items()
                                          if k != "grad_clip_norm"}
