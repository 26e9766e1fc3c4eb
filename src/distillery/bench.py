"""``distillery bench``: what distillation costs on top of training the student alone.

One run measures a fixed workload (Fashion-MNIST, batch 128, SGD) for two teacher → student pairs,
ResNet-20 → ResNet-8 and MLP 1200-1200 → 800-800, and prints one table of images/s with each row's
ratio to the first row of its pair (the student trained alone with cross-entropy: the physical
limit of distillation). Rows:

    ce alone            our Trainer, method ``ce`` (no teacher)
    kd reference        a minimal hand-written PyTorch KD loop (:func:`reference_kd_loop`)
    kd on the fly       our Trainer, method ``hinton``, teacher run every step
    kd cached           the same with the teacher-output cache (built beforehand, not timed)
    fsp1 on the fly     our Trainer, FSP stage 1 (method ``fsp``, default ResNet stage pairs, its
                        stage-1 AdamW; ResNets only), teacher run every step (store_teacher=false)
    fsp1 stored         the same with the teacher's FSP matrices read from the teacher cache
                        (store_teacher=true; stored beforehand, not timed)
    eval evaluate()     distillery.train.evaluate at batch 256
    eval bare model(x)  ``model(x)`` on ready-made normalised batches, under inference_mode

Speed: one subprocess per workload sets up all its rows, runs a warm-up round, then interleaves
them in rounds (each round: one short epoch of :data:`CHUNK` steps of every row in turn), so a busy
spell on a shared machine slows every row alike; images/s comes from the lower-quartile step time
(interference only ever slows a step down), and the median CPU time per image is reported too.
Memory: one more subprocess per row measures the rise of its peak resident set (``VmHWM``, reset
via ``/proc/self/clear_refs``) over the level after loading its data and models; CPU only, no
CUDA. Networks are randomly initialised: speed does not depend on the weights. Benchmarks are
noisy on a shared machine; compare ratios within one run, and prefer ``--threads 1`` there (two
OpenMP threads competing with other processes for two cores slow down erratically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BATCH = 128
EVAL_BATCH = 256
CHUNK = 5  # steps of each row per round (one epoch of the row's small dataset)
PAIRS = {  # workload name: (teacher model, student model, student kwargs)
    "resnet20→resnet8": ("resnet20", "resnet8", {}),
    "mlp1200²→mlp800²": ("mlp_hinton_teacher", "mlp", {"hidden": [800, 800]}),
}
ROWS = ("ce alone", "kd reference", "kd on the fly", "kd cached", "fsp1 on the fly", "fsp1 stored",
        "eval evaluate()", "eval bare model(x)")
# (row, baseline row, minimum ratio) — the targets this benchmark exists to watch.
TARGETS = (("kd cached", "ce alone", 0.97), ("kd on the fly", "kd reference", 0.97),
           ("fsp1 stored", "fsp1 on the fly", 1.8), ("eval evaluate()", "eval bare model(x)", 0.95))
KD = {"temperature": 4.0, "kd_weight": 0.9, "ce_weight": 0.1}
T = TypeVar("T")
SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


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


# ---------------------------------------------------------------- the reference loop


def reference_kd_loop(teacher: nn.Module, student: nn.Module, batches: Sequence[tuple[Tensor, Tensor]],
                      mean: float, std: float, temperature: float = 4.0, kd_weight: float = 0.9,
                      ce_weight: float = 0.1) -> None:
    """The hand-written Hinton KD loop we must not be slower than (plain torch, uint8 batches in)."""
    optimizer = torch.optim.SGD(student.parameters(), **SGD)
    teacher.eval()
    student.train()
    for images, labels in batches:
        x = (images.float() / 255 - mean) / std
        with torch.no_grad():
            soft_targets = F.softmax(teacher(x) / temperature, dim=1)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft_targets, reduction="batchmean")
        loss = ce_weight * F.cross_entropy(logits, labels) + kd_weight * temperature**2 * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# ---------------------------------------------------------------- one row, in a child process


class PeakMemory:
    """Peak resident memory (MB) of this process above its level at :meth:`reset`.

    Linux: ``VmHWM`` of ``/proc/self/status``, reset to the current RSS by writing 5 to
    ``/proc/self/clear_refs``. (``ru_maxrss`` would not do: Linux carries the parent's peak over
    ``exec``, so a child spawned by a big parent starts with the parent's peak.) Elsewhere:
    the rise of ``ru_maxrss``, which is 0 when the row stays under the start-up peak.
    """

    def __init__(self) -> None:
        self.how = "ru_maxrss"
        self.start = 0.0

    @staticmethod
    def _status_kb(field: str) -> float | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return float(line.split()[1])
        except OSError:
            return None
        return None

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.how, self.start = "VmHWM", self._status_kb("VmRSS") or 0.0
        except OSError:
            self.how, self.start = "ru_maxrss", float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def rise_mb(self) -> float:
        now = self._status_kb("VmHWM") if self.how == "VmHWM" else None
        if now is None:
            now = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        return max(0.0, now - self.start) / 1024


def stamp() -> tuple[float, float]:
    """(wall clock, this process's CPU time) now."""
    return time.perf_counter(), time.process_time()


def timed(batches: Iterable[T], stamps: list[tuple[float, float]]) -> Iterator[T]:
    """Yield ``batches``, stamping each request and the end (step i runs from stamps[i] to stamps[i+1])."""
    for item in batches:
        stamps.append(stamp())
        yield item
    stamps.append(stamp())


def typical_of(durations: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Lower-quartile wall time and median CPU time of (wall, cpu) step durations.

    Other processes on a shared CPU only ever slow a step down, so the lower quartile is robust to
    them (on a quiet machine it is close to the median). CPU time counts every thread of this
    process; with one thread it barely depends on the machine's load.
    """
    walls = sorted(d[0] for d in durations)
    cpus = sorted(d[1] for d in durations)
    return walls[(len(walls) - 1) // 4], cpus[(len(cpus) - 1) // 2]


def _load_setup(workdir: Path, workload: str):
    from distillery.data import ImageDataset
    from distillery.models import create_model

    data = torch.load(workdir / "data.pt", weights_only=True)
    train = ImageDataset(data["train_images"], data["train_labels"], (data["mean"],), (data["std"],), 10)
    test = ImageDataset(data["test_images"], data["test_labels"], (data["mean"],), (data["std"],), 10)
    teacher_name, student_name, student_kwargs = PAIRS[workload]
    weights = torch.load(workdir / f"weights-{teacher_name}-{student_name}.pt", weights_only=True)
    teacher = create_model(teacher_name)
    teacher.load_state_dict(weights["teacher"])
    student = create_model(student_name, **student_kwargs)
    student.load_state_dict(weights["student"])
    return train, test, teacher, student


def make_row(workdir: Path, workload: str, row: str) -> tuple[Callable[[int], list[tuple[float, float]]], int]:
    """Set up one row; returns ``run(round)`` — one epoch of the row's small dataset, giving each
    step's (wall, CPU) seconds — and the row's batch size. State (weights, optimiser) carries on
    from round to round, as in training."""
    from distillery.config import TrainConfig
    from distillery.data import BatchLoader
    from distillery.methods import Teacher, create_method
    from distillery.methods.fsp import STAGE1_OPTIMIZER
    from distillery.train import Stage, Trainer, evaluate
    from distillery.train.loop import prefer_channels_last

    torch.manual_seed(0)
    train, test, teacher_net, student = _load_setup(workdir, workload)

    def durations(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]

    if row in ("ce alone", "kd on the fly", "kd cached", "fsp1 on the fly", "fsp1 stored"):
        stamps: list[tuple[float, float]] = []

        class StepTimedTrainer(Trainer):
            def _step(self, *args, **kwargs):  # stamp each step's start (loop bookkeeping included)
                stamps.append(stamp())
                return super()._step(*args, **kwargs)

            def _epoch_record(self, *args, **kwargs):
                stamps.append(stamp())
                return super()._epoch_record(*args, **kwargs)

        optimizer = {"name": "sgd", "lr": SGD["lr"], "momentum": SGD["momentum"], "weight_decay": SGD["weight_decay"]}
        if row == "ce alone":
            method = create_method("ce")
        elif row.startswith("kd"):
            method = create_method("hinton", **KD)
        else:  # FSP stage 1 as `distillery distill --method fsp` runs it, with the default pairs and optimiser
            method, optimizer = create_method("fsp", store_teacher=row == "fsp1 stored"), STAGE1_OPTIMIZER
        cfg = TrainConfig(epochs=1, batch_size=BATCH, schedule={"name": "constant"}, optimizer=optimizer)
        small_test = test.subset(EVAL_BATCH)
        cached = row in ("kd cached", "fsp1 stored")

        def run_trainer(r: int) -> list[tuple[float, float]]:
            stamps.clear()
            StepTimedTrainer(student, train, small_test, [Stage(method, cfg)], teacher=Teacher(teacher_net),
                             seed=r, progress=False, echo=lambda line: None,
                             teacher_cache=workdir / "cache" if cached else None).fit()
            return durations(stamps)

        return run_trainer, BATCH
    if row == "kd reference":
        def run_reference(r: int) -> list[tuple[float, float]]:
            stamps: list[tuple[float, float]] = []
            perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(r))
            batches = [(train.images[i], train.labels[i]) for i in perm.split(BATCH)]
            reference_kd_loop(teacher_net, student, timed(batches, stamps), train.mean[0], train.std[0], **KD)
            return durations(stamps)

        return run_reference, BATCH
    if row == "eval evaluate()":
        prefer_channels_last(student, "cpu")  # as the Trainer leaves it; the bare loop gets the same model
        loader = BatchLoader(test, EVAL_BATCH, keep_normalised=True)  # as the Trainer's test loader

        def run_evaluate(r: int) -> list[tuple[float, float]]:
            stamps: list[tuple[float, float]] = []

            class StepTimedLoader:  # evaluate() reads the loader's epoch(), device and order()
                device = loader.device

                def epoch(self, epoch):
                    return timed(loader.epoch(epoch), stamps)

                def order(self, epoch):
                    return loader.order(epoch)

            evaluate(student, StepTimedLoader())  # type: ignore[arg-type]
            return durations(stamps)

        return run_evaluate, EVAL_BATCH
    if row == "eval bare model(x)":
        prefer_channels_last(student, "cpu")
        batches = [(test.images[i:i + EVAL_BATCH].float() / 255 - test.mean[0]) / test.std[0]
                   for i in range(0, len(test), EVAL_BATCH)]

        def run_bare(r: int) -> list[tuple[float, float]]:
            stamps: list[tuple[float, float]] = []
            student.eval()
            with torch.inference_mode():
                for x in timed(batches, stamps):
                    student(x)
            return durations(stamps)

        return run_bare, EVAL_BATCH
    raise ValueError(f"unknown bench row {row!r}; rows: {', '.join(ROWS)}")


def speed_of_rows(workdir: Path, workload: str, rounds: int) -> dict[str, dict[str, float]]:
    """Interleave the workload's rows: a warm-up round, then ``rounds`` rounds of one short epoch of
    each row in turn, so a busy spell on a shared machine hits every row alike."""
    rows = {row: make_row(workdir, workload, row) for row in _rows_for(workload)}
    steps: dict[str, list[tuple[float, float]]] = {row: [] for row in rows}
    for r in range(rounds + 1):
        for row, (run, _) in rows.items():
            measured = run(r)
            if r > 0:
                steps[row] += measured
    out = {}
    for row, (_, batch_size) in rows.items():
        wall, cpu = typical_of(steps[row])
        out[row] = {"images_per_s": batch_size / wall, "seconds": wall, "cpu_ms_per_image": 1000 * cpu / batch_size,
                    "steps": len(steps[row])}
    return out


def memory_of_row(workdir: Path, workload: str, row: str) -> dict[str, float | str]:
    """Peak-memory rise of one row over two rounds (the peak is reached in the first step)."""
    run, _ = make_row(workdir, workload, row)
    memory = PeakMemory()
    memory.reset()
    run(0)
    run(1)
    return {"peak_rss_mb": memory.rise_mb(), "memory": memory.how}


# ---------------------------------------------------------------- the parent: prepare, spawn, report


def _prepare(workdir: Path, data_root: str | None, echo) -> None:
    """Write the data subset and initial weights every row shares, and fill the teacher caches."""
    from distillery.cache import CachedTeacher
    from distillery.data import BatchLoader, load_idx_dataset
    from distillery.methods import Teacher, create_method
    from distillery.models import create_model
    from distillery.train.loop import prefer_channels_last

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
        if teacher_name.startswith("resnet"):
            start = time.perf_counter()
            fsp = create_method("fsp", store_teacher=True)  # the row's method fills the cache it will read
            loader = BatchLoader(train, BATCH, shuffle=True)
            fsp.setup(student, Teacher(teacher), next(loader.epoch(0)).inputs[:8])
            fsp.prepare(Teacher(teacher), loader, workdir / "cache")
            echo(f"  {workload}: teacher FSP matrices stored in {time.perf_counter() - start:.1f} s (one-time)")


def _rows_for(workload: str) -> list[str]:
    return [r for r in ROWS if not (r.startswith("fsp") and not PAIRS[workload][0].startswith("resnet"))]


def _spawn(workdir: Path, args: list[str], threads: int | None) -> dict:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "distillery.bench", "--workdir", str(workdir), *args]
    cmd += ["--threads", str(threads)] if threads else []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(steps: int = 20, output: str | Path = "runs/bench", data_root: str | None = None,
              threads: int | None = None, echo=print) -> tuple[list[Result], str, Path]:
    """Run every row, print and write the table; returns the results, the markdown and its path.

    ``steps``: timed steps per row (rounded up to whole rounds of :data:`CHUNK`). ``threads``:
    torch threads in each row (default: torch's default, one per core).
    """
    threads = threads or torch.get_num_threads()
    rounds = max(1, -(-steps // CHUNK))
    started = dt.datetime.now(dt.timezone.utc)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        workdir = Path(tmp)
        echo(f"preparing: {rounds} rounds of {CHUNK} steps per row, interleaved, after a warm-up round ...")
        _prepare(workdir, data_root, echo)
        for workload in PAIRS:
            speed = _spawn(workdir, ["--speed", "--workload", workload, "--rounds", str(rounds)], threads)
            first = speed[_rows_for(workload)[0]]["images_per_s"]
            for row in _rows_for(workload):
                memory = _spawn(workdir, ["--memory", "--workload", workload, "--row", row], threads)
                m = speed[row]
                result = Result(workload, row, m["images_per_s"], m["images_per_s"] / first, memory["peak_rss_mb"],
                                m["seconds"], m["cpu_ms_per_image"], memory["memory"])
                results.append(result)
                echo(f"  {workload:18s} {row:20s} {result.images_per_s:10.0f} img/s  {result.ratio:5.2f}×  "
                     f"{result.peak_rss_mb:6.1f} MB")
    steps = rounds * CHUNK
    markdown = format_table(results, started, steps, threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{started.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({
        "date": started.isoformat(), "torch": torch.__version__, "threads": threads,
        "cpu_count": os.cpu_count(), "steps": steps, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH,
        "memory": "rise of peak resident memory (VmHWM, else ru_maxrss) in a subprocess per row, MB",
        "timing": "images/s = batch / lower-quartile step time; rows interleaved in rounds in one process",
        "results": [asdict(r) for r in results],
        "targets": target_checks(results),
    }, indent=2))
    return results, markdown, stem.with_suffix(".md")


def target_checks(results: list[Result]) -> list[dict[str, object]]:
    by = {(r.workload, r.row): r for r in results}
    checks = []
    for workload in PAIRS:
        for row, base, minimum in TARGETS:
            if (workload, row) in by and (workload, base) in by:
                new, old = by[(workload, row)], by[(workload, base)]
                ratio = new.images_per_s / old.images_per_s
                checks.append({"workload": workload, "row": row, "baseline": base, "ratio": ratio,
                               "target": minimum, "met": ratio >= minimum,
                               "cpu_ratio": old.cpu_ms_per_image / new.cpu_ms_per_image})
    return checks


def format_table(results: list[Result], started: dt.datetime, steps: int, threads: int) -> str:
    lines = [
        f"# distillery bench — {started.strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"torch {torch.__version__}, {threads} threads, CPU ({os.cpu_count()} cores); Fashion-MNIST, batch {BATCH} "
        f"(eval {EVAL_BATCH}), SGD; {steps} timed steps per row (rows interleaved in rounds of {CHUNK}, after a "
        "warm-up round); images/s from the lower-quartile step time, CPU time the median. Ratio: to the first "
        f"row of the workload. Peak memory: rise of the peak resident set "
        f"({results[0].memory if results else 'VmHWM'}) while the row runs, one subprocess per row.",
        "",
        "| workload | row | images/s | × first row | CPU ms/image | peak RSS Δ MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.workload} | {r.row} | {r.images_per_s:,.0f} | {r.ratio:.3f} | {r.cpu_ms_per_image:.3f} "
                     f"| {r.peak_rss_mb:.1f} |")
    lines += ["", "| workload | target (images/s ratio) | ratio | met | same ratio from CPU time |",
              "|---|---|---:|:---:|---:|"]
    for c in target_checks(results):
        lines.append(f"| {c['workload']} | {c['row']} ≥ {c['target']} × {c['baseline']} | {c['ratio']:.3f} | "
                     f"{'yes' if c['met'] else 'NO'} | {c['cpu_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def _child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillery.bench", description="one bench child process")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--speed", action="store_true", help="time every row of the workload, interleaved")
    mode.add_argument("--memory", action="store_true", help="peak-memory rise of one row")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--workload", required=True, choices=list(PAIRS))
    parser.add_argument("--row", choices=ROWS)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.speed:
        print(json.dumps(speed_of_rows(workdir, args.workload, args.rounds)))
    else:
        print(json.dumps(memory_of_row(workdir, args.workload, args.row)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
