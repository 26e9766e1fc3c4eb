"""distillery.bench's verdicts on its targets (timing itself is not tested: benchmarks are not tests)."""

from __future__ import annotations

import datetime as dt

from distillery.bench import CONTROL, Result, format_table, target_checks

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
