"""Logit losses of the second round (logit standardisation, DKD, DIST, CTKD's temperature) against
their formulas, their identities and autograd."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distillery import losses


def _logits(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _targets(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ logit standardisation


def test_standardize_logits_is_the_z_score_of_each_row() -> None:
    z = _logits(4, 6)
    mean = z.sum(dim=1, keepdim=True) / 6
    std = ((z - mean) ** 2).sum(dim=1, keepdim=True).div(6 - 1).sqrt()  # sample std, divisor K − 1
    torch.testing.assert_close(losses.standardize_logits(z), (z - mean) / (std + 1e-7))
    out = losses.standardize_logits(z)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std(dim=1), torch.ones(4))
    assert out.shape == z.shape


def test_standardize_logits_ignores_shifts_and_positive_scales_of_each_row() -> None:
    z = _logits(5, 8)
    shift = _logits(5, 1, seed=1, scale=10.0)
    for scale in (0.05, 1.0, 7.0):
        torch.testing.assert_close(losses.standardize_logits(scale * z + shift), losses.standardize_logits(z),
                                   atol=1e-5, rtol=1e-5)
    # ...but not a negative scale: that reverses the order of the classes
    assert not torch.allclose(losses.standardize_logits(-z), losses.standardize_logits(z))


def test_standardize_logits_gradient_and_bad_input() -> None:
    z = _logits(3, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(losses.standardize_logits, (z,))
    assert torch.isfinite(losses.standardize_logits(torch.ones(2, 4))).all()  # equal logits: zeros, not nan
    with pytest.raises(ValueError, match="at least 2 classes"):
        losses.standardize_logits(torch.zeros(3, 1))


# ------------------------------------------------------------------ DKD


def _binary_kl_by_hand(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    ps, pt = F.softmax(zs / t, dim=1), F.softmax(zt / t, dim=1)
    bs = torch.stack([ps[range(len(y)), y], 1 - ps[range(len(y)), y]], dim=1)
    bt = torch.stack([pt[range(len(y)), y], 1 - pt[range(len(y)), y]], dim=1)
    return (bt * (bt.log() - bs.log())).sum(dim=1)


def _non_target_kl_by_hand(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, t: float) -> torch.Tensor:
    keep = torch.ones_like(zs, dtype=torch.bool)
    keep[range(len(y)), y] = False
    n, k = zs.shape
    qs = F.softmax(zs[keep].view(n, k - 1) / t, dim=1)
    qt = F.softmax(zt[keep].view(n, k - 1) / t, dim=1)
    return (qt * (qt.log() - qs.log())).sum(dim=1)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_tckd_and_nckd_match_their_formulas(t: float) -> None:
    zs, zt, y = _logits(6, 10), _logits(6, 10, seed=1), _targets(6, 10)
    torch.testing.assert_close(losses.tckd(zs, zt, y, t), _binary_kl_by_hand(zs, zt, y, t))
    torch.testing.assert_close(losses.nckd(zs, zt, y, t), _non_target_kl_by_hand(zs, zt, y, t))


@pytest.mark.parametrize("t", [0.5, 1.0, 4.0, 10.0])
def test_kd_splits_into_tckd_plus_teacher_non_target_mass_times_nckd(t: float) -> None:
    zs, zt, y = _logits(16, 12, seed=2), _logits(16, 12, seed=3), _targets(16, 12, seed=4)
    ps, pt = F.softmax(zs / t, dim=1), F.softmax(zt / t, dim=1)
    kd_per_example = (pt * (pt.log() - ps.log())).sum(dim=1)  # KL(p^T ‖ p^S), no T²
    teacher_target_prob = pt[range(16), y]
    split = losses.tckd(zs, zt, y, t) + (1 - teacher_target_prob) * losses.nckd(zs, zt, y, t)
    torch.testing.assert_close(split, kd_per_example, atol=1e-5, rtol=0)
    # the same identity with T² on every term is the batch-mean KD loss
    torch.testing.assert_close((split * t * t).mean(), losses.kd_loss(zs, zt, t), atol=1e-5, rtol=0)


def test_dkd_loss_weights_each_term_with_t_squared() -> None:
    zs, zt, y = _logits(8, 5), _logits(8, 5, seed=1), _targets(8, 5)
    terms = losses.dkd_loss(zs, zt, y, alpha=0.5, beta=8.0, temperature=4.0)
    torch.testing.assert_close(terms.tckd, 0.5 * 16 * _binary_kl_by_hand(zs, zt, y, 4.0).mean())
    torch.testing.assert_close(terms.nckd, 8.0 * 16 * _non_target_kl_by_hand(zs, zt, y, 4.0).mean())
    torch.testing.assert_close(terms.total(), terms.tckd + terms.nckd)
    same = losses.dkd_loss(zt, zt, y, alpha=1.0, beta=8.0, temperature=4.0)
    assert abs(same.total().item()) < 1e-6  # zero when the student equals the teacher


def test_dkd_gradient_is_exact_and_the_teacher_gets_none() -> None:
    zs = _logits(4, 6, dtype=torch.float64).requires_grad_()
    zt, y = _logits(4, 6, seed=1, dtype=torch.float64), _targets(4, 6)
    assert torch.autograd.gradcheck(lambda s: losses.dkd_loss(s, zt, y, 1.0, 8.0, 4.0).total(), (zs,))
    teacher = zt.clone().requires_grad_()
    losses.dkd_loss(zs, teacher, y, 1.0, 8.0, 4.0).total().backward()
    assert teacher.grad is None and zs.grad is not None


def test_dkd_edge_cases_are_finite_and_bad_shapes_are_named() -> None:
    y = _targets(8, 10)
    zs = (_logits(8, 10) * 1e4).requires_grad_()
    terms = losses.dkd_loss(zs, _logits(8, 10, seed=1) * 1e4, y, 1.0, 8.0, 1.0)
    terms.total().backward()
    assert torch.isfinite(terms.total()) and torch.isfinite(zs.grad).all()
    two = losses.nckd(_logits(3, 2), _logits(3, 2, seed=1), _targets(3, 2), 4.0)
    torch.testing.assert_close(two, torch.zeros(3))  # one non-target class: nothing to distribute
    with pytest.raises(ValueError, match=r"same N×K shape, got \(8, 10\) and \(8, 9\)"):
        losses.dkd_loss(zs, torch.zeros(8, 9), y, 1.0, 8.0, 4.0)
    with pytest.raises(ValueError, match=r"one target class per example: targets of shape \(7,\)"):
        losses.tckd(zs, zs, y[:7], 4.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        losses.nckd(zs, zs, y, 0.0)


def test_dkd_warmup_ramps_linearly_then_holds() -> None:
    assert losses.dkd_warmup_factor(0.0, 20) == 0.0
    assert losses.dkd_warmup_factor(5.0, 20) == pytest.approx(0.25)
    assert losses.dkd_warmup_factor(20.0, 20) == 1.0
    assert losses.dkd_warmup_factor(150.0, 20) == 1.0
    assert losses.dkd_warmup_factor(0.0, 0) == 1.0  # no warm-up
    with pytest.raises(ValueError, match="epoch_progress must be >= 0"):
        losses.dkd_warmup_factor(-1.0, 20)
    with pytest.raises(ValueError, match="warmup_epochs must be >= 0"):
        losses.dkd_warmup_factor(1.0, -20)


# ------------------------------------------------------------------ DIST


def _mean_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of Pearson's r, from torch.corrcoef of each pair of rows."""
    return torch.stack([torch.corrcoef(torch.stack([u, v]))[0, 1] for u, v in zip(a, b)]).mean()


def test_pearson_and_relations_match_corrcoef() -> None:
    ps, pt = F.softmax(_logits(6, 5), dim=1), F.softmax(_logits(6, 5, seed=1), dim=1)
    torch.testing.assert_close(losses.pearson_correlation(ps, pt),
                               torch.stack([torch.corrcoef(torch.stack([u, v]))[0, 1] for u, v in zip(ps, pt)]))
    torch.testing.assert_close(losses.inter_class_relation(ps, pt), 1 - _mean_correlation(ps, pt))
    torch.testing.assert_close(losses.intra_class_relation(ps, pt), 1 - _mean_correlation(ps.T, pt.T))


def test_relations_ignore_positive_affine_maps_of_the_probabilities() -> None:
    ps, pt = F.softmax(_logits(7, 4), dim=1), F.softmax(_logits(7, 4, seed=1), dim=1)
    for relation in (losses.inter_class_relation, losses.intra_class_relation):
        reference = relation(ps, pt)
        for a, b in ((3.0, 0.5), (0.2, -1.0)):
            torch.testing.assert_close(relation(a * ps + b, pt), reference, atol=1e-5, rtol=0)
            torch.testing.assert_close(relation(ps, a * pt + b), reference, atol=1e-5, rtol=0)
        # a negative scale flips the sign of the correlation
        torch.testing.assert_close(relation(-ps, pt), 2 - reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_dist_loss_is_t_squared_times_weighted_relations(t: float) -> None:
    zs, zt = _logits(8, 6), _logits(8, 6, seed=1)
    ps, pt = F.softmax(zs / t, dim=1), F.softmax(zt / t, dim=1)
    terms = losses.dist_loss(zs, zt, beta=2.0, gamma=0.5, temperature=t)
    torch.testing.assert_close(terms.inter, t * t * 2.0 * (1 - _mean_correlation(ps, pt)))
    torch.testing.assert_close(terms.intra, t * t * 0.5 * (1 - _mean_correlation(ps.T, pt.T)))
    torch.testing.assert_close(terms.total(), terms.inter + terms.intra)
    # zero for identical logits, up to float32 rounding of ρ ≈ 1 (which the T² factor scales up)
    for seed in range(20):
        z = _logits(8, 6, seed=seed)
        assert abs(losses.dist_loss(z, z, temperature=t).total().item()) < 1e-6 * t * t


def test_dist_gradient_is_exact_and_bad_shapes_are_named() -> None:
    zs = _logits(5, 4, dtype=torch.float64).requires_grad_()
    zt = _logits(5, 4, seed=1, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: losses.dist_loss(s, zt, 1.0, 1.0, 4.0).total(), (zs,))
    teacher = zt.clone().requires_grad_()
    losses.dist_loss(zs, teacher).total().backward()
    assert teacher.grad is None
    with pytest.raises(ValueError, match=r"same N×K shape, got \(5, 4\) and \(5, 3\)"):
        losses.dist_loss(zs, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="pearson_correlation needs two N×K tensors"):
        losses.pearson_correlation(torch.zeros(2, 3), torch.zeros(3, 2))


# ------------------------------------------------------------------ CTKD


@pytest.mark.parametrize("scale", [0.0, 0.3, 1.0, 2.5])
def test_gradient_reversal_passes_values_and_negates_the_scaled_gradient(scale: float) -> None:
    x = _logits(3, 4).requires_grad_()
    upstream = _logits(3, 4, seed=1)
    y = losses.gradient_reversal(x, scale)
    assert torch.equal(y, x.detach())
    (y * upstream).sum().backward()
    assert torch.equal(x.grad, -scale * upstream)


def test_ctkd_lambda_rises_by_half_cosine_then_holds() -> None:
    assert losses.ctkd_lambda(0.0) == pytest.approx(0.0, abs=1e-12)
    assert losses.ctkd_lambda(5.0) == pytest.approx(0.5)
    assert losses.ctkd_lambda(10.0) == pytest.approx(1.0)
    assert losses.ctkd_lambda(240.0) == pytest.approx(1.0)
    for e in (1.0, 2.5, 7.0):  # the formula, off the symmetric points
        assert losses.ctkd_lambda(e) == pytest.approx(0.5 * (1 + math.cos((1 + e / 10) * math.pi)))
    values = [losses.ctkd_lambda(e / 4, warm_epochs=10, lambda_max=2.0, lambda_min=0.5) for e in range(61)]
    assert values[0] == pytest.approx(0.5) and values[-1] == pytest.approx(2.0)
    assert all(a < b for a, b in zip(values[:41], values[1:41]))  # strictly rising over the warm epochs
    assert values[40:] == [values[40]] * 21  # then held
    assert losses.ctkd_lambda(0.0, warm_epochs=0) == 1.0
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        losses.ctkd_lambda(-0.5)
    with pytest.raises(ValueError, match="warm_epochs must be >= 0"):
        losses.ctkd_lambda(1.0, warm_epochs=-1)


def test_learnable_temperature_range_start_and_reversed_gradient() -> None:
    module = losses.LearnableTemperature()
    sigmoid_one = 1 / (1 + math.exp(-1))
    assert module(1.0).item() == pytest.approx(1 + 20 * sigmoid_one)  # θ = 1 at the start
    assert losses.LearnableTemperature(initial_temperature=4.0)(1.0).item() == pytest.approx(4.0)
    with torch.no_grad():
        for theta, bound in ((-60.0, 1.0), (60.0, 21.0)):
            module.theta.fill_(theta)
            assert module(1.0).item() == pytest.approx(bound)
        module.theta.fill_(0.3)
    # dτ/dθ = (τ_max − τ_min)·σ'(θ), reversed and scaled by λ
    (grad,) = torch.autograd.grad(module(0.4), module.theta)
    s = 1 / (1 + math.exp(-0.3))
    assert grad.item() == pytest.approx(-0.4 * 20 * s * (1 - s))
    # an optimiser step that minimises a loss of τ moves τ so that the loss grows
    optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
    before = (module(1.0) - 5.0) ** 2
    before.backward()
    optimiser.step()
    assert (module(1.0) - 5.0).pow(2).item() > before.item()


def test_learnable_temperature_rejects_bad_ranges() -> None:
    with pytest.raises(ValueError, match="need 0 < min_temperature < max_temperature"):
        losses.LearnableTemperature(min_temperature=5.0, max_temperature=2.0)
    with pytest.raises(ValueError, match="initial_temperature must lie strictly between 1.0 and 21.0, got 30"):
        losses.LearnableTemperature(initial_temperature=30)
