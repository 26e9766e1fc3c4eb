"""`distillery compare`: methods against the student alone over seeds, on tiny synthetic data and MLPs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_idx import write_tiny_fmnist

from distillery.cli import main
from distillery.compare import (
    compare_contenders,
    default_methods,
    method_contender,
    outcome,
    parse_method_sets,
    pin_teacher,
    placed_by_key,
    tuned_contender,
)
from distillery.config import ConfigError
from distillery.recipe import load_config, recipe_runs
from distillery.runner import Runner, default_folder
from distillery.spec import TeacherRef
from distillery.stats import paired_difference


def tiny_overrides(root: Path, out: Path) -> list[str]:
    """A teacher and a student that train in a fraction of a second on the tiny 8×8 set."""
    return [f"data.root={root}", f"output_dir={out}", "name=tiny",
            "teacher.model={name: mlp, kwargs: {hidden: [32]}}", "teacher.train.epochs=3",
            "teacher.train.batch_size=32", "student.model={name: mlp, kwargs: {hidden: [8]}}",
            "student.train.epochs=2", "student.train.batch_size=32"]


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    return tiny_overrides(write_tiny_fmnist(tmp_path / "data", n_train=160, n_test=64), tmp_path / "runs")


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def test_outcome_words_follow_the_interval() -> None:
    assert outcome(paired_difference([2.0, 2.5, 3.0], [1.0, 1.0, 1.0])) == "gain confirmed"
    assert outcome(paired_difference([0.0, 0.5, 0.2], [1.0, 1.0, 1.0])) == "loss"
    assert outcome(paired_difference([2.0, 0.0, 1.0], [1.0, 1.0, 1.0])) == "no reliable gain"
    assert outcome(paired_difference([2.0], [1.0])) == "no reliable gain"  # one seed: no interval


def test_compare_over_three_seeds_writes_report_json_and_forest(tiny: list[str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    tuned = tmp_path / "hot.yaml"
    config = load_config(None, tiny)
    tuned_raw = config.model_dump(mode="json")
    tuned_raw["distill"]["stages"] = [{"method": {"name": "hinton", "temperature": 2.0, "kd_weight": 0.5,
                                                  "ce_weight": 0.5}}]
    tuned.write_text(json.dumps(tuned_raw))  # JSON is YAML
    out = tmp_path / "cmp"
    code = main(["compare", "--no-progress", *set_args(tiny), "--methods", "hinton", "label_smoothing",
                 "--tuned", str(tuned), "--seeds", "3", "--out", str(out)])
    assert code == 0
    assert "| student alone |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1, 2]
    assert [c["label"] for c in results["contenders"]] == ["hinton", "label_smoothing", "hinton (hot)"]
    assert "'temperature': 2.0" in results["contenders"][2]["stages"]  # the tuned stages beside the defaults
    alone = [s["accuracy"] for s in results["student_alone"]]
    for contender in results["contenders"]:
        accuracies = [s["accuracy"] for s in contender["seeds"]]
        expected = paired_difference([100 * a for a in accuracies], [100 * b for b in alone])
        assert contender["difference_points"]["mean"] == pytest.approx(expected.mean)
        assert contender["difference_points"]["low"] == pytest.approx(expected.low)
        assert contender["outcome"] == outcome(expected)
        assert all(0 <= s["agreement"] <= 1 and s["kl"] >= 0 for s in contender["seeds"])
    assert 0.3 < results["teacher_accuracy"] <= 1
    assert results["teacher_time"]["runs"] == 6  # hinton and the tuned hinton call the teacher; smoothing does not
    assert (out / "forest.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "| teacher |" in report and "| label_smoothing |" in report and "![forest plot](forest.png)" in report
    # each seed's networks live in folders of their own, keyed by their settings
    assert len(list((out / "runs").glob("student_alone-s*"))) == 3
    assert len(list((out / "runs").glob("student_distilled-s*"))) == 9  # three contenders, three seeds


def test_a_default_method_unfit_for_the_pair_is_left_out_with_why(tiny: list[str], tmp_path: Path) -> None:
    config = load_config(None, tiny)
    runner = Runner(resume=True, progress=False, echo=lambda line: None, folder_for=default_folder(tmp_path / "c"))
    pinned = pin_teacher(config, recipe_runs(config).teacher_run, runner)
    fitnets = method_contender(pinned, "fitnets")
    teacher = TeacherRef(checkpoint=pinned.teacher.checkpoint, model=pinned.teacher.model)
    said: list[str] = []
    comparison = compare_contenders(pinned, [fitnets], [0, 1, 2], runner, teacher=teacher, skip_unfit=True,
                                    echo=said.append)
    assert said[0].startswith("compare: teacher ")  # the teacher's accuracy comes before any distillation
    assert comparison.results == [] and len(comparison.alone) == 3
    assert comparison.skipped[0][0] == "fitnets" and "no layer named 'stage2'" in comparison.skipped[0][1]
    with pytest.raises(ValueError, match="stage2"):  # asked for by name: an error, not a silent omission
        compare_contenders(pinned, [fitnets], [0], runner, teacher=teacher, echo=lambda line: None)


def pinned_config(tiny: list[str]):
    return load_config(None, [*tiny, "teacher.checkpoint=/nowhere/teacher.pt"])


def test_tfkd_self_learns_from_each_seeds_own_student_alone(tiny: list[str]) -> None:
    contender = method_contender(pinned_config(tiny), "tfkd_self")
    assert contender.config.teacher.checkpoint is None
    for seed in (0, 1):
        runs = recipe_runs(contender.config.model_copy(update={"seed": seed}))
        distilled = placed_by_key(runs.distilled)
        teacher = distilled.teachers[0].run
        assert teacher is not None and teacher.key == runs.alone.key and teacher.seed == seed
        assert distilled.folder is None and teacher.folder is None  # placed by key, one folder per seed


def test_method_sets_change_only_their_method(tiny: list[str]) -> None:
    sets = parse_method_sets(["hinton:distill.stages.0.method.temperature=9", "dkd:distill.stages.0.train.epochs=1"])
    pinned = pinned_config(tiny)
    hinton = method_contender(pinned, "hinton", sets["hinton"])
    dkd = method_contender(pinned, "dkd", sets["dkd"])
    assert hinton.config.distill.stages[0].method.temperature == 9
    assert dkd.config.distill.stages[0].method.temperature == 4.0 and dkd.config.distill.stages[0].train.epochs == 1
    assert hinton.config.teacher.ensemble == []
    with pytest.raises(ConfigError, match="METHOD:KEY=VALUE"):
        parse_method_sets(["hinton.temperature=9"])
    with pytest.raises(ValueError, match="unknown method 'hintn'"):
        parse_method_sets(["hintn:distill.stages.0.method.temperature=9"])


def test_a_tuned_recipe_of_another_student_is_refused(tiny: list[str], tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    raw = load_config(None, [*tiny, "student.model={name: mlp, kwargs: {hidden: [4]}}"]).model_dump(mode="json")
    other.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        tuned_contender(pinned_config(tiny), other)
    assert str(other) in str(err.value) and "student.model" in str(err.value)


def test_default_methods_are_every_method_but_ce_and_ensemble_needs_teachers(tiny: list[str]) -> None:
    names, skipped = default_methods(load_config(None, tiny))
    assert "ce" not in names and "ensemble" not in names and {"hinton", "fsp", "dkd", "dist"} <= set(names)
    assert skipped[0][0] == "ensemble"
    names, _ = default_methods(load_config(None, [*tiny, "teacher.ensemble=[a.pt]"]))
    assert "ensemble" in names


def test_compare_cli_refuses_too_few_seeds_and_unknown_methods(tiny: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", *set_args(tiny), "--seeds", "2"]) == 2
    assert "at least 3" in capsys.readouterr().err
    assert main(["compare", *set_args(tiny), "--methods", "hintn"]) == 2
    assert "unknown method 'hintn'" in capsys.readouterr().err

