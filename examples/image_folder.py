"""Your own images: a folder with one subfolder per class, loaded by distillery and used with the Trainer.

    python examples/image_folder.py --folder PATH/TO/IMAGES        # your folder: PATH/TO/IMAGES/<class>/*.png|jpg|...
    python examples/image_folder.py --folder train/ --test test/   # separate test images (same class folders)
    python examples/image_folder.py --demo                         # makes a small folder of drawn shapes first
    python examples/image_folder.py --demo --tiny                  # a smoke run

The folder is read by :func:`distillery.data.sources.load_data` from an
:class:`~distillery.data.sources.ImageFolderSource` — the same source a recipe's ``data:`` section
describes with ``source: image_folder``. The sorted subfolder names are the classes (label ids
0, 1, ... in that order, kept as ``class_names``); every image is converted to the Pillow mode
(``RGB`` or ``L``) and resized to ``--size``, and held as uint8 N×C×H×W; nothing else is done to
the pixels. The network sees (x/255 − mean_c) / std_c, with the per-channel statistics of the
training images. Without ``--test``, ``--test-fraction`` of each class is held out as the test set.
The decoded images are kept in a cache file (default ``~/.cache/distillery/images``), so the next
run does not decode them again.

A small CNN teacher is trained on the images (with random crops and flips), then an MLP student
is distilled from it with Hinton's loss.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from distillery import (
    AugmentConfig,
    EpochRecord,
    OptimizerConfig,
    Stage,
    Teacher,
    TrainConfig,
    Trainer,
    create_method,
    create_model,
)
from distillery.data import InMemoryDataset
from distillery.data.sources import ImageFolderSource, load_data

DEMO_CLASSES = ("disc", "square", "stripes")


@dataclass(frozen=True)
class Outcome:
    """The datasets as loaded (``class_names`` in label order) and each network's history."""

    train_data: InMemoryDataset
    test_data: InMemoryDataset
    teacher: list[EpochRecord]
    student: list[EpochRecord]


def make_demo_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """Write ``per_class`` 32×32 PNGs of each class in ``DEMO_CLASSES`` (random colours, sizes and places)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for name in DEMO_CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (32, 32), tuple(rng.randrange(0, 100) for _ in range(3)))
            draw = ImageDraw.Draw(image)
            colour = tuple(rng.randrange(120, 256) for _ in range(3))
            x, y, r = rng.randrange(8, 24), rng.randrange(8, 24), rng.randrange(4, 8)
            if name == "disc":
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
            elif name == "square":
                draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
            else:
                for row in range(rng.randrange(0, 4), 32, 6):
                    draw.line((0, row, 31, row), fill=colour, width=2)
            image.save(root / name / f"{i:03d}.png")
    return root


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--folder", type=Path, help="training images: one subfolder per class")
    where.add_argument("--demo", action="store_true", help="make a small folder of drawn shapes in a temporary folder")
    parser.add_argument("--test", type=Path, help="test images, with the same class subfolders (default: held out)")
    parser.add_argument("--test-fraction", type=float, default=0.25, help="held out of each class without --test")
    parser.add_argument("--size", type=int, default=16, help="resize every image to size×size (a multiple of 4)")
    parser.add_argument("--mode", choices=("RGB", "L"), default="RGB", help="3 colour channels or 1 grey one")
    parser.add_argument("--cache-dir", help="folder of the decoded-image cache (default ~/.cache/distillery/images)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a smoke run: 12 demo images per class, one epoch")
    return parser.parse_args(argv)


def train_on(train_data: InMemoryDataset, test_data: InMemoryDataset,
             epochs: int) -> tuple[list[EpochRecord], list[EpochRecord]]:
    """A CNN teacher (cross-entropy, random crops and flips), then an MLP student distilled from it."""
    shape = dict(in_channels=train_data.in_channels, num_classes=train_data.num_classes,
                 input_size=train_data.input_size)
    torch.manual_seed(0)
    network = create_model("cnn", width=8, fc_width=64, **shape)
    augmented = TrainConfig(epochs=epochs, batch_size=32, optimizer=OptimizerConfig(lr=0.05),
                            augment=AugmentConfig(crop_padding=2, hflip=True))
    teacher = Trainer(network, train_data, test_data, [Stage(create_method("ce"), augmented)], label="teacher").fit()
    student_network = create_model("mlp", hidden=[64], **shape)
    hinton = Stage(create_method("hinton", temperature=4.0, kd_weight=0.5, ce_weight=0.5),
                   TrainConfig(epochs=epochs, batch_size=32, optimizer=OptimizerConfig(lr=0.05)))
    student = Trainer(student_network, train_data, test_data, [hinton], teacher=Teacher(network),
                      label="student").fit()
    return teacher, student


def main(argv: list[str] | None = None) -> Outcome:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = make_demo_folder(Path(scratch) / "shapes", 12 if args.tiny else 80) if args.demo else args.folder
        test_split = {"test": str(args.test)} if args.test else {"test_fraction": args.test_fraction}
        source = ImageFolderSource(source="image_folder", train=str(folder), size=args.size, mode=args.mode,
                                   cache=not args.demo, cache_dir=args.cache_dir, **test_split)
        train_data, test_data = load_data(source, seed=0)
    print(f"classes {', '.join(train_data.class_names)}; train {train_data}; test {len(test_data)} images")
    teacher, student = train_on(train_data, test_data, 1 if args.tiny else args.epochs)
    print(f"teacher test accuracy {100 * teacher[-1]['test_accuracy']:.2f} %, "
          f"distilled student {100 * student[-1]['test_accuracy']:.2f} %")
    return Outcome(train_data, test_data, teacher, student)


if __name__ == "__main__":
    main()
