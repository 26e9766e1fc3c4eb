"""Your own model and your own data: a 1-D convolutional network on signals, distilled with FSP or Hinton KD.

    python examples/signals_1d.py                   # FSP (stage 1) then cross-entropy (stage 2)
    python examples/signals_1d.py --method hinton   # one stage of Hinton KD instead
    python examples/signals_1d.py --tiny            # a smoke run: few signals, one epoch per stage

Nothing here is an image. The data is any map-style ``torch.utils.data.Dataset`` of
(input, label) pairs — here a ``TensorDataset`` of 2-channel signals of 64 samples, float32, made
up below (a noisy sine and square wave whose frequency is the class).
:func:`distillery.data.from_torch_dataset` holds it in memory as it is: every input keeps its
shape (2×64), dtype and values; only the per-channel mean and standard deviation are measured, and
the network sees (x − mean_c) / std_c. (``InMemoryDataset(inputs, labels, normalisation,
num_classes)`` takes tensors directly.)

Any ``nn.Module`` can be the teacher or the student; the methods tap its layers by module name.
FSP (Yim et al. 2017) matches, between the two networks, the Gram-like matrices
G_ij = Σ_positions F1[i]·F2[j] / positions of pairs of layers — ``(stem, block1)`` and
``(block1, block2)`` here — which works on 1-D maps as on 2-D ones, and needs the paired layers of
teacher and student to have the same channel counts (the teacher is deeper, not wider).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from distillery import EpochRecord, OptimizerConfig, Stage, Teacher, TrainConfig, Trainer, create_method
from distillery.data import InMemoryDataset, from_torch_dataset

CHANNELS, LENGTH, CLASSES = 2, 64, 6


@dataclass(frozen=True)
class Outcome:
    """The training set as distillery holds it, and each network's history (one record per epoch)."""

    train_data: InMemoryDataset
    teacher: list[EpochRecord]
    student: list[EpochRecord]


def signals(n: int, seed: int) -> TensorDataset:
    """``n`` float32 2×64 signals: a sine and a square wave of ``class + 2`` cycles, random phase, noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    cycles = (labels + 2).float()[:, None]
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator)
    t = torch.linspace(0, 1, LENGTH)[None, :]
    wave = torch.sin(2 * math.pi * cycles * t + phase)
    inputs = torch.stack([wave, torch.sign(wave)], dim=1) + 1.0 * torch.randn(n, CHANNELS, LENGTH, generator=generator)
    return TensorDataset(inputs, labels)


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, 5, stride=stride, padding=2, bias=False), nn.BatchNorm1d(c_out),
                         nn.ReLU())


class SignalNet(nn.Module):
    """stem → block1 (``depth`` layers, ``width`` channels) → block2 (2·width channels, half the length) → head."""

    def __init__(self, width: int = 16, depth: int = 1) -> None:
        super().__init__()
        self.stem = conv_bn_relu(CHANNELS, width)
        self.block1 = nn.Sequential(*(conv_bn_relu(width, width) for _ in range(depth)))
        self.block2 = nn.Sequential(conv_bn_relu(width, 2 * width, stride=2),
                                    *(conv_bn_relu(2 * width, 2 * width) for _ in range(depth - 1)))
        self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * width, CLASSES))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block2(self.block1(self.stem(x))))


def student_stages(method: str, epochs: int, sgd: TrainConfig) -> list[Stage]:
    """FSP: stage 1 the matrices (AdamW: the FSP loss's scale depends on the networks), stage 2 the
    labels alone, as in the paper. Hinton: one stage, soft targets and labels."""
    if method == "hinton":
        return [Stage(create_method("hinton", temperature=4.0, kd_weight=0.5, ce_weight=0.5), sgd)]
    fsp = create_method("fsp", pairs=[("stem", "block1"), ("block1", "block2")])
    adamw = TrainConfig(epochs=epochs, batch_size=sgd.batch_size,
                        optimizer=OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.0))
    return [Stage(fsp, adamw), Stage(create_method("ce"), sgd)]


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("fsp", "hinton"), default="fsp")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: few signals, one epoch per stage")
    args = parser.parse_args(argv)
    n_train, epochs = (192, 1) if args.tiny else (4_000, 5)

    # a torch Dataset of your own, held in memory as given (float32 2×64 stays float32 2×64)
    train_data = from_torch_dataset(signals(n_train, seed=1), num_classes=CLASSES)
    test_data = from_torch_dataset(signals(n_train // 4, seed=2), num_classes=CLASSES,
                                   normalisation=train_data.normalisation)  # the training set's statistics
    print(f"train: {train_data}")

    sgd = TrainConfig(epochs=epochs, batch_size=64, optimizer=OptimizerConfig(lr=0.05))
    torch.manual_seed(0)
    network = SignalNet(width=16, depth=3)
    teacher_history = Trainer(network, train_data, test_data, [Stage(create_method("ce"), sgd)],
                              label="teacher").fit()

    torch.manual_seed(0)
    student = SignalNet(width=16, depth=1)
    student_history = Trainer(student, train_data, test_data, student_stages(args.method, epochs, sgd),
                              teacher=Teacher(network), label=f"student ({args.method})").fit()

    print(f"teacher test accuracy {100 * teacher_history[-1]['test_accuracy']:.2f} %, student distilled with "
          f"{args.method} {100 * student_history[-1]['test_accuracy']:.2f} %")
    return Outcome(train_data, teacher_history, student_history)


if __name__ == "__main__":
    main()
