"""safe_yaml.load_yaml: plain values, duplicate keys and alias bombs refused fast, errors with source and line."""

from __future__ import annotations

import pickle
import tracemalloc

import pytest
import yaml

from distillery.safe_yaml import MAX_BYTES, MAX_NODES, YamlError, load_yaml


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``width ** levels`` strings once expanded, in a few hundred bytes ("billion laughs")."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_plain_documents_load_like_safe_load():
    text = "student:\n  model: {name: mlp, kwargs: {hidden: [800, 800]}}\n  lr: 0.05\nflag: off\nnothing:\n"
    assert load_yaml(text, "cfg.yaml") == yaml.safe_load(text)
    assert load_yaml("", "empty.yaml") is None
    assert load_yaml("- 1\n- two\n") == [1, "two"]


def test_merge_keys_may_override_what_they_merge():
    text = "base: &base {lr: 0.1, epochs: 3}\nrun:\n  <<: *base\n  lr: 0.01\n"
    assert load_yaml(text)["run"] == {"lr": 0.01, "epochs": 3}


def test_values_reached_through_an_alias_are_copies():
    loaded = load_yaml("a: &shared {k: 1}\nb: *shared\n")
    loaded["a"]["k"] = 2  # as a --set override would
    assert loaded["b"] == {"k": 1}


@pytest.mark.parametrize("text,key,line,first", [
    ("lr: 0.1\nepochs: 3\nlr: 0.01\n", "'lr'", 3, 1),
    ("student:\n  train:\n    epochs: 2\n    epochs: 5\n", "'epochs'", 4, 3),
    ("{a: 1, b: 2, a: 3}\n", "'a'", 1, 1),
    ("yes: 1\ntrue: 2\n", "True", 2, 1),  # YAML 1.1 reads both as the same key
])
def test_a_duplicate_key_is_refused_naming_it_and_its_lines(text, key, line, first):
    with pytest.raises(YamlError) as info:
        load_yaml(text, "recipe.yaml")
    assert str(info.value).startswith(f"recipe.yaml, line {line}: duplicate key {key} (first given on line {first})")
    assert info.value.line == line and info.value.source == "recipe.yaml"


def test_an_alias_bomb_is_refused_fast_without_expanding_it():
    bomb = alias_bomb()
    assert len(bomb) < 1000  # refused at l4, the first value past the limit (9**5 strings)
    tracemalloc.start()
    try:
        with pytest.raises(YamlError, match=f"bomb.yaml, line 5: more than {MAX_NODES:,} values once its aliases"):
            load_yaml(bomb, "bomb.yaml")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * 2**20, peak  # 9**9 strings expanded would be gigabytes


def test_aliases_within_the_limit_are_fine():
    text = alias_bomb(levels=3, width=9)  # 9**3 = 729 leaves
    assert len(load_yaml(text)["l2"]) == 9


@pytest.mark.parametrize("text,words", [
    ("&a [*a]\n", "an alias refers to a value that contains it"),
    ("[" * 100 + "]" * 100, "line 1: nested more than 64 levels deep"),
    ("[" * 200_000 + "]" * 200_000, "line 1: nested more than 64 levels deep"),
    ("a: &a " + "[" * 40 + "]" * 40 + "\nb: " + "[" * 40 + "*a" + "]" * 40 + "\n", "nested more than 64"),
    ("a: !!python/object/apply:os.system ['touch PWNED']\n", "line 1: not valid YAML: could not determine a construc"),
    ("a: !!python/name:os.system\n", "python/name:os.system"),
    ("a: [1, 2\nb: 3\n", "line 2: not valid YAML"),
    ("a: 1\n---\nb: 2\n", "expected a single document"),
    ("? [1]\n: 2\n", "unhashable key"),
])
def test_bad_documents_give_a_yaml_error_with_the_source(text, words):
    with pytest.raises(YamlError, match="^cfg.yaml") as info:
        load_yaml(text, "cfg.yaml")
    assert words in str(info.value)


def test_a_document_over_the_size_limit_is_refused_before_parsing():
    with pytest.raises(YamlError, match=f"bytes, more than the {MAX_BYTES:,} allowed"):
        load_yaml("#" * (MAX_BYTES + 1), "huge.yaml")


def test_yaml_error_is_a_value_error_that_survives_pickling():
    err = YamlError("a.yaml", 3, "duplicate key 'x'")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == "a.yaml, line 3: duplicate key 'x'" and again.line == 3
