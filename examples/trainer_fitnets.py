"""FitNets with the Trainer: two stages (hints, then Hinton KD), checkpoints, metrics and TensorBoard.

    python examples/trainer_fitnets.py                 # 4,000 images; 6 teacher epochs, 2 + 6 student epochs
    python examples/trainer_fitnets.py --tiny          # a smoke run: 256 images, one epoch per stage
    python examples/trainer_fitnets.py --resume        # continue an interrupted run from its checkpoint
    tensorboard --logdir runs/examples/trainer_fitnets # the curves of both networks

A :class:`distillery.Trainer` trains a network through a list of :class:`distillery.Stage`\\ s, each
a method (``create_method``) with its own :class:`distillery.TrainConfig` (epochs, batch size,
optimiser, schedule, augmentation). FitNets (Romero et al. 2015) is two stages:

1. ``fitnets``: a 1×1-convolution regressor r takes the student's ``stage2`` maps to the teacher's
   ``stage2`` maps, and r with the student's first layers minimise ½·mean (u_teacher − r(v_student))²;
2. ``hinton``: the whole student learns from the teacher's T-softened probabilities and the labels.

The teacher (a ResNet-14) is trained first by the same Trainer with one ``ce`` stage. Each network
writes ``checkpoint.pt`` (written after every epoch; ``fit(resume=True)`` continues from it) and
``metrics.jsonl`` in its run folder, and its curves with :class:`TensorBoardLogger`. The images are
made up here (a fixed random pattern per class, plus noise); see examples/image_folder.py for yours.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from distillery import (
    EpochRecord,
    OptimizerConfig,
    ScheduleConfig,
    Stage,
    Teacher,
    TrainConfig,
    Trainer,
    create_method,
    create_model,
)
from distillery.data import InMemoryDataset, Normalisation
from distillery.train.tensorboard import TensorBoardLogger

SIZE, CLASSES = 16, 10


@dataclass(frozen=True)
class Outcome:
    """Each network's history (one :class:`EpochRecord` per epoch) and its run folder."""

    teacher: list[EpochRecord]
    student: list[EpochRecord]
    teacher_dir: Path
    student_dir: Path


def patterns(n: int, seed: int) -> InMemoryDataset:
    """``n`` uint8 1×16×16 images: 30 % a fixed random pattern of their class, 70 % noise."""
    templates = torch.rand(CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(99))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    images = 0.3 * templates[labels] + 0.7 * torch.rand(n, 1, SIZE, SIZE, generator=generator)
    images = (255 * images).to(torch.uint8)
    return InMemoryDataset(images, labels, Normalisation.of_data(images), num_classes=CLASSES)


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: few images, one epoch per stage")
    parser.add_argument("--out", type=Path, default=Path("runs/examples/trainer_fitnets"), help="run folders")
    parser.add_argument("--resume", action="store_true", help="continue unfinished runs from their checkpoints")
    args = parser.parse_args(argv)
    n_train, teacher_epochs, hint_epochs, kd_epochs = (256, 1, 1, 1) if args.tiny else (4_000, 6, 2, 6)
    train_data, test_data = patterns(n_train, seed=1), patterns(n_train // 4, seed=2)

    # --- the teacher: one stage of plain cross-entropy
    torch.manual_seed(0)
    network = create_model("resnet14", in_channels=1, num_classes=CLASSES, input_size=SIZE)
    sgd = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
    teacher_training = TrainConfig(epochs=teacher_epochs, batch_size=64, optimizer=sgd,
                                   schedule=ScheduleConfig(name="cosine"))
    teacher_dir = args.out / "teacher"
    teacher_history = Trainer(network, train_data, test_data, [Stage(create_method("ce"), teacher_training)],
                              run_dir=teacher_dir, label="teacher",
                              callbacks=[TensorBoardLogger(teacher_dir / "tensorboard")]).fit(resume=args.resume)

    # --- the student: FitNets hints (AdamW, as the feature methods' stage 1 usually is), then Hinton KD
    torch.manual_seed(0)
    student = create_model("resnet8", in_channels=1, num_classes=CLASSES, input_size=SIZE)
    hints = Stage(create_method("fitnets", student_layer="stage2", teacher_layer="stage2"),
                  TrainConfig(epochs=hint_epochs, batch_size=64,
                              optimizer=OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0)))
    kd = Stage(create_method("hinton", temperature=3.0, kd_weight=0.9, ce_weight=0.1),
               TrainConfig(epochs=kd_epochs, batch_size=64, optimizer=sgd, schedule=ScheduleConfig(name="cosine")))
    student_dir = args.out / "student_fitnets"
    student_history = Trainer(student, train_data, test_data, [hints, kd], teacher=Teacher(network),
                              run_dir=student_dir, label="student",
                              callbacks=[TensorBoardLogger(student_dir / "tensorboard")]).fit(resume=args.resume)

    for name, history in (("teacher", teacher_history), ("student", student_history)):
        last = history[-1]
        print(f"{name}: test accuracy {100 * last['test_accuracy']:.2f} % after {len(history)} epochs")
    print(f"run folders: {teacher_dir}, {student_dir}")
    return Outcome(teacher_history, student_history, teacher_dir, student_dir)


if __name__ == "__main__":
    main()
