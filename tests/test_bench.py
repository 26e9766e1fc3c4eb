"""distillery.bench: the verdicts on its targets and its step clocks (no speed is asserted: a bench is no test)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from tiny_idx import write_tiny_fmnist

from distillery.bench import CONTROL, Result, format_table, target_checks
from distillery.bench.tune_row import TuneTiming, time_tune, tune_markdown

WORKLOAD = "mlp1200²→mlp800²"


def result(row: str, step_seconds: list[float], batch: int = 128) -> Result:
    lower_quartile = sorted(step_seconds)[(len(step_seconds) - 1) // 4]
    return Result(WORKLOAD, row, batch / lower_quartile, 1.0, 0.0, lower_quartile, 1.0, "VmHWM", step_seconds)


def checks_for(base: list[float], row: list[float], name: str = "kd cached") -> dict[str, object]:
    results = [result("ce alone", base), result(name, row), result(CONTROL[0], base)]
    return next(c for c in target_checks(results) if c["row"] == name)


def test_a_target_is_met_only_when_its_whole_interval_clears_it() -> None:
    base = [0.010 + 0.001 * (i % 3) for i in range(12)]  # 10-12 ms, a noisy machine
    same_pace = checks_for(base, [t / 0.99 for t in base])  # every step 0.99 × as fast
    assert abs(same_pace["paired"] - 0.99) < 1e-12 and same_pace["verdict"] == "met"
    slower = checks_for(base, [t / 0.90 for t in base])
    assert slower["verdict"] == "NOT MET"
    # ratios scattered around the target: the interval straddles 0.97
    scattered = checks_for(base, [t / r for t, r in zip(base, [0.93, 0.95, 0.96, 0.97, 0.98, 0.99] * 2)])
    assert scattered["low"] < 0.97 < scattered["high"] and scattered["verdict"] == "within noise"


def test_steps_are_paired_so_a_slow_spell_hitting_both_rows_cancels() -> None:
    """Steps 3× slower for both rows (a busy spell) move the pooled timings, not the paired ratio."""
    base = [0.010] * 8 + [0.030] * 4
    check = checks_for(base, [t / 0.98 for t in base])
    assert abs(check["paired"] - 0.98) < 1e-12 and check["low"] == check["high"]


def test_the_control_row_is_judged_against_one_and_reported() -> None:
    base = [0.010, 0.011, 0.012] * 4
    control = next(c for c in target_checks([result("ce alone", base), result(CONTROL[0], base)]) if c["control"])
    assert control["verdict"] == "agree"
    skewed = [t * 1.2 for t in base]
    control = next(c for c in target_checks([result("ce alone", base), result(CONTROL[0], skewed)]) if c["control"])
    assert control["verdict"] == "DISAGREE"
    table = format_table([result("ce alone", base), result(CONTROL[0], skewed)],
                         dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), 60, 2)
    assert "ce alone (again) vs ce alone (control)" in table and "DISAGREE" in table


def test_every_target_runs_its_two_rows_back_to_back() -> None:
    """Pairing only cancels the machine's drift if the paired rows run next to each other."""
    from distillery.bench import ROWS, RUN_ORDER, TARGETS

    assert sorted(RUN_ORDER) == sorted(ROWS)
    for row, base, *_ in (*TARGETS, CONTROL):
        assert abs(RUN_ORDER.index(row) - RUN_ORDER.index(base)) == 1, (row, base)


def test_rows_take_turns_back_and_forth_and_leave_when_done() -> None:
    """Threads run one step at a time along A B C C B A A B ..., and one that finishes early drops out."""
    import threading

    from distillery.bench import StepClock, TurnTaking

    turns = TurnTaking(["A", "B", "C"])
    log: list[str] = []

    def row(name: str, steps: int) -> None:
        clock = StepClock(name, turns)
        turns.wait(name)
        for _ in range(steps):
            clock.begin()
            log.append(name)
        clock.pause()
        turns.hand_over(name, finished=True)
        assert len(clock.steps) == steps

    threads = [threading.Thread(target=row, args=(n, s)) for n, s in (("A", 4), ("B", 4), ("C", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert log == ["A", "B", "C", "C", "B", "A", "A", "B", "B", "A"]


def test_a_limit_target_is_judged_as_a_fraction_of_the_limit_the_teacher_forward_sets() -> None:
    """FSP stored vs on the fly: the best possible speed-up is t_fly / (t_fly − teacher), measured in the run."""
    from distillery.bench import RESNET, Result

    def row(name: str, steps: list[float], teacher: list[float]) -> Result:
        quartile = sorted(steps)[(len(steps) - 1) // 4]
        return Result(RESNET, name, 128 / quartile, 1.0, 0.0, quartile, 1.0, "VmHWM", steps, teacher)

    fly = [0.20 + 0.01 * (i % 4) for i in range(12)]
    teacher = [0.08] * 12  # so the limit is fly / (fly − 0.08), about 1.6
    at_limit = [t - 0.08 for t in fly]  # the stored row saves exactly the teacher forward
    results = [row("ce alone", fly, [0.0] * 12), row("fsp1 on the fly", fly, teacher),
               row("fsp1 stored", at_limit, [0.0] * 12)]
    check = next(c for c in target_checks(results) if c["row"] == "fsp1 stored")
    assert check["limit"] and abs(check["paired"] - 1.0) < 1e-12 and check["verdict"] == "met"
    assert abs(check["limit_value"] - 0.20 / 0.12) < 1e-9  # from the lower-quartile step and median teacher time
    results[2] = row("fsp1 stored", [t / 0.9 for t in at_limit], [0.0] * 12)  # reaches only 90 % of it
    check = next(c for c in target_checks(results) if c["row"] == "fsp1 stored")
    assert abs(check["paired"] - 0.9) < 1e-12 and check["verdict"] == "NOT MET"
    assert "fsp1 stored ≥ 0.95 × limit" in format_table(results, dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
                                                        12, 1)


def test_targets_are_per_workload() -> None:
    """kd cached must reach 0.97 × ce alone on the ResNet pair, 0.95 on the MLP pair; the store row is ResNet's."""
    from distillery.bench import MLP, RESNET, TARGETS

    def minimum(row: str, workload: str) -> list[float]:
        return [t.minimum for t in TARGETS if t.row == row and t.applies_to(workload)]

    assert minimum("kd cached", RESNET) == [0.97] and minimum("kd cached", MLP) == [0.95]
    assert minimum("kd stored, augmented", RESNET) == [0.97] and minimum("kd stored, augmented", MLP) == []
    base = [0.010] * 12
    checks = checks_for(base, [t / 0.96 for t in base])  # the MLP workload: 0.96 clears 0.95
    assert checks["target"] == 0.95 and checks["verdict"] == "met"


def test_the_table_says_which_rows_were_not_run() -> None:
    started = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    table = format_table([result("ce alone", [0.01] * 4)], started, 4, 1)
    assert "Not run: a 20-trial `tune` with augmentation: skipped (--no-tune)" in table
    timing = TuneTiming(20, 2560, 100.0, (4.0, 4.5), 3.0, 0.1)
    table = format_table([result("ce alone", [0.01] * 4)], started, 4, 1, tune_markdown(timing.as_dict()))
    assert "Not run" not in table and "| tune wall ≤ 1.15 × (20 × alone) + store build | 100.0 |" in table


def test_the_tune_row_is_judged_on_the_range_its_student_alone_runs_span() -> None:
    """factor = search wall / (trials × alone + build), from the slowest and the fastest student-alone run."""
    timing = TuneTiming(trials=20, train_examples=2560, tune_s=100.0, alone_s=(4.0, 4.5, 4.2), store_build_s=3.0,
                        teacher_lookup_s=0.1)
    assert timing.ratios() == pytest.approx((100 / 93, 100 / 83))
    assert timing.verdict() == "within noise"  # 1.075 clears 1.15, 1.205 does not
    assert TuneTiming(20, 2560, 90.0, (4.0, 4.5), 3.0, 0.1).verdict() == "met"  # 1.084 at most
    assert TuneTiming(20, 2560, 120.0, (4.0, 4.5), 3.0, 0.1).verdict() == "NOT MET"  # 1.290 at least
    assert timing.limit_s(4.0) == pytest.approx(1.15 * 80 + 3)


def test_the_tune_row_times_a_real_search_with_the_store_against_the_student_alone(tmp_path: Path) -> None:
    root = write_tiny_fmnist(tmp_path / "data", n_train=160, n_test=256)
    timing = time_tune(tmp_path / "work", str(root), trials=2, train_examples=160, echo=lambda line: None)
    assert timing.trials == 2 and len(timing.alone_s) == 4 and all(a > 0 for a in timing.alone_s)
    assert timing.store_build_s > 0 and timing.tune_s > 0  # the first trial built the store the second read
    study = json.loads((tmp_path / "work" / "bench-tune" / "tune-hinton" / "results.json").read_text())
    assert study["teacher_time"]["runs"] == 2 and study["teacher_time"]["live_s"] == 0


def test_clocked_steps_time_a_trainer_through_its_callbacks_with_the_teacher_share_of_each_step() -> None:
    import torch
    from fakes import random_dataset, train_config

    from distillery.bench import ClockedSteps, StepClock
    from distillery.methods import Teacher, create_method
    from distillery.models import create_model
    from distillery.train import Stage, Trainer

    torch.manual_seed(0)
    teacher = Teacher(create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=(32,)))
    clocks = {}
    for method in ("ce", "hinton"):
        clocks[method] = StepClock(method)
        student = create_model("mlp", in_channels=1, num_classes=4, input_size=8, hidden=(16,))
        Trainer(student, random_dataset(64), random_dataset(32, seed=1), [Stage(create_method(method),
                train_config(epochs=2))], teacher=teacher, progress=False, echo=lambda line: None,
                callbacks=[ClockedSteps(clocks[method])]).fit()
    for clock in clocks.values():
        assert len(clock.steps) == len(clock.teacher_steps) == 2 * 2  # 2 epochs of 64 / 32 steps
        assert all(wall > 0 for wall, _ in clock.steps)
    assert all(t == 0 for t in clocks["ce"].teacher_steps)
    assert all(0 < t < wall for t, (wall, _) in zip(clocks["hinton"].teacher_steps, clocks["hinton"].steps))
