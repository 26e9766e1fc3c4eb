"""TensorBoard logging: the event file holds every number of every epoch's record, on one run-long axis."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_idx import one_thread, tiny_dataset  # noqa: F401 (one_thread: an autouse fixture)

from distillery import OptimizerConfig, Stage, Teacher, TrainConfig, Trainer, create_method, create_model
from distillery.train.callbacks import EpochEvent, StageEvent
from distillery.train.tensorboard import TensorBoardLogger, scalar_tags


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(s.step, s.value) for s in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_scalar_tags_name_each_number_by_where_it_was_measured() -> None:
    record = {"stage": 2, "method": "hinton", "epoch": 3, "lr": 0.01, "train_loss": 1.5, "train_ce": 0.5,
              "train_kd": 1.0, "train_accuracy": 0.25, "test_accuracy": 0.5, "test_loss": 1.25,
              "images_per_s": 1000.0, "seconds": 0.125}
    assert scalar_tags(record) == {
        "lr": 0.01, "train/loss": 1.5, "train/ce": 0.5, "train/kd": 1.0, "train/accuracy": 0.25,
        "test/accuracy": 0.5, "test/loss": 1.25, "speed/images_per_s": 1000.0, "speed/seconds": 0.125}


@pytest.mark.filterwarnings("ignore::distillery.train.sanity.TrainingWarning")  # an untrained teacher, 3 epochs
def test_a_two_stage_run_writes_every_term_accuracy_lr_and_speed_per_epoch(tmp_path: Path) -> None:
    data = tiny_dataset(96, size=8)
    torch.manual_seed(0)
    student = create_model("mlp", input_size=8, hidden=[16])
    teacher = Teacher(create_model("mlp", input_size=8, hidden=[32]))
    train = TrainConfig(epochs=2, batch_size=32, optimizer=OptimizerConfig(lr=0.05))
    stages = [Stage(create_method("ce"), train),
              Stage(create_method("hinton", temperature=2.0), train.model_copy(update={"epochs": 1}))]
    log_dir = tmp_path / "tb"
    history = Trainer(student, data, data, stages, teacher=teacher, progress=False, echo=lambda line: None,
                      callbacks=[TensorBoardLogger(log_dir)]).fit()

    scalars = read_scalars(log_dir)
    assert set(scalars) == {"train/loss", "train/ce", "train/kd", "train/accuracy", "test/accuracy", "test/loss",
                            "lr", "speed/images_per_s", "speed/seconds"}
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3]  # stage 2's epoch follows stage 1's two
    assert [step for step, _ in scalars["train/kd"]] == [3]  # only the hinton stage has a soft term
    for tag, key in (("train/loss", "train_loss"), ("train/ce", "train_ce"), ("test/accuracy", "test_accuracy"),
                     ("lr", "lr"), ("speed/images_per_s", "images_per_s")):
        assert [value for _, value in scalars[tag]] == pytest.approx([r[key] for r in history], rel=1e-6), tag
    assert scalars["train/kd"][0][1] == pytest.approx(history[-1]["train_kd"], rel=1e-6)


def test_only_the_main_process_writes(tmp_path: Path) -> None:
    trainer = SimpleNamespace(dist=SimpleNamespace(is_main=False),
                              stages=[SimpleNamespace(train=TrainConfig(epochs=1))])
    stage = StageEvent(trainer, 0, 1, "ce", 1, 1)
    logger = TensorBoardLogger(tmp_path / "tb")
    logger.on_epoch_end(EpochEvent(stage, 0, {"epoch": 1, "train_loss": 1.0}))  # type: ignore[typeddict-item]
    logger.on_stage_end(stage)
    assert not (tmp_path / "tb").exists()
