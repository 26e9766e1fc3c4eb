"""The benchmark's rows: what each one trains, set up in a child process from the shared work folder.

Every Trainer row runs our :class:`~distillery.train.Trainer` with :class:`~distillery.bench.clocks.
ClockedSteps` among its public callbacks; the other rows are a hand-written reference loop and two
ways of evaluating. :func:`speed_of_rows` runs a workload's rows step by step in turn, each in its
own thread; :func:`memory_of_row` measures one row's peak memory in its own process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillery.bench.clocks import ClockedSteps, PeakMemory, StepClock, TurnTaking, typical_of
from distillery.bench.targets import BATCH, CHUNK, EVAL_BATCH, RUN_ORDER
from distillery.teacher_store import StoreSettings

PAIRS = {  # workload name: (teacher model, student model, student kwargs)
    "resnet20→resnet8": ("resnet20", "resnet8", {}),
    "mlp1200²→mlp800²": ("mlp_hinton_teacher", "mlp", {"hidden": [800, 800]}),
}
ROWS = ("ce alone", "kd reference", "kd on the fly", "kd cached", "fsp1 on the fly", "fsp1 stored",
        "ce alone, augmented", "kd stored, augmented", "eval evaluate()", "eval bare model(x)", "ce alone (again)")
TRAINER_ROWS = ("ce alone", "ce alone (again)", "kd on the fly", "kd cached", "fsp1 on the fly", "fsp1 stored",
                "ce alone, augmented", "kd stored, augmented")
CONV_ONLY = ("fsp1 on the fly", "fsp1 stored", "ce alone, augmented", "kd stored, augmented")  # ResNet pair only
KD = {"temperature": 4.0, "kd_weight": 0.9, "ce_weight": 0.1}
SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
AUGMENT = {"crop_padding": 2, "hflip": True}
STORE = StoreSettings(epochs=2)  # the augmented KD row reads 2 stored epochs of views, cycling through them


def rows_for(workload: str) -> list[str]:
    convolutional = PAIRS[workload][0].startswith("resnet")
    return [r for r in ROWS if convolutional or r not in CONV_ONLY]


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


def load_setup(workdir: Path, workload: str):
    """The shared data subset and the workload's initial teacher and student (written by the parent)."""
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
    augment = AUGMENT if row.endswith("augmented") else {}
    small_test = test.subset(EVAL_BATCH)
    cached = row in ("kd cached", "fsp1 stored", "kd stored, augmented")

    def run_trainer(epochs: int, clock: StepClock) -> None:
        cfg = TrainConfig(epochs=epochs, batch_size=BATCH, schedule={"name": "constant"}, optimizer=optimizer,
                          augment=augment)
        Trainer(student, train, small_test, [Stage(method, cfg)], teacher=Teacher(teacher_net),
                progress=False, echo=lambda line: None, callbacks=[ClockedSteps(clock)],
                teacher_cache=workdir / "cache" if cached else None, teacher_store=STORE).fit()

    return run_trainer


def _evaluate_row(test, student: nn.Module) -> Callable[[int, StepClock], None]:
    from distillery.data import BatchLoader
    from distillery.train import evaluate, prefer_channels_last

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

    return run_evaluate


def _bare_row(test, student: nn.Module) -> Callable[[int, StepClock], None]:
    from distillery.train import prefer_channels_last

    prefer_channels_last(student, "cpu")
    batches = [(test.images[i:i + EVAL_BATCH].float() / 255 - test.mean[0]) / test.std[0]
               for i in range(0, len(test), EVAL_BATCH)]

    def run_bare(epochs: int, clock: StepClock) -> None:
        student.eval()
        with torch.inference_mode():
            for _ in range(epochs):
                for x in clock.timed(batches):
                    student(x)

    return run_bare


def make_row(workdir: Path, workload: str, row: str) -> tuple[Callable[[int, StepClock], None], int]:
    """Set up one row; returns ``run(epochs, clock)`` — that many epochs of the row's small dataset
    (:data:`CHUNK` steps each), every step timed by ``clock`` — and the row's batch size."""
    torch.manual_seed(0)
    train, test, teacher_net, student = load_setup(workdir, workload)
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
        return _evaluate_row(test, student), EVAL_BATCH
    if row == "eval bare model(x)":
        return _bare_row(test, student), EVAL_BATCH
    raise ValueError(f"unknown bench row {row!r}; rows: {', '.join(ROWS)}")


def speed_of_rows(workdir: Path, workload: str, epochs: int) -> dict[str, dict[str, object]]:
    """Run the workload's rows step by step in turn (:class:`TurnTaking` along :data:`RUN_ORDER`),
    each in its own thread for ``epochs + 1`` epochs of :data:`CHUNK` steps (the first a warm-up),
    so a target's two rows alternate step by step and a slow spell of the machine hits both."""
    rows = {row: make_row(workdir, workload, row) for row in rows_for(workload)}
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
        batch_size, clock = rows[row][1], clocks[row]
        steps = clock.steps[CHUNK:]  # the first epoch warms up
        wall, cpu = typical_of(steps)
        out[row] = {"images_per_s": batch_size / wall, "seconds": wall, "cpu_ms_per_image": 1000 * cpu / batch_size,
                    "steps": len(steps), "step_seconds": [d[0] for d in steps],
                    "teacher_seconds": clock.teacher_steps[CHUNK:] if clock.teacher_seconds else []}
    return out


def memory_of_row(workdir: Path, workload: str, row: str) -> dict[str, float | str]:
    """Peak-memory rise of one row over two epochs (the peak is reached in the first step)."""
    run, _ = make_row(workdir, workload, row)
    memory = PeakMemory()
    memory.reset()
    run(2, StepClock())
    return {"peak_rss_mb": memory.rise_mb(), "memory": memory.how}
