"""The parent process of ``distillery bench``: prepare the shared work folder, spawn a child per workload
(speed) and per row (memory), write the table; and the child's entry point (``python -m distillery.bench``)."""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from distillery.bench.rows import AUGMENT, PAIRS, ROWS, STORE, memory_of_row, rows_for, speed_of_rows
from distillery.bench.targets import (
    BATCH,
    CHUNK,
    EVAL_BATCH,
    RESNET,
    Result,
    format_table,
    skipped_rows,
    target_checks,
)
from distillery.bench.tune_row import TRIALS, time_tune, tune_markdown
from distillery.fsio import atomic_write


def _prepare(workdir: Path, data_root: str | None, echo: Callable[[str], None]) -> None:
    """Write the data subset and initial weights every row shares, and fill the teacher caches and store."""
    from distillery.cache import CachedTeacher
    from distillery.data import Augment, BatchLoader, load_idx_dataset
    from distillery.methods import Teacher, create_method
    from distillery.models import create_model
    from distillery.stored_targets import serve_targets
    from distillery.teacher_store import StoredTeacher
    from distillery.train import prefer_channels_last

    train = load_idx_dataset("fashion_mnist", "train", data_root).subset(CHUNK * BATCH, seed=0)
    test = load_idx_dataset("fashion_mnist", "test", data_root).subset(CHUNK * EVAL_BATCH, seed=0)
    torch.save({"train_images": train.images, "train_labels": train.labels, "test_images": test.images,
                "test_labels": test.labels, "mean": train.mean[0], "std": train.std[0]}, workdir / "data.pt")
    for workload, (teacher_name, student_name, student_kwargs) in PAIRS.items():
        torch.manual_seed(0)
        teacher, student = create_model(teacher_name), create_model(student_name, **student_kwargs)
        torch.save({"teacher": teacher.state_dict(), "student": student.state_dict()},
                   workdir / f"weights-{teacher_name}-{student_name}.pt")
        start = time.perf_counter()
        prefer_channels_last(teacher, "cpu")  # as the Trainer will: the cache key includes the layout
        CachedTeacher.build(Teacher(teacher), train, workdir / "cache")
        echo(f"  {workload}: teacher logits cached in {time.perf_counter() - start:.1f} s (one-time, not timed)")
        if not teacher_name.startswith("resnet"):
            continue
        start = time.perf_counter()
        views = BatchLoader(train, BATCH, shuffle=True, augment=Augment(**AUGMENT), augment_seed=STORE.seed,
                            augment_epochs=STORE.epochs)  # as the Trainer's loader of the augmented KD row
        StoredTeacher.build(Teacher(teacher), views, workdir / "cache", STORE)
        echo(f"  {workload}: teacher store of {STORE.epochs} augmented epochs built in "
             f"{time.perf_counter() - start:.1f} s (one-time)")
        start = time.perf_counter()
        fsp = create_method("fsp", store_teacher=True)  # the row's method fills the cache it will read
        loader = BatchLoader(train, BATCH, shuffle=True)
        fsp.setup(student, Teacher(teacher), next(loader.epoch(0)).inputs[:8])
        serve_targets(fsp.target_request(), Teacher(teacher), loader, cache_dir=workdir / "cache", max_mb=1e9)
        echo(f"  {workload}: teacher FSP matrices stored in {time.perf_counter() - start:.1f} s (one-time)")


def _spawn(workdir: Path, args: list[str], threads: int | None) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "distillery.bench", "--workdir", str(workdir), *args]
    cmd += ["--threads", str(threads)] if threads else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(workdir: Path, epochs: int, threads: int, echo: Callable[[str], None]) -> list[Result]:
    results: list[Result] = []
    for workload in PAIRS:
        speed = _spawn(workdir, ["--speed", "--workload", workload, "--epochs", str(epochs)], threads)
        first = speed[rows_for(workload)[0]]["images_per_s"]
        for row in rows_for(workload):
            memory = _spawn(workdir, ["--memory", "--workload", workload, "--row", row], threads)
            m = speed[row]
            result = Result(workload, row, m["images_per_s"], m["images_per_s"] / first, memory["peak_rss_mb"],
                            m["seconds"], m["cpu_ms_per_image"], memory["memory"], m["step_seconds"],
                            m["teacher_seconds"])
            results.append(result)
            echo(f"  {workload:18s} {row:22s} {result.images_per_s:10.0f} img/s  {result.ratio:5.2f}×  "
                 f"{result.peak_rss_mb:6.1f} MB")
    return results


def run_bench(steps: int = 60, output: str | Path = "runs/bench", data_root: str | None = None,
              threads: int | None = None, echo: Callable[[str], None] = print,
              tune_trials: int | None = TRIALS) -> tuple[list[Result], str, Path]:
    """Run every row, print and write the table; returns the results, the markdown and its path.

    ``steps``: timed steps per row (rounded up to whole epochs of :data:`CHUNK`). ``threads``:
    torch threads in each row (default: torch's default, one per core). ``tune_trials``: trials of
    the wall-clock ``tune`` row (:mod:`distillery.bench.tune_row`; None leaves it out).
    """
    threads = threads or torch.get_num_threads()
    epochs = max(1, -(-steps // CHUNK))
    started = dt.datetime.now(dt.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        echo(f"preparing: {epochs} epochs of {CHUNK} steps per row, rows taking turns step by step, after a "
             "warm-up epoch ...")
        _prepare(Path(tmp), data_root, echo)
        results = _measure(Path(tmp), epochs, threads, echo)
        tune = None
        if tune_trials is not None and importlib.util.find_spec("optuna") is not None:
            root = ["--data-root", data_root] if data_root else []
            tune = _spawn(Path(tmp), ["--tune", "--workload", RESNET, "--trials", str(tune_trials), *root], threads)
            echo(f"  tune: {tune['trials']} trials in {tune['tune_s']:.1f} s, factor "
                 f"[{tune['ratios'][0]:.3f}, {tune['ratios'][1]:.3f}]: {tune['verdict']}")
    steps = epochs * CHUNK
    markdown = format_table(results, started, steps, threads, () if tune is None else tune_markdown(tune))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{started.strftime('%Y%m%d-%H%M%S')}"
    atomic_write(stem.with_suffix(".md"), markdown)
    atomic_write(stem.with_suffix(".json"), json.dumps({
        "date": started.isoformat(), "torch": torch.__version__, "threads": threads,
        "cpu_count": os.cpu_count(), "steps": steps, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH,
        "memory": "rise of peak resident memory (VmHWM, else ru_maxrss) in a subprocess per row, MB",
        "timing": "images/s = batch / lower-quartile step time; rows take turns step by step in one process; "
                  "targets judged on the median of paired step-time ratios with a 95 % order-statistic interval; "
                  "teacher seconds per step from the Trainer's cost clock",
        "augment": AUGMENT, "store_epochs": STORE.epochs, "not_run": skipped_rows(tune is not None),
        "results": [asdict(r) for r in results], "tune": tune,
        "targets": target_checks(results),
    }, indent=2))
    return results, markdown, stem.with_suffix(".md")


def child_main(argv: Sequence[str]) -> int:
    """One bench child: time every row of a workload (``--speed``) or one row's memory (``--memory``)."""
    parser = argparse.ArgumentParser(prog="python -m distillery.bench", description="one bench child process")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--speed", action="store_true", help="time every row of the workload, interleaved")
    mode.add_argument("--memory", action="store_true", help="peak-memory rise of one row")
    mode.add_argument("--tune", action="store_true", help="the wall-clock tune row (distillery.bench.tune_row)")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--workload", required=True, choices=list(PAIRS))
    parser.add_argument("--row", choices=ROWS)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per row (after a warm-up epoch)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--trials", type=int, default=TRIALS, help="trials of the tune row")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.tune:
        to_stderr = lambda line: print(line, file=sys.stderr)  # noqa: E731 (stdout carries the JSON)
        timing = time_tune(workdir / "tune", args.data_root, args.trials, echo=to_stderr)
        print(json.dumps(timing.as_dict()))
    elif args.speed:
        print(json.dumps(speed_of_rows(workdir, args.workload, args.epochs)))
    else:
        print(json.dumps(memory_of_row(workdir, args.workload, args.row)))
    return 0
