"""Hinton distillation in your own PyTorch training loop: no Trainer, only three pieces of distillery.

    python examples/own_loop_hinton.py            # 10,000 examples, 8 epochs
    python examples/own_loop_hinton.py --tiny     # a smoke run: 512 examples, 2 epochs

- :class:`distillery.Teacher` wraps the trained teacher: always in eval mode, run without grad,
  never optimised (it is not an ``nn.Module``, so it cannot end up in an optimiser by accident);
- :func:`distillery.create_method` builds the loss: for ``"hinton"``,
  L = ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T));
- :func:`distillery.run_student` is the student's forward pass, with the features of any layers
  the method reads (none for Hinton's loss; FitNets and FSP read some).

Everything else is plain PyTorch: a ``TensorDataset``, a ``DataLoader``, an optimiser. The data is
made up here (16-feature vectors from ten overlapping Gaussian clusters); put your own loader in
its place. The teacher, a wide MLP, is trained first with cross-entropy; the student, a narrow
one, then learns from it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from distillery import Teacher, create_method, run_student

FEATURES, CLASSES = 16, 10


@dataclass(frozen=True)
class Outcome:
    """The teacher's and the distilled student's test accuracy (fractions), and each distillation
    epoch's mean loss terms ({"ce": ..., "kd": ...}, already weighted)."""

    teacher_accuracy: float
    student_accuracy: float
    epoch_terms: list[dict[str, float]]


def clusters(n: int, seed: int) -> TensorDataset:
    """``n`` vectors: class k is centred on a fixed random point (the same for every seed), plus noise."""
    centres = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    inputs = centres[labels] + 1.5 * torch.randn(n, FEATURES, generator=generator)
    return TensorDataset(inputs, labels)


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, CLASSES))


def train_teacher(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    """Plain cross-entropy training: the teacher is an ordinary network, trained the ordinary way."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def distil(student: nn.Module, teacher: Teacher, loader: DataLoader, epochs: int) -> list[dict[str, float]]:
    """Hinton distillation; returns each epoch's mean of every loss term."""
    method = create_method("hinton", temperature=4.0, kd_weight=0.5, ce_weight=0.5)
    example_inputs = next(iter(loader))[0]
    method.setup(student, teacher, example_inputs)  # checks the pair: here, that both output 10 classes
    # method.parameters() holds a method's learnable parts (FitNets' regressor); Hinton's loss has none.
    optimizer = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.05, momentum=0.9)
    history = []
    for _ in range(epochs):
        student.train()
        sums: dict[str, float] = {}
        for x, y in loader:
            terms = method(run_student(student, x, method.student_layers), method.teacher_outputs(teacher, x), y)
            loss = sum(terms.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.item() * len(y)
        history.append({name: total / len(loader.dataset) for name, total in sums.items()})
    return history


@torch.no_grad()
def accuracy(model: nn.Module | Teacher, loader: DataLoader) -> float:
    """Top-1 accuracy; a :class:`Teacher` is called like the network and returns its outputs."""
    if isinstance(model, nn.Module):
        model.eval()
    hits = 0
    for x, y in loader:
        logits = model(x).logits if isinstance(model, Teacher) else model(x)
        hits += int((logits.argmax(-1) == y).sum())
    return hits / len(loader.dataset)


def main(argv: list[str] | None = None) -> Outcome:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smoke run: few examples and epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_train, epochs = (512, 2) if args.tiny else (10_000, 8)

    torch.manual_seed(args.seed)
    train = DataLoader(clusters(n_train, seed=args.seed), batch_size=64, shuffle=True)
    test = DataLoader(clusters(2_000, seed=10_000 + args.seed), batch_size=500)

    network = mlp(hidden=256)
    train_teacher(network, train, epochs)
    teacher = Teacher(network)  # frozen from here on: eval mode, requires_grad False

    student = mlp(hidden=16)
    epoch_terms = distil(student, teacher, train, epochs)
    outcome = Outcome(accuracy(teacher, test), accuracy(student, test), epoch_terms)
    for epoch, terms in enumerate(epoch_terms, start=1):
        print(f"epoch {epoch}: " + "  ".join(f"{name} {value:.4f}" for name, value in terms.items()))
    print(f"teacher test accuracy {100 * outcome.teacher_accuracy:.2f} %, "
          f"distilled student {100 * outcome.student_accuracy:.2f} %")
    return outcome


if __name__ == "__main__":
    main()
