"""The DKD and DIST method classes, built directly (not yet in the registry): their terms against the
loss functions, DKD's warm-up, parameter checks, the class-count check and a few training steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from distillery.losses import dist_loss, dkd_loss
from distillery.methods import ModelOutputs, Teacher, run_student
from distillery.methods.dist import DIST, DISTParams
from distillery.methods.dkd import DKD, DKDParams
from distillery.models import create_model


def _outputs(n: int = 8, k: int = 10, seed: int = 0) -> tuple[ModelOutputs, ModelOutputs, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = ModelOutputs(torch.randn(n, k, generator=g))
    teacher = ModelOutputs(3 * torch.randn(n, k, generator=g))
    return student, teacher, torch.randint(0, k, (n,), generator=g)


def _mlp(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("mlp", in_channels=1, num_classes=num_classes, input_size=8, hidden=[16])


def test_dkd_terms_are_the_weighted_loss_terms_ramped_by_the_warm_up() -> None:
    student, teacher, y = _outputs()
    method = DKD(DKDParams(alpha=0.5, beta=4.0, temperature=2.0, warmup_epochs=20, ce_weight=0.7))
    expected = dkd_loss(student.logits, teacher.logits, y, alpha=0.5, beta=4.0, temperature=2.0)
    for progress, ramp in ((5.0, 0.25), (19.5, 0.975), (20.0, 1.0), (90.0, 1.0)):
        method.epoch_progress = progress
        terms = method(student, teacher, y)
        assert terms.keys() == {"ce", "tckd", "nckd"}
        torch.testing.assert_close(terms["ce"], 0.7 * F.cross_entropy(student.logits, y))
        torch.testing.assert_close(terms["tckd"], ramp * expected.tckd)
        torch.testing.assert_close(terms["nckd"], ramp * expected.nckd)


def test_dkd_without_progress_is_an_error_unless_there_is_no_warm_up() -> None:
    student, teacher, y = _outputs()
    with pytest.raises(ValueError, match=r"warmup_epochs=20\.0 .*method\.epoch_progress is not set"):
        DKD()(student, teacher, y)
    terms = DKD(DKDParams(warmup_epochs=0))(student, teacher, y)
    expected = dkd_loss(student.logits, teacher.logits, y, alpha=1.0, beta=8.0, temperature=4.0)
    torch.testing.assert_close(terms["nckd"], expected.nckd)
    with pytest.raises(ValueError, match="dkd needs the teacher's outputs"):
        DKD(DKDParams(warmup_epochs=0))(student, None, y)


def test_dist_terms_are_the_weighted_relations_plus_cross_entropy() -> None:
    student, teacher, y = _outputs()
    terms = DIST(DISTParams(beta=2.0, gamma=0.5, temperature=4.0, ce_weight=0.3))(student, teacher, y)
    expected = dist_loss(student.logits, teacher.logits, beta=2.0, gamma=0.5, temperature=4.0)
    assert terms.keys() == {"ce", "inter_class", "intra_class"}
    torch.testing.assert_close(terms["ce"], 0.3 * F.cross_entropy(student.logits, y))
    torch.testing.assert_close(terms["inter_class"], expected.inter)
    torch.testing.assert_close(terms["intra_class"], expected.intra)
    with pytest.raises(ValueError, match="dist needs the teacher's outputs"):
        DIST()(student, None, y)


def test_parameters_are_checked() -> None:
    assert DKDParams() == DKDParams(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20, ce_weight=1.0)
    assert DISTParams() == DISTParams(beta=1.0, gamma=1.0, temperature=1.0, ce_weight=1.0)
    with pytest.raises(ValidationError, match="temperature"):
        DKDParams(temperature=0)
    with pytest.raises(ValidationError, match="beta"):
        DISTParams(beta=-1)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DKDParams(warmup=5)


@pytest.mark.parametrize("method", [DKD(DKDParams(warmup_epochs=0)), DIST()])
def test_the_teacher_must_have_the_students_classes(method: DKD | DIST) -> None:
    example = torch.randn(4, 1, 8, 8)
    method.setup(_mlp(10), Teacher(_mlp(10, seed=1)), example)
    with pytest.raises(ValueError, match=f"method '{method.name}' compares logits.*teacher outputs 7 classes"):
        method.setup(_mlp(10), Teacher(_mlp(7, seed=1)), example)


@pytest.mark.parametrize("method", [DKD(DKDParams(ce_weight=0.0, warmup_epochs=2)),
                                    DIST(DISTParams(ce_weight=0.0))])
def test_a_few_steps_bring_the_student_towards_the_teacher(method: DKD | DIST) -> None:
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    student, teacher = _mlp(10), Teacher(_mlp(10, seed=1))
    method.setup(student, teacher, inputs)
    optimiser = torch.optim.Adam(student.parameters(), lr=1e-2)
    totals = []
    for step in range(30):
        method.epoch_progress = 2.0 + step / 30  # past DKD's warm-up: the loss's own scale
        terms = method(run_student(student, inputs), method.teacher_outputs(teacher, inputs), targets)
        loss = sum(terms.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        totals.append(loss.item())
    assert totals[-1] < 0.5 * totals[0]
