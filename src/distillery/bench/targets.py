"""The benchmark's targets, how each is judged on paired steps, and the markdown table.

Each target compares two rows of one workload whose steps alternate (:class:`~distillery.bench.
clocks.TurnTaking`). Their k-th steps form a pair; the quantity judged is computed for every pair
and its median gets a distribution-free 95 % interval (:func:`distillery.stats.median_interval`):
"met" when the whole interval clears the target, "NOT MET" when it lies wholly below, "within
noise" otherwise. For a speed target the quantity is the row's speed over the baseline's,
``t_base / t_row``. For a limit target (a stored teacher's best possible gain) it is that ratio over
the limit ``t_base / (t_base − teacher_base)``, i.e. ``(t_base − teacher_base) / t_row``: the
baseline step without its teacher forward, against the row's step, both measured in the run.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from distillery.stats import median_interval

RESNET, MLP = "resnet20→resnet8", "mlp1200²→mlp800²"
BATCH = 128
EVAL_BATCH = 256
CHUNK = 5  # steps per epoch of each row (its small dataset holds 5 batches)


class Target(NamedTuple):
    """``row`` ≥ ``minimum`` × ``baseline`` on the workloads named (all when empty); with ``limit``, the
    minimum is a fraction of the limit set by the baseline's teacher forward time (module docstring)."""

    row: str
    baseline: str
    minimum: float
    workloads: tuple[str, ...] = ()
    limit: bool = False

    def applies_to(self, workload: str) -> bool:
        return not self.workloads or workload in self.workloads

    def describe(self) -> str:
        if self.limit:
            return f"{self.row} ≥ {self.minimum} × limit ({self.baseline} ÷ its step without the teacher forward)"
        return f"{self.row} ≥ {self.minimum} × {self.baseline}"


TARGETS = (
    Target("kd stored, augmented", "ce alone, augmented", 0.97, (RESNET,)),
    Target("kd cached", "ce alone", 0.97, (RESNET,)),
    Target("kd cached", "ce alone", 0.95, (MLP,)),
    Target("fsp1 stored", "fsp1 on the fly", 0.95, (RESNET,), limit=True),
    Target("kd on the fly", "kd reference", 0.97),
    Target("eval evaluate()", "eval bare model(x)", 0.95),
)
CONTROL = ("ce alone (again)", "ce alone")  # A/A: the same row twice; its ratio should be 1
# The rotation the rows take their steps in: each target's two rows (and the control's) are neighbours.
RUN_ORDER = ("ce alone (again)", "ce alone", "kd cached", "kd reference", "kd on the fly", "fsp1 on the fly",
             "fsp1 stored", "ce alone, augmented", "kd stored, augmented", "eval bare model(x)", "eval evaluate()")


@dataclass
class Result:
    workload: str
    row: str
    images_per_s: float
    ratio: float  # to the first row of the workload
    peak_rss_mb: float  # rise of the process's peak resident memory during the row, MB
    seconds: float  # the typical (lower-quartile) step time
    cpu_ms_per_image: float  # median CPU time of a step (all threads) per image, ms
    memory: str = "VmHWM"  # how peak memory was measured (see PeakMemory)
    step_seconds: list[float] = field(default_factory=list)  # each timed step, in the order run
    teacher_seconds: list[float] = field(default_factory=list)  # the teacher's share of each step (Trainer rows)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2] if ordered else 0.0


def _judge(target: Target, new: Result, old: Result, control: bool) -> dict[str, object]:
    check: dict[str, object] = {
        "workload": new.workload, "row": new.row, "baseline": old.row, "target": target.minimum,
        "limit": target.limit, "ratio": new.images_per_s / old.images_per_s,
        "cpu_ratio": old.cpu_ms_per_image / new.cpu_ms_per_image, "control": control}
    if target.limit:
        teacher = _median(old.teacher_seconds)
        check["limit_value"] = old.seconds / max(old.seconds - teacher, 1e-12)
        check["ratio"] = check["ratio"] / check["limit_value"]  # type: ignore[operator]
        check["cpu_ratio"] = check["cpu_ratio"] / check["limit_value"]  # type: ignore[operator]
        pairs = [(b - t) / a for a, b, t in zip(new.step_seconds, old.step_seconds, old.teacher_seconds)]
    else:
        pairs = [b / a for a, b in zip(new.step_seconds, old.step_seconds)]
    if pairs:
        paired = median_interval(pairs)
        check.update(paired=paired.median, low=paired.low, high=paired.high, pairs=paired.n, coverage=paired.coverage)
        if control:
            check["verdict"] = "agree" if paired.low <= 1.0 <= paired.high else "DISAGREE"
        else:
            check["verdict"] = ("met" if paired.low >= target.minimum else
                                "NOT MET" if paired.high < target.minimum else "within noise")
    return check


def target_checks(results: list[Result]) -> list[dict[str, object]]:
    """Each target (and the A/A control, target 1.0) of every workload, judged on paired steps.

    ``ratio`` and ``cpu_ratio``: from the pooled lower-quartile step times and the median CPU times
    (for a limit target, as fractions of the limit ``limit_value``, from the pooled wall times);
    ``paired``: the median over k of the k-th steps' quantity (module docstring), with
    ``low``/``high``, its distribution-free 95 % interval; ``verdict``: "met" when ``low`` ≥ target,
    "NOT MET" when ``high`` < target, else "within noise" (for the control: "agree" when the
    interval holds 1).
    """
    by = {(r.workload, r.row): r for r in results}
    checks = []
    for workload in dict.fromkeys(r.workload for r in results):
        judged = [(t, False) for t in TARGETS if t.applies_to(workload)] + [(Target(*CONTROL, 1.0), True)]
        for target, control in judged:
            if (workload, target.row) in by and (workload, target.baseline) in by:
                checks.append(_judge(target, by[(workload, target.row)], by[(workload, target.baseline)], control))
    return checks


def skipped_rows(tune_ran: bool) -> list[str]:
    """Rows of the issue left out of this run, and why."""
    if tune_ran:
        return []
    if importlib.util.find_spec("optuna") is None:
        return ["a 20-trial `tune` with augmentation: skipped, optuna is not installed"]
    return ["a 20-trial `tune` with augmentation: skipped (--no-tune)"]


def format_table(results: list[Result], started: dt.datetime, steps: int, threads: int,
                 tune_lines: Sequence[str] = ()) -> str:
    """The run's markdown: every row, the paired targets, then ``tune_lines`` (the wall-clock row)."""
    lines = [
        f"# distillery bench — {started.strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"torch {torch.__version__}, {threads} threads, CPU ({os.cpu_count()} cores); Fashion-MNIST, batch {BATCH} "
        f"(eval {EVAL_BATCH}), SGD; {steps} timed steps per row (rows take turns step by step, after a warm-up "
        f"epoch of {CHUNK} steps); images/s from the lower-quartile step time, CPU time the median. Ratio: to the "
        f"first row of the workload. Peak memory: rise of the peak resident set "
        f"({results[0].memory if results else 'VmHWM'}) while the row runs, one subprocess per row.",
        "",
        "| workload | row | images/s | × first row | CPU ms/image | teacher ms/step | peak RSS Δ MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        teacher = f"{1000 * _median(r.teacher_seconds):.1f}" if r.teacher_seconds else "—"
        lines.append(f"| {r.workload} | {r.row} | {r.images_per_s:,.0f} | {r.ratio:.3f} | {r.cpu_ms_per_image:.3f} "
                     f"| {teacher} | {r.peak_rss_mb:.1f} |")
    checks = target_checks(results)
    pairs = max((int(c.get("pairs", 0)) for c in checks), default=0)  # type: ignore[call-overload]
    lines += ["", f"Targets, judged on {pairs} paired steps (the two rows take turns step by step): the median of "
              "the per-pair speed ratios with its distribution-free 95 % interval (met: the whole interval clears "
              "the target). A limit target's ratio is a fraction of its limit, the baseline's step time over that "
              "step less its teacher forward (both measured in this run). The last line of each workload is the "
              "A/A control, the first row against itself: its interval should hold 1.", "",
              "| workload | target | paired ratio [95 % interval] | verdict | pooled ratio | CPU-time ratio |",
              "|---|---|---:|:---:|---:|---:|"]
    for c in checks:
        if c["control"]:
            target = f"{c['row']} vs {c['baseline']} (control)"
        else:
            target = Target(c["row"], c["baseline"], c["target"], limit=c["limit"]).describe()  # type: ignore[arg-type]
            if c["limit"]:
                target += f", limit {c['limit_value']:.3f}"
        paired = f"{c['paired']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" if "paired" in c else "—"
        lines.append(f"| {c['workload']} | {target} | {paired} | {c.get('verdict', '—')} | {c['ratio']:.3f} | "
                     f"{c['cpu_ratio']:.3f} |")
    lines += ["", *tune_lines] if tune_lines else []
    lines += ["", *(f"Not run: {line}." for line in skipped_rows(bool(tune_lines)))]
    return "\n".join(lines) + "\n"
