"""`distillery tune` end to end on tiny synthetic data: the search, its storage, pruning, workers, best.yaml
and the confirmation."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from test_compare import set_args, tiny_overrides
from test_tune_validation import CountingStore
from tiny_idx import write_tiny_fmnist

from distillery.cli import main
from distillery.config import ConfigError
from distillery.recipe import load_config, recipe_runs
from distillery.runner import Runner
from distillery.tune.command import run_tune
from distillery.tune.objective import Objective, on_validation
from distillery.tune.space import load_tune_recipe, materialised, resolve_space
from distillery.tune.study import StudyPlan, open_study, requeue_interrupted

QUIET = {"progress": False, "echo": lambda line: None}
FAST = ["tune.startup_trials=2", "tune.pruner.name=none"]


@pytest.fixture
def tiny(tmp_path: Path) -> list[str]:
    return tiny_overrides(write_tiny_fmnist(tmp_path / "data", n_train=160, n_test=64), tmp_path / "runs")


def trained_teacher(tiny: list[str]) -> str:
    """Train the tiny recipe's teacher on its own (that run evaluates on the test split, as any teacher does)."""
    config = load_config(None, tiny)
    trained = Runner(progress=False, echo=lambda line: None).train(recipe_runs(config).teacher_run)
    return str(trained.run_dir / "checkpoint.pt")


def test_the_search_reads_no_test_example_reuses_the_teacher_and_continues_to_its_total(
        tiny: list[str], tmp_path: Path) -> None:
    teacher = trained_teacher(tiny)
    args = [*tiny, f"teacher.checkpoint={teacher}", *FAST, "tune.confirm_seeds=0"]
    store = CountingStore()
    first = run_tune(*load_tune_recipe(None, [*args, "tune.n_trials=2"]), data=store, **QUIET)
    assert store.reads["test"] == 0 and store.reads["train"] > 0
    first_params = [t.params for t in first.study.trials]
    assert len(first_params) == 2 and first.confirmation is None
    # Every trial distilled from the same teacher outputs, computed once on the trials' training part.
    assert len([p for p in (tmp_path / "runs" / "cache").iterdir() if p.is_dir()]) == 1
    assert first.reference.teacher is not None and 0 < first.reference.alone <= 1
    # A rerun with a larger total adds the missing trials only; at the total it adds none.
    second = run_tune(*load_tune_recipe(None, [*args, "tune.n_trials=3"]), data=store, **QUIET)
    assert [t.number for t in second.study.trials] == [0, 1, 2]
    assert [t.params for t in second.study.trials[:2]] == first_params
    again = run_tune(*load_tune_recipe(None, [*args, "tune.n_trials=3"]), data=store, **QUIET)
    assert len(again.study.trials) == 3 and store.reads["test"] == 0
    with pytest.raises(ConfigError, match="made from other settings"):
        run_tune(*load_tune_recipe(None, [*args, "tune.n_trials=3", "tune.space.temperature.high=8"]), **QUIET)


def test_tune_command_end_to_end_and_best_yaml_reproduces_the_best_trial(tiny: list[str], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    code = main(["tune", "--no-progress", *set_args([*tiny, *FAST]), "--n-trials", "3", "--seeds", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best: temperature = " in printed and "confirmed on the test split over 3 seeds" in printed
    folder = tmp_path / "runs" / "tiny" / "tune-hinton"
    results = json.loads((folder / "results.json").read_text())
    assert len(results["trials"]) == 3 and all(t["state"] == "done" for t in results["trials"])
    assert all(t["seconds"] > 0 for t in results["trials"])
    best = results["best"]
    assert best["validation_accuracy"] == max(t["validation_accuracy"] for t in results["trials"])
    assert results["confirmation"]["contenders"][0]["outcome"] in ("gain confirmed", "no reliable gain", "loss")
    assert len(results["confirmation"]["student_alone"]) == 3
    # The search set the lr, so the student alone is confirmed a second time with the recipe's own:
    # the best recipe's runs are reused (same accuracies), the student alone's differ, and the
    # verdict is the weaker of the two outcomes.
    recipe_settings = results["confirmation_recipe_settings"]
    assert recipe_settings["contenders"][0]["seeds"] == results["confirmation"]["contenders"][0]["seeds"]
    assert recipe_settings["student_alone"] != results["confirmation"]["student_alone"]
    outcomes = [results["confirmation"]["contenders"][0]["outcome"], recipe_settings["contenders"][0]["outcome"]]
    rank = ["loss", "no reliable gain", "gain confirmed"]
    assert results["verdict"] == min(outcomes, key=rank.index)
    assert f"verdict: {results['verdict']}" in printed
    # the teacher's cost over the trials: three cached-teacher runs (no augmentation), nothing stored
    spent = results["teacher_time"]
    assert spent["runs"] == 3 and spent["cached_s"] > 0 and spent["stored_s"] == 0 and spent["saved_s"] is None
    report = (folder / "report.md").read_text()
    for words in ("## Search space", "## Trials", "Teacher time of the search over 3 distilled run(s)",
                  "## Confirmation on the test split", "with the recipe's own training settings",
                  f"**Verdict: {results['verdict']}** (the weaker of the two)", "![history](history.png)",
                  "[best.yaml](best.yaml)"):
        assert words in report
    assert (folder / "history.png").read_bytes()[:4] == b"\x89PNG"
    # best.yaml is a recipe of the best trial's parameters, trained from the search's own teacher ...
    tuned = load_config(folder / "best.yaml")
    method, train = tuned.distill.stages[0].method, tuned.distill.stages[0].train
    values = best["values"]
    assert (method.temperature, method.kd_weight, train.optimizer.lr) == (
        values["temperature"], values["kd_weight"], values["lr"])
    assert method.ce_weight == pytest.approx(1 - values["kd_weight"])
    assert tuned.teacher.checkpoint == str(tmp_path / "runs" / "tiny" / "teacher" / "checkpoint.pt")
    assert tuned.student.train == train and tuned.name == "tiny-tuned"
    # ... so on the search's validation split it is exactly the best trial's run (its folder holds the key)
    best_row = next(t for t in results["trials"] if t["trial"] == best["trial"])
    assert Path(best_row["run_dir"]).parent.name.endswith(on_validation(recipe_runs(tuned).distilled, 0.1).key)
    # ... and `distillery distill` runs it as it is.
    assert main(["distill", "--config", str(folder / "best.yaml"), "--no-progress"]) == 0


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def objective_for(tiny: list[str], tmp_path: Path, extra: list[str] = ()) -> Objective:
    teacher = trained_teacher(tiny)
    config, tune = load_tune_recipe(None, [*tiny, f"teacher.checkpoint={teacher}", *extra])
    return Objective(materialised(config), resolve_space(config, tune), 0.1, str(tmp_path / "trials"))


def test_a_pruned_trial_stops_after_an_epoch_and_its_run_is_deleted(tiny: list[str], tmp_path: Path) -> None:
    objective = objective_for([*tiny, "student.train.epochs=3"], tmp_path)
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and list(trial.intermediate_values) == [1]
    assert not Path(trial.user_attrs["run_dir"]).parent.exists()
    # a one-epoch stage is never stopped: its only epoch is its end
    short = objective_for([*tiny, "student.train.epochs=1"], tmp_path / "short")
    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    study.optimize(short, n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE


def test_a_diverged_trial_is_stopped_and_marked(tiny: list[str], tmp_path: Path) -> None:
    objective = objective_for(tiny, tmp_path, ["tune.fixed.lr=1e12", "tune.only=[temperature]"])
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED and "is nan" in trial.user_attrs["diverged"]


def test_two_workers_share_one_sqlite_study(tiny: list[str], tmp_path: Path) -> None:
    config, tune = load_tune_recipe(None, [*tiny, *FAST, "tune.n_trials=2", "tune.confirm_seeds=0"])
    result = run_tune(config, tune, workers=2, **QUIET)
    states = [t.state for t in result.study.trials]
    # a worker may finish one trial past the total (each completes the one it is running)
    assert 2 <= len(states) <= 3 and all(s == optuna.trial.TrialState.COMPLETE for s in states)
    assert len({t.number for t in result.study.trials}) == len(states)
    assert (result.folder / "study.db").exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell by hand, not optimize
def test_an_interrupted_trial_is_queued_again_once(tmp_path: Path) -> None:
    config, tune = load_tune_recipe(None, [])
    plan = StudyPlan(f"sqlite:///{tmp_path / 's.db'}", "s", tune, "fingerprint")
    study = open_study(plan)
    trial = study.ask()
    trial.suggest_float("temperature", 1, 32, log=True)
    trial.set_user_attr("interrupted", True)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert requeue_interrupted(study) == 1 and requeue_interrupted(study) == 0
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert waiting[0].system_attrs["fixed_params"] == study.trials[0].params  # the repeat's parameters
    with pytest.raises(ConfigError, match="made from other settings"):
        open_study(StudyPlan(plan.url, "s", tune, "another"))


def test_a_bad_space_fails_before_any_training(tiny: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", *set_args([*tiny, "tune.space.temprature.high=8"])]) == 2
    assert "tune.space.temprature: unknown parameter" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "tiny").exists()
