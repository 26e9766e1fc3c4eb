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
    ce alone (again)    the first row once more: an A/A control, whose ratio to the first row
                        shows how far two identical rows disagree in this run

Speed: one subprocess per workload sets up all its rows, each running in its own thread for a
warm-up epoch and then the timed epochs of :data:`CHUNK` steps, and lets them take one step at a
time in turn (:class:`TurnTaking`, back and forth along :data:`RUN_ORDER`, where each target's two
rows are neighbours), so they alternate step by step. images/s comes from the lower-quartile step
time (interference only ever slows a step down); the median CPU time per image is reported too.
Each target is judged on paired steps: the ratio of the two rows' k-th step times, taken for every
k; the median of these ratios, with a distribution-free 95 % interval
(:func:`distillery.stats.median_interval`), says "met" when the whole interval clears the target,
"NOT MET" when it lies wholly below, "within noise" otherwise. Pairing is what makes a 3 % target
measurable on a shared 2-core VM: its speed drifts by up to ±25 % over seconds (one MLP step's
time correlates 0.8 with the next's), which rows timed seconds apart would mix into their ratio.
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
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.stats import median_interval
from distillery.train.callbacks import Callback, StepEvent

BATCH = 128
EVAL_BATCH = 256
CHUNK = 5  # steps per epoch of each row (its small dataset holds 5 batches)
PAIRS = {  # workload name: (teacher model, student model, student kwargs)
    "resnet20→resnet8": ("resnet20", "resnet8", {}),
    "mlp1200²→mlp800²": ("mlp_hinton_teacher", "mlp", {"hidden": [800, 800]}),
}
TRAINER_ROWS = ("ce alone", "ce alone (again)", "kd on the fly", "kd cached", "fsp1 on the fly", "fsp1 stored")
ROWS = ("ce alone", "kd reference", "kd on the fly", "kd cached", "fsp1 on the fly", "fsp1 stored",
        "eval evaluate()", "eval bare model(x)", "ce alone (again)")
# (row, baseline row, minimum ratio) — the targets this benchmark exists to watch.
TARGETS = (("kd cached", "ce alone", 0.97), ("kd on the fly", "kd reference", 0.97),
           ("fsp1 stored", "fsp1 on the fly", 1.8), ("eval evaluate()", "eval bare model(x)", 0.95))
CONTROL = ("ce alone (again)", "ce alone")  # A/A: the same row twice; its ratio should be 1
# The rotation the rows take their steps in: each target's two rows (and the control's) are neighbours.
RUN_ORDER = ("ce alone (again)", "ce alone", "kd cached", "kd reference", "kd on the fly", "fsp1 on the fly",
             "fsp1 stored", "eval bare model(x)", "eval evaluate()")
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
    step_seconds: list[float] = field(default_factory=list)  # each timed step, in the order run


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


class TurnTaking:
    """Lets rows that run in their own threads take one step at a time, in turn.

    Only the thread whose turn it is runs (the others wait on a condition), so timings are not
    shared between rows; the turn goes back and forth along ``order`` (A B C C B A A B ...), so the
    two rows of a target alternate step by step and neither always runs first.
    """

    def __init__(self, order: Sequence[str]) -> None:
        self._active = list(order)
        self._position, self._direction = 0, 1
        self._condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: self._active and self._active[self._position] == name)

    def hand_over(self, name: str, finished: bool = False) -> None:
        """Pass the turn on (the caller must hold it); ``finished`` leaves the rotation."""
        with self._condition:
            if finished:
                self._active.remove(name)
                if self._position >= len(self._active):
                    self._position, self._direction = max(0, len(self._active) - 1), -1
            else:
                step = self._position + self._direction
                if not 0 <= step < len(self._active):  # turn around at either end: that row goes again
                    self._direction = -self._direction
                    step = self._position
                self._position = step
            self._condition.notify_all()


class StepClock:
    """Times one row's steps and, with a :class:`TurnTaking`, takes its turns.

    The row's thread must hold the turn when it first calls :meth:`begin`. :meth:`begin` at the
    start of every later step ends the previous step (so a step includes the loop's bookkeeping
    after it), hands the turn over and waits for it to come back; :meth:`pause` ends the running
    step without handing over (an epoch's end: evaluation and set-up are not timed).
    """

    def __init__(self, name: str = "", turns: TurnTaking | None = None) -> None:
        self.name, self.turns = name, turns
        self.steps: list[tuple[float, float]] = []  # (wall, CPU) seconds of each finished step
        self._start: tuple[float, float] | None = None
        self._stepped = False  # this row has taken a step: from then on each begin() first hands the turn over

    def begin(self) -> None:
        self.pause()
        if self.turns is not None and self._stepped:
            self.turns.hand_over(self.name)
            self.turns.wait(self.name)
        self._stepped = True
        self._start = stamp()

    def pause(self) -> None:
        if self._start is not None:
            now = stamp()
            self.steps.append((now[0] - self._start[0], now[1] - self._start[1]))
            self._start = None

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """Yield ``batches``, timing each one's processing as a step."""
        for item in batches:
            self.begin()
            yield item
        self.pause()


class ClockedSteps(Callback):
    """Times a Trainer's steps with a :class:`StepClock`: a step runs from its start until the next
    one starts (the loop's bookkeeping included); an epoch's last step ends before its evaluation."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_step_start(self, event: StepEvent) -> None:
        self.clock.begin()

    def on_step_end(self, event: StepEvent) -> None:
        if event.step + 1 == event.stage.steps:
            self.clock.pause()


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


def _trainer_row(workdir: Path, row: str, train, test, teacher_net: nn.Module,
                 student: nn.Module) -> Callable[[int, StepClock], None]:
    """A row that runs our Trainer: ``run(epochs, clock)`` with every step timed by ``clock``."""
    from distillery.config import TrainConfig
    from distillery.methods import Teacher, create_method
    from distillery.methods.features import STAGE1_OPTIMIZER
    from distillery.train import Stage, Trainer

    optimizer = {"name": "sgd", "lr": SGD["lr"], "momentum": SGD["momentum"], "weight_decay": SGD["weight_decay"]}
    if row.startswith("ce alone"):
        method = create_method("ce")
    elif row.startswith("kd"):
        method = create_method("hinton", **KD)
    else:  # FSP stage 1 as `distillery distill --method fsp` runs it, with the default pairs and optimiser
        method, optimizer = create_method("fsp", store_teacher=row == "fsp1 stored"), STAGE1_OPTIMIZER
    small_test = test.subset(EVAL_BATCH)
    cached = row in ("kd cached", "fsp1 stored")

    def run_trainer(epochs: int, clock: StepClock) -> None:
        cfg = TrainConfig(epochs=epochs, batch_size=BATCH, schedule={"name": "constant"}, optimizer=optimizer)
        Trainer(student, train, small_test, [Stage(method, cfg)], teacher=Teacher(teacher_net),
                progress=False, echo=lambda line: None, callbacks=[ClockedSteps(clock)],
                teacher_cache=workdir / "cache" if cached else None).fit()

    return run_trainer


def make_row(workdir: Path, workload: str, row: str) -> tuple[Callable[[int, StepClock], None], int]:
    """Set up one row; returns ``run(epochs, clock)`` — that many epochs of the row's small dataset
    (:data:`CHUNK` steps each), every step timed by ``clock`` — and the row's batch size."""
    from distillery.data import BatchLoader
    from distillery.train import evaluate, prefer_channels_last

    torch.manual_seed(0)
    train, test, teacher_net, student = _load_setup(workdir, workload)

    if row in TRAINER_ROWS:
        return _trainer_row(workdir, row, train, test, teacher_net, student), BATCH
    if row == "kd reference":
        def run_reference(epochs: int, clock: StepClock) -> None:
            for epoch in range(epochs):
                perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))
                batches = [(train.images[i], train.labels[i]) for i in perm.split(BATCH)]
                reference_kd_loop(teacher_net, student, clock.timed(batches), train.mean[0], train.std[0], **KD)

        return run_reference, BATCH
    if row == "eval evaluate()":
        prefer_channels_last(student, "cpu")  # as the Trainer leaves it; the bare loop gets the same model
        loader = BatchLoader(test, EVAL_BATCH, keep_normalised=True)  # as the Trainer's test loader

        def run_evaluate(epochs: int, clock: StepClock) -> None:
            class StepTimedLoader:  # evaluate() reads the loader's epoch(), device and order()
                device = loader.device

                def epoch(self, epoch):
                    return clock.timed(loader.epoch(epoch))

                def order(self, epoch):
                    return loader.order(epoch)

            for _ in range(epochs):
                evaluate(student, StepTimedLoader())  # type: ignore[arg-type]

        return run_evaluate, EVAL_BATCH
    if row == "eval bare model(x)":
        prefer_channels_last(student, "cpu")
        batches = [(test.images[i:i + EVAL_BATCH].float() / 255 - test.mean[0]) / test.std[0]
                   for i in range(0, len(test), EVAL_BATCH)]

        def run_bare(epochs: int, clock: StepClock) -> None:
            student.eval()
            with torch.inference_mode():
                for _ in range(epochs):
                    for x in clock.timed(batches):
                        student(x)

        return run_bare, EVAL_BATCH
    raise ValueError(f"unknown bench row {row!r}; rows: {', '.join(ROWS)}")


def speed_of_rows(workdir: Path, workload: str, epochs: int) -> dict[str, dict[str, object]]:
    """Run the workload's rows step by step in turn (:class:`TurnTaking` along :data:`RUN_ORDER`),
    each in its own thread for ``epochs + 1`` epochs of :data:`CHUNK` steps (the first a warm-up),
    so a target's two rows alternate step by step and a slow spell of the machine hits both."""
    rows = {row: make_row(workdir, workload, row) for row in _rows_for(workload)}
    order = [row for row in RUN_ORDER if row in rows]
    turns = TurnTaking(order)
    clocks = {row: StepClock(row, turns) for row in order}
    errors: list[BaseException] = []

    def take_turns(row: str) -> None:
        turns.wait(row)
        try:
            rows[row][0](epochs + 1, clocks[row])
        except BaseException as err:  # reported by the parent thread
            errors.append(err)
        finally:
            clocks[row].pause()
            turns.hand_over(row, finished=True)

    threads = [threading.Thread(target=take_turns, args=(row,), name=f"bench {row}") for row in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    out: dict[str, dict[str, object]] = {}
    for row in order:
        batch_size = rows[row][1]
        steps = clocks[row].steps[CHUNK:]  # the first epoch warms up
        wall, cpu = typical_of(steps)
        out[row] = {"images_per_s": batch_size / wall, "seconds": wall, "cpu_ms_per_image": 1000 * cpu / batch_size,
                    "steps": len(steps), "step_seconds": [d[0] for d in steps]}
    return out


def memory_of_row(workdir: Path, workload: str, row: str) -> dict[str, float | str]:
    """Peak-memory rise of one row over two epochs (the peak is reached in the first step)."""
    run, _ = make_row(workdir, workload, row)
    memory = PeakMemory()
    memory.reset()
    run(2, StepClock())
    return {"peak_rss_mb": memory.rise_mb(), "memory": memory.how}


# ---------------------------------------------------------------- the parent: prepare, spawn, report


def _prepare(workdir: Path, data_root: str | None, echo) -> None:
    """Write the data subset and initial weights every row shares, and fill the teacher caches."""
    from distillery.cache import CachedTeacher
    from distillery.data import BatchLoader, load_idx_dataset
    from distillery.methods import Teacher, create_method
    from distillery.models import create_model
    from distillery.stored_targets import serve_targets
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
        if teacher_name.startswith("resnet"):
            start = time.perf_counter()
            fsp = create_method("fsp", store_teacher=True)  # the row's method fills the cache it will read
            loader = BatchLoader(train, BATCH, shuffle=True)
            fsp.setup(student, Teacher(teacher), next(loader.epoch(0)).inputs[:8])
            serve_targets(fsp.target_request(), Teacher(teacher), loader, cache_dir=workdir / "cache", max_mb=1e9)
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


def run_bench(steps: int = 60, output: str | Path = "runs/bench", data_root: str | None = None,
              threads: int | None = None, echo=print) -> tuple[list[Result], str, Path]:
    """Run every row, print and write the table; returns the results, the markdown and its path.

    ``steps``: timed steps per row (rounded up to whole epochs of :data:`CHUNK`). ``threads``:
    torch threads in each row (default: torch's default, one per core).
    """
    threads = threads or torch.get_num_threads()
    epochs = max(1, -(-steps // CHUNK))
    started = dt.datetime.now(dt.timezone.utc)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="distillery-bench-") as tmp:
        workdir = Path(tmp)
        echo(f"preparing: {epochs} epochs of {CHUNK} steps per row, rows taking turns step by step, after a "
             "warm-up epoch ...")
        _prepare(workdir, data_root, echo)
        for workload in PAIRS:
            speed = _spawn(workdir, ["--speed", "--workload", workload, "--epochs", str(epochs)], threads)
            first = speed[_rows_for(workload)[0]]["images_per_s"]
            for row in _rows_for(workload):
                memory = _spawn(workdir, ["--memory", "--workload", workload, "--row", row], threads)
                m = speed[row]
                result = Result(workload, row, m["images_per_s"], m["images_per_s"] / first, memory["peak_rss_mb"],
                                m["seconds"], m["cpu_ms_per_image"], memory["memory"], m["step_seconds"])
                results.append(result)
                echo(f"  {workload:18s} {row:20s} {result.images_per_s:10.0f} img/s  {result.ratio:5.2f}×  "
                     f"{result.peak_rss_mb:6.1f} MB")
    steps = epochs * CHUNK
    markdown = format_table(results, started, steps, threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{started.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".md").write_text(markdown)
    stem.with_suffix(".json").write_text(json.dumps({
        "date": started.isoformat(), "torch": torch.__version__, "threads": threads,
        "cpu_count": os.cpu_count(), "steps": steps, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH,
        "memory": "rise of peak resident memory (VmHWM, else ru_maxrss) in a subprocess per row, MB",
        "timing": "images/s = batch / lower-quartile step time; rows take turns step by step in one process; "
                  "targets judged on the median of paired step-time ratios with a 95 % order-statistic interval",
        "results": [asdict(r) for r in results],
        "targets": target_checks(results),
    }, indent=2))
    return results, markdown, stem.with_suffix(".md")


def target_checks(results: list[Result]) -> list[dict[str, object]]:
    """Each target (and the A/A control, target 1.0) of every workload, judged on paired steps.

    ``ratio``: images/s from the pooled lower-quartile step times; ``paired``: the median over k of
    the k-th steps' ratio (baseline's step time / the row's, i.e. the row's speed over the
    baseline's), with ``low``/``high``, its distribution-free 95 % interval; ``verdict``: "met" when
    ``low`` ≥ target, "NOT MET" when ``high`` < target, else "within noise" (for the control:
    "agree" when the interval holds 1).
    """
    by = {(r.workload, r.row): r for r in results}
    checks = []
    for workload in PAIRS:
        for row, base, minimum in (*TARGETS, (*CONTROL, 1.0)):
            if (workload, row) not in by or (workload, base) not in by:
                continue
            new, old = by[(workload, row)], by[(workload, base)]
            check: dict[str, object] = {
                "workload": workload, "row": row, "baseline": base, "target": minimum,
                "ratio": new.images_per_s / old.images_per_s,
                "cpu_ratio": old.cpu_ms_per_image / new.cpu_ms_per_image, "control": (row, base) == CONTROL}
            pairs = [b / a for a, b in zip(new.step_seconds, old.step_seconds)]
            if pairs:
                paired = median_interval(pairs)
                check.update(paired=paired.median, low=paired.low, high=paired.high, pairs=paired.n,
                             coverage=paired.coverage)
                if check["control"]:
                    check["verdict"] = "agree" if paired.low <= 1.0 <= paired.high else "DISAGREE"
                else:
                    check["verdict"] = ("met" if paired.low >= minimum else
                                        "NOT MET" if paired.high < minimum else "within noise")
            checks.append(check)
    return checks


def format_table(results: list[Result], started: dt.datetime, steps: int, threads: int) -> str:
    lines = [
        f"# distillery bench — {started.strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"torch {torch.__version__}, {threads} threads, CPU ({os.cpu_count()} cores); Fashion-MNIST, batch {BATCH} "
        f"(eval {EVAL_BATCH}), SGD; {steps} timed steps per row (rows take turns step by step, after a warm-up "
        f"epoch of {CHUNK} steps); images/s from the lower-quartile step time, CPU time the median. Ratio: to the "
        f"first row of the workload. Peak memory: rise of the peak resident set "
        f"({results[0].memory if results else 'VmHWM'}) while the row runs, one subprocess per row.",
        "",
        "| workload | row | images/s | × first row | CPU ms/image | peak RSS Δ MB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.workload} | {r.row} | {r.images_per_s:,.0f} | {r.ratio:.3f} | {r.cpu_ms_per_image:.3f} "
                     f"| {r.peak_rss_mb:.1f} |")
    checks = target_checks(results)
    pairs = max((int(c.get("pairs", 0)) for c in checks), default=0)  # type: ignore[call-overload]
    lines += ["", f"Targets, judged on {pairs} paired steps (the two rows take turns step by step): the median of "
              "the per-pair speed ratios with its distribution-free 95 % interval (met: the whole interval clears "
              "the target). The last line of each workload is the A/A control, the first row against itself: its "
              "interval should hold 1.", "",
              "| workload | target | paired ratio [95 % interval] | verdict | pooled ratio | CPU-time ratio |",
              "|---|---|---:|:---:|---:|---:|"]
    for c in checks:
        target = (f"{c['row']} vs {c['baseline']} (control)" if c["control"]
                  else f"{c['row']} ≥ {c['target']} × {c['baseline']}")
        paired = f"{c['paired']:.3f} [{c['low']:.3f}, {c['high']:.3f}]" if "paired" in c else "—"
        lines.append(f"| {c['workload']} | {target} | {paired} | {c.get('verdict', '—')} | {c['ratio']:.3f} | "
                     f"{c['cpu_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def _child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m distillery.bench", description="one bench child process")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--speed", action="store_true", help="time every row of the workload, interleaved")
    mode.add_argument("--memory", action="store_true", help="peak-memory rise of one row")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--workload", required=True, choices=list(PAIRS))
    parser.add_argument("--row", choices=ROWS)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per row (after a warm-up epoch)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args.speed:
        print(json.dumps(speed_of_rows(workdir, args.workload, args.epochs)))
    else:
        print(json.dumps(memory_of_row(workdir, args.workload, args.row)))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
