"""Fidelity (top-1 agreement, KL(teacher ‖ student)) against its formula, and the sanity checks."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_idx import tiny_dataset
from torch import nn

from distillery.fidelity import (
    chance_accuracy,
    collapse_warning,
    fidelity_from_logits,
    measure_fidelity,
    teacher_warning,
)
from distillery.teacher import Teacher


def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def kl_by_hand(teacher_probs: list[list[float]], student_logits: list[list[float]]) -> float:
    total = 0.0
    for p, z in zip(teacher_probs, student_logits):
        q = softmax(z)
        total += sum(pk * math.log(pk / qk) for pk, qk in zip(p, q) if pk > 0)
    return total / len(teacher_probs)


def test_agreement_and_kl_match_their_formulas() -> None:
    student = [[2.0, 0.0, -1.0], [0.1, 0.3, 0.2], [-1.0, 3.0, 0.0], [0.0, 0.0, 5.0]]
    teacher = [[1.0, 0.5, 0.0], [2.0, 0.0, 0.0], [0.0, 1.5, 0.3], [0.2, 0.1, 0.0]]
    f = fidelity_from_logits(torch.tensor(student), torch.tensor(teacher))
    # argmax student: 0, 1, 1, 2; teacher: 0, 0, 1, 0 -> two of four agree
    assert f.agreement == 0.5 and f.n == 4
    assert f.kl == pytest.approx(kl_by_hand([softmax(t) for t in teacher], student), rel=1e-6)


def test_an_ensemble_teacher_is_its_averaged_probabilities() -> None:
    members = torch.tensor([[[3.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 2.0]]])  # M=2, N=2, K=2
    student = [[0.5, 0.0], [0.0, 0.2]]
    averaged = [[(a + b) / 2 for a, b in zip(softmax(m0), softmax(m1))]
                for m0, m1 in zip(members[0].tolist(), members[1].tolist())]
    f = fidelity_from_logits(torch.tensor(student), members)
    assert f.kl == pytest.approx(kl_by_hand(averaged, student), rel=1e-6)
    assert f.agreement == 1.0  # averaged argmax: class 0 (0.62 vs 0.38), class 1


def test_a_copy_of_the_teacher_has_full_agreement_and_zero_kl_even_with_zero_probabilities() -> None:
    logits = torch.tensor([[0.0, -200.0, 4.0], [-300.0, 1.0, 0.0]])  # exp underflows to exact 0
    f = fidelity_from_logits(logits, logits)
    assert f.agreement == 1.0 and f.kl == pytest.approx(0.0, abs=1e-6)  # float32 rounding, no NaN from 0 · log 0


def test_class_counts_must_agree() -> None:
    with pytest.raises(ValueError, match="class by class"):
        fidelity_from_logits(torch.zeros(2, 3), torch.zeros(2, 4))


def test_measured_fidelity_over_batches_equals_the_one_batch_formula() -> None:
    torch.manual_seed(0)
    data = tiny_dataset(37)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    teacher_net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    student.train()
    measured = measure_fidelity(student, Teacher(teacher_net), data, batch_size=8)
    assert student.training  # the mode is restored
    inputs = (data.inputs.float() / 255 - 0.5) / 0.3  # the loader's normalisation of this dataset
    with torch.no_grad():
        expected = fidelity_from_logits(student(inputs), teacher_net(inputs))
    assert measured.n == 37
    assert measured.agreement == pytest.approx(expected.agreement)
    assert measured.kl == pytest.approx(expected.kl, rel=1e-5)


def test_teacher_warning_only_when_the_teacher_is_not_a_point_ahead() -> None:
    assert teacher_warning(0.92, 0.90, "the test split") is None
    message = teacher_warning(0.905, 0.90, "the test split")
    assert message is not None and "not clearly better" in message and "+0.50 points" in message
    assert "90.50 %" in message and "90.00 %" in message


def test_collapse_is_accuracy_within_five_points_of_the_majority_class() -> None:
    data = tiny_dataset(50)
    chance = chance_accuracy(data)
    assert chance == torch.bincount(data.labels).max().item() / 50
    assert collapse_warning("hinton (seed 0)", chance + 0.06, chance) is None
    message = collapse_warning("hinton (seed 0)", chance + 0.01, chance)
    assert message is not None and message.startswith("hinton (seed 0) collapsed")
