"""Loss functions against their formulas and against autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery import losses

torch.manual_seed(0)


def test_soften_matches_formula_and_limits() -> None:
    z = torch.tensor([[1.0, 2.0, 4.0]])
    for t in (0.5, 1.0, 3.0):
        expected = torch.exp(z / t) / torch.exp(z / t).sum()
        assert torch.allclose(losses.soften(z, t), expected)
    assert torch.allclose(losses.soften(z, 1e4), torch.full_like(z, 1 / 3), atol=1e-3)  # T→∞: uniform
    assert torch.allclose(losses.soften(z, 1e-3), torch.tensor([[0.0, 0.0, 1.0]]))  # T→0: one-hot argmax


def test_kd_loss_equals_t2_times_kl() -> None:
    zs, zt = torch.randn(5, 7), torch.randn(5, 7)
    t = 3.0
    qt, qs = F.softmax(zt / t, -1), F.softmax(zs / t, -1)
    expected = (qt * (qt.log() - qs.log())).sum(-1).mean() * t * t
    assert torch.allclose(losses.kd_loss(zs, zt, t), expected, atol=1e-6)
    assert losses.kd_loss(zt, zt, t).abs() < 1e-6  # zero when the student equals the teacher


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0, 20.0])
def test_kd_gradient_is_t_times_prob_difference(t: float) -> None:
    zs = torch.randn(4, 10, requires_grad=True)
    zt = torch.randn(4, 10)
    losses.kd_loss(zs, zt, t).backward()
    expected = t * (F.softmax(zs.detach() / t, -1) - F.softmax(zt / t, -1)) / zs.shape[0]
    assert torch.allclose(zs.grad, expected, atol=1e-6)


def test_kd_gradient_approaches_logit_matching_at_high_temperature() -> None:
    k = 10
    zs = torch.randn(3, k)
    zt = torch.randn(3, k)
    zs, zt = zs - zs.mean(-1, keepdim=True), zt - zt.mean(-1, keepdim=True)  # zero-mean logits
    zs.requires_grad_(True)
    losses.kd_loss(zs, zt, 1000.0).backward()
    kd_grad = zs.grad.clone()
    zs.grad = None
    losses.logit_matching_loss(zs, zt).backward()
    lm_grad = zs.grad
    assert torch.allclose(kd_grad, lm_grad, rtol=1e-2, atol=1e-5)  # same scale: no factor K between them
    # ...and not at a low temperature
    zs.grad = None
    losses.kd_loss(zs, zt, 1.0).backward()
    assert not torch.allclose(zs.grad, lm_grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("t", [0.5, 1.0, 10.0, 100.0])
def test_no_nan_or_inf_for_extreme_logits(t: float) -> None:
    zs = (torch.randn(8, 10) * 1e4).requires_grad_(True)
    zt = torch.randn(8, 10) * 1e4
    y = torch.randint(0, 10, (8,))
    loss = losses.hinton_loss(zs, zt, y, t, kd_weight=0.7, ce_weight=0.3)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(zs.grad).all()


def test_hinton_loss_weights_are_explicit() -> None:
    zs, zt = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.randint(0, 5, (6,))
    ce = F.cross_entropy(zs, y)
    kd = losses.kd_loss(zs, zt, 2.0)
    assert torch.allclose(losses.hinton_loss(zs, zt, y, 2.0, kd_weight=0.25, ce_weight=0.5), 0.5 * ce + 0.25 * kd)
    assert torch.allclose(losses.hinton_loss(zs, zt, y, 2.0, kd_weight=1.0, ce_weight=0.0), kd)


def test_teacher_gets_no_gradient() -> None:
    zs = torch.randn(2, 4, requires_grad=True)
    zt = torch.randn(2, 4, requires_grad=True)
    losses.kd_loss(zs, zt, 2.0).backward()
    assert zt.grad is None


def test_soft_target_loss_with_zero_targets_is_finite_and_matches_kd() -> None:
    zs = torch.randn(3, 4)
    onehot = F.one_hot(torch.tensor([0, 1, 2]), 4).float()
    value = losses.soft_target_loss(zs, onehot, 1.0)
    assert torch.allclose(value, F.cross_entropy(zs, torch.tensor([0, 1, 2])))  # KL to one-hot = CE
    zt = torch.randn(3, 4)
    assert torch.allclose(losses.soft_target_loss(zs, F.softmax(zt / 2, -1), 2.0), losses.kd_loss(zs, zt, 2.0),
                          atol=1e-6)


def test_temperature_must_be_positive() -> None:
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


def test_label_smoothing_and_virtual_teacher() -> None:
    y = torch.tensor([2, 0])
    smooth = losses.label_smoothing_targets(y, 4, 0.2)
    assert torch.allclose(smooth.sum(-1), torch.ones(2))
    assert math.isclose(smooth[0, 2].item(), 0.8 + 0.05, rel_tol=1e-6)
    virtual = losses.virtual_teacher_probs(y, 5, 0.9)
    assert torch.allclose(virtual.sum(-1), torch.ones(2))
    assert virtual[0, 2].item() == pytest.approx(0.9)
    assert virtual[0, 0].item() == pytest.approx(0.1 / 4)


def test_fsp_matrix_max_pools_the_larger_map() -> None:
    f1, f2 = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 4, 4)
    assert torch.allclose(losses.fsp_matrix(f1, f2), losses.fsp_matrix(F.max_pool2d(f1, 2), f2))
    with pytest.raises(ValueError, match="multiple"):
        losses.fsp_matrix(torch.randn(1, 2, 7, 7), f2)


def test_fsp_loss_is_weighted_squared_frobenius_norm() -> None:
    gs = [torch.randn(4, 3, 5), torch.randn(4, 2, 2)]
    gt = [torch.randn(4, 3, 5), torch.randn(4, 2, 2)]
    expected = sum(lam * ((t - s) ** 2).sum(dim=(1, 2)).mean() for lam, s, t in zip((0.5, 2.0), gs, gt))
    assert torch.allclose(losses.fsp_loss(gs, gt, [0.5, 2.0]), expected)
    with pytest.raises(ValueError, match="one weight per pair"):
        losses.fsp_loss(gs, gt, [1.0])


def test_logit_matching_and_hint_loss_gradients() -> None:
    zs = torch.randn(3, 4, requires_grad=True)
    zt = torch.randn(3, 4)
    loss = losses.logit_matching_loss(zs, zt)
    assert torch.allclose(loss, 0.5 * ((zs - zt) ** 2).sum() / (3 * 4))  # ½ · mean over 3 examples, 4 classes
    loss.backward()
    assert torch.allclose(zs.grad, (zs.detach() - zt) / (3 * 4))
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 3, 4, 4)
    loss = losses.hint_loss(fs, ft)
    assert torch.allclose(loss, 0.5 * ((fs - ft) ** 2).sum() / (2 * 3 * 4 * 4))  # ½ · mean over examples, elements
    loss.backward()
    assert torch.allclose(fs.grad, (fs.detach() - ft) / (2 * 3 * 4 * 4))
    with pytest.raises(ValueError, match="hint shapes differ"):
        losses.hint_loss(fs, torch.randn(2, 4, 4, 4))


@pytest.mark.parametrize("shape", [(3, 7), (3, 2, 5), (3, 2, 4, 4), (3, 2, 2, 3, 4)])
def test_hint_loss_is_half_the_mean_square_for_hints_of_any_rank(shape: tuple[int, ...]) -> None:
    fs = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(*shape, dtype=torch.float64)
    per_example = [0.5 * ((fs[i] - ft[i]) ** 2).sum() / fs[i].numel() for i in range(shape[0])]
    torch.testing.assert_close(losses.hint_loss(fs, ft), sum(per_example) / shape[0])
    assert torch.autograd.gradcheck(lambda s: losses.hint_loss(s, ft), (fs,))


def test_hint_loss_does_not_grow_with_the_hint_layers_width() -> None:
    narrow_s, narrow_t = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)
    # the same per-element differences repeated over 4× the channels and 4× the positions
    wide_s = narrow_s.repeat(1, 4, 2, 2)
    wide_t = narrow_t.repeat(1, 4, 2, 2)
    torch.testing.assert_close(losses.hint_loss(wide_s, wide_t), losses.hint_loss(narrow_s, narrow_t))
