"""Pure loss functions, one per formula.

Every function here takes tensors and returns a tensor (or a small frozen dataclass of weighted
terms); none holds state, knows about models or reads a config. The one module, CTKD's
:class:`LearnableTemperature`, holds a single learnable scalar. Methods (``distillery.methods``)
combine them; users may call them directly from their own training loops.

Weight convention used throughout distillery (Hinton et al. 2015, with both weights explicit):

    L = ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(q_t(T) ‖ q_s(T))

``kd_weight`` weights the soft (teacher) term, ``ce_weight`` the hard-label term. Hinton's α is
``kd_weight`` with ``ce_weight = 1 − α``; the "α·CE + distillation" convention some codebases use
is just the other assignment. Neither weight is implied by the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "soften",
    "log_soften",
    "kd_loss",
    "soft_target_loss",
    "ensemble_probs",
    "hinton_loss",
    "logit_matching_loss",
    "label_smoothing_targets",
    "virtual_teacher_probs",
    "standardize_logits",
    "tckd",
    "nckd",
    "DKDTerms",
    "dkd_loss",
    "dkd_warmup_factor",
    "pearson_correlation",
    "inter_class_relation",
    "intra_class_relation",
    "DISTTerms",
    "dist_loss",
    "gradient_reversal",
    "ctkd_lambda",
    "LearnableTemperature",
    "hint_loss",
    "fsp_matrix",
    "fsp_loss",
    "pool_to_common_size",
]


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def soften(logits: Tensor, temperature: float) -> Tensor:
    """Softened softmax q_i(T) = exp(z_i/T) / Σ_j exp(z_j/T) over the last dimension.

    T = 1 is the ordinary softmax; T → ∞ tends to uniform, T → 0 to the one-hot argmax.
    Computed in float32 (or wider) and by subtracting the max, so logits of ±1e4 are safe.
    """
    _check_temperature(temperature)
    return torch.softmax(logits.float() / temperature, dim=-1)


def log_soften(logits: Tensor, temperature: float) -> Tensor:
    """log q_i(T), the numerically stable log of :func:`soften`."""
    _check_temperature(temperature)
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def soft_target_loss(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """T² · KL(p ‖ q_s(T)) for a given target distribution p, averaged over the batch.

    The T² factor keeps the gradient magnitude independent of T:
    ∂/∂z_s,i = T · (q_s,i(T) − p_i). Rows of ``target_probs`` must sum to 1; zero entries are
    handled (0·log 0 = 0). Used with a teacher's softened outputs (:func:`kd_loss`), a virtual
    teacher (Tf-KD_reg) or an ensemble average.
    """
    log_q_student = log_soften(student_logits, temperature)
    target = target_probs.float()
    # xlogy gives 0 where the target is 0 instead of 0·(−inf) = nan.
    kl = torch.xlogy(target, target) - target * log_q_student
    return kl.sum(dim=-1).mean() * temperature**2


def ensemble_probs(member_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """An ensemble's distribution: the average of its members' softened outputs, p = (1/M) Σ_m q_m(T).

    ``member_logits`` is M×N×K (M members) or N×K (one network, returned softened). Averaging
    probabilities, not logits, is Hinton et al.'s ensemble teacher; at T = 1 it is the usual
    prediction of an ensemble.
    """
    probs = soften(member_logits, temperature)
    return probs.mean(dim=0) if member_logits.dim() == 3 else probs


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton's soft term T² · KL(q_t(T) ‖ q_s(T)), averaged over the batch.

    Gradient w.r.t. the student logits: T · (q_s(T) − q_t(T)) per example (divided by the batch
    size for the mean). At high T with zero-mean logits this tends to (z_s − z_t)/(K·T), i.e.
    logit matching scaled by 1/T.
    """
    log_q_student = log_soften(student_logits, temperature)
    log_q_teacher = log_soften(teacher_logits.detach(), temperature)
    kl = torch.exp(log_q_teacher) * (log_q_teacher - log_q_student)
    return kl.sum(dim=-1).mean() * temperature**2


def hinton_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
) -> Tensor:
    """ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(q_t(T) ‖ q_s(T)).

    The hard term uses T = 1, as at inference; both networks share T in the soft term.
    """
    hard = F.cross_entropy(student_logits.float(), targets)
    return ce_weight * hard + kd_weight * kd_loss(student_logits, teacher_logits, temperature)


def logit_matching_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Caruana / Bucilă logit matching: ½ · mean over examples and classes of (z_s,i − z_t,i)².

    The mean over the K classes puts it on the scale of the T²-scaled KD term: the gradient per
    example is (z_s − z_t)/K, exactly the limit of T·(q_s − q_t) as T grows (zero-mean logits).
    Summing over classes instead makes the step K times larger, which at the learning rates that
    suit cross-entropy (SGD 0.1) made a ResNet student diverge on teacher logits of norm ~13.
    """
    diff = student_logits.float() - teacher_logits.detach().float()
    return 0.5 * diff.pow(2).mean()


def label_smoothing_targets(targets: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """q'(k) = (1 − ε)·onehot(y)_k + ε / K: the uniform-mixture label smoothing of Szegedy et al."""
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    onehot = F.one_hot(targets, num_classes).float()
    return (1.0 - smoothing) * onehot + smoothing / num_classes


def virtual_teacher_probs(targets: Tensor, num_classes: int, correct_prob: float) -> Tensor:
    """Tf-KD_reg's hand-made teacher: p(k) = a on the true class, (1 − a)/(K − 1) elsewhere.

    ``correct_prob`` is a (Yuan et al. use a ≥ 0.9). Each row sums to 1.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 0.0 <= correct_prob <= 1.0:
        raise ValueError(f"correct_prob must be in [0, 1], got {correct_prob}")
    off = (1.0 - correct_prob) / (num_classes - 1)
    probs = torch.full((targets.shape[0], num_classes), off, device=targets.device)
    probs.scatter_(1, targets.unsqueeze(1), correct_prob)
    return probs


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or kept in its own dtype when that is wider (float64 stays float64, for gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score each row over the classes (Sun et al., CVPR 2024, "Logit Standardization in KD").

        Z(z) = (z − mean(z)) / (std(z) + eps),  mean and std over the last (class) dimension

    ``std`` is the sample standard deviation (with Bessel's correction, divisor K − 1), as in the
    paper's pseudo-code. The result does not change when a constant is added to a row or a row is
    scaled by a positive factor, so a student is no longer asked to match the teacher's logit range,
    only the shape of its logits; the method then applies its temperature to Z(z) as usual. ``eps``
    keeps a row of equal logits finite (it standardises to zeros).
    """
    if logits.shape[-1] < 2:
        raise ValueError(f"standardize_logits needs at least 2 classes per row, got shape {tuple(logits.shape)}")
    z = _at_least_float32(logits)
    centred = z - z.mean(dim=-1, keepdim=True)
    return centred / (z.std(dim=-1, keepdim=True) + eps)


def _check_class_targets(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, loss: str) -> None:
    """Both logit tensors N×K with K ≥ 2, the same shape, and one class index per row in ``targets``."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{loss} needs student and teacher logits of the same N×K shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.shape[1] < 2:
        raise ValueError(f"{loss} needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}")
    if targets.shape != student_logits.shape[:1]:
        raise ValueError(f"{loss} needs one target class per example: targets of shape {tuple(targets.shape)} "
                         f"for logits of shape {tuple(student_logits.shape)}")


def _non_target_columns(values: Tensor, targets: Tensor) -> Tensor:
    """The N×(K−1) entries of an N×K tensor outside each row's target column, in class order.

    Built with ``gather`` (column j of row i is class j, or j + 1 from the target on), so it needs no
    boolean indexing and no host synchronisation on an accelerator.
    """
    n, k = values.shape
    positions = torch.arange(k - 1, device=values.device).expand(n, k - 1)
    return values.gather(1, positions + (positions >= targets.unsqueeze(1)).long())


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_k p_k · (log p_k − log q_k) per row, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _target_binary_log_probs(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """log b for b = [p_t, 1 − p_t], p = softmax(z/T), N×2; each from a log-sum-exp, so finite for any finite z."""
    z = _at_least_float32(logits) / temperature
    log_total = torch.logsumexp(z, dim=1)
    log_target = z.gather(1, targets.unsqueeze(1)).squeeze(1) - log_total
    log_rest = torch.logsumexp(_non_target_columns(z, targets), dim=1) - log_total
    return torch.stack([log_target, log_rest], dim=1)


def tckd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Target-class KD of Zhao et al. (CVPR 2022), per example and without the T² factor: KL(b^T ‖ b^S).

    b = [p_t, 1 − p_t] is the binary split of p = softmax(z/T) into the target class t and all the
    others together. Returns N values; the teacher is detached.
    """
    _check_temperature(temperature)
    _check_class_targets(student_logits, teacher_logits, targets, "tckd")
    log_b_student = _target_binary_log_probs(student_logits, targets, temperature)
    log_b_teacher = _target_binary_log_probs(teacher_logits.detach(), targets, temperature)
    return _kl_rows(log_b_teacher, log_b_student)


def nckd(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """Non-target-class KD of Zhao et al. (CVPR 2022), per example and without the T² factor: KL(p̂^T ‖ p̂^S).

    p̂ = softmax(z_¬t / T) is the distribution over the K − 1 non-target classes alone: the target's
    logit z_t is removed before the softmax (not merely its probability set to zero). With 2 classes p̂
    is a single certain class and NCKD is 0. Returns N values; the teacher is detached.
    """
    _check_temperature(temperature)
    _check_class_targets(student_logits, teacher_logits, targets, "nckd")
    others_student = _non_target_columns(_at_least_float32(student_logits), targets) / temperature
    others_teacher = _non_target_columns(_at_least_float32(teacher_logits.detach()), targets) / temperature
    return _kl_rows(torch.log_softmax(others_teacher, dim=1), torch.log_softmax(others_student, dim=1))


@dataclass(frozen=True)
class DKDTerms:
    """The two weighted terms of the DKD loss, batch means: ``tckd`` = α·T²·TCKD, ``nckd`` = β·T²·NCKD."""

    tckd: Tensor
    nckd: Tensor

    def total(self) -> Tensor:
        return self.tckd + self.nckd


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float, beta: float,
             temperature: float) -> DKDTerms:
    """Decoupled KD (Zhao et al., CVPR 2022): DKD = α·T²·TCKD + β·T²·NCKD, averaged over the batch.

    Hinton's KD splits exactly as KL(p^T ‖ p^S) = TCKD + (1 − p_t^T)·NCKD (see :func:`tckd` and
    :func:`nckd`), so in KD the non-target term is suppressed where the teacher is confident
    (p_t^T near 1); DKD weights the two terms independently instead. Both carry T², as in the paper,
    so their gradients keep their scale across temperatures.

    Settings of the paper and its released configurations: CIFAR-100 α = 1, β = 8, T = 4,
    cross-entropy weight 1, the DKD loss ramped in linearly over the first 20 epochs
    (:func:`dkd_warmup_factor`); ImageNet (ResNet-34 → ResNet-18) α = 1, β = 0.5, T = 1.
    """
    scale = temperature**2
    return DKDTerms(
        tckd=alpha * scale * tckd(student_logits, teacher_logits, targets, temperature).mean(),
        nckd=beta * scale * nckd(student_logits, teacher_logits, targets, temperature).mean(),
    )


def dkd_warmup_factor(epoch_progress: float, warmup_epochs: float) -> float:
    """DKD's warm-up weight min(e / E, 1) after ``epoch_progress`` = e epochs of training (fractions count).

    The DKD terms are multiplied by it, so they ramp in linearly over the first E = ``warmup_epochs``
    (20 on CIFAR-100 in the paper); E = 0 turns the warm-up off (factor 1 throughout).
    """
    if epoch_progress < 0:
        raise ValueError(f"epoch_progress must be >= 0, got {epoch_progress}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs == 0:
        return 1.0
    return min(epoch_progress / warmup_epochs, 1.0)


def pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (N×K each), N values.

        ρ(u, v) = ⟨u − ū, v − v̄⟩ / max(‖u − ū‖·‖v − v̄‖, eps)

    Unchanged when either argument is replaced by c·u + d with c > 0. ρ is undefined for a constant
    row; the floor ``eps`` makes it 0 there (without biasing other rows, as adding eps would), though
    its gradient there is of the order of 1/eps.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"pearson_correlation needs two N×K tensors of the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    a, b = _at_least_float32(a), _at_least_float32(b)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def inter_class_relation(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """DIST's inter-class relation loss: 1 − (1/N) Σ_i ρ(Y^S_i,:, Y^T_i,:), rows = examples (N×K)."""
    return 1.0 - pearson_correlation(student_probs, teacher_probs.detach()).mean()


def intra_class_relation(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """DIST's intra-class relation loss: 1 − (1/K) Σ_j ρ(Y^S_:,j, Y^T_:,j), columns = classes (N×K).

    It compares how one class's probability varies across the batch's examples; with a batch of one
    example every column is constant and the loss is the constant 1 (no gradient).
    """
    return inter_class_relation(student_probs.transpose(0, 1), teacher_probs.transpose(0, 1))


@dataclass(frozen=True)
class DISTTerms:
    """The two weighted terms of the DIST loss: ``inter`` = β·T²·L_inter, ``intra`` = γ·T²·L_intra."""

    inter: Tensor
    intra: Tensor

    def total(self) -> Tensor:
        return self.inter + self.intra


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> DISTTerms:
    """DIST (Huang et al., NeurIPS 2022): L = T²·(β·L_inter + γ·L_intra) on Y = softmax(z/T), N×K.

    Matching correlations instead of the probabilities themselves (KL) asks the student only to rank
    and spread its predictions as the teacher does, per example (inter-class, rows) and per class
    across the batch (intra-class, columns): Pearson's ρ ignores a positive scale and a shift, which
    is what lets a small student learn from a much stronger teacher whose outputs it cannot match.

    Defaults are the paper's β = γ = 1 and its ImageNet temperature T = 1 (where T² = 1): the
    released classification loss applies a plain softmax.
    """
    _check_temperature(temperature)
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"dist_loss needs student and teacher logits of the same N×K shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    student_probs = torch.softmax(_at_least_float32(student_logits) / temperature, dim=1)
    teacher_probs = torch.softmax(_at_least_float32(teacher_logits.detach()) / temperature, dim=1)
    scale = temperature**2
    return DISTTerms(inter=beta * scale * inter_class_relation(student_probs, teacher_probs),
                     intra=gamma * scale * intra_class_relation(student_probs, teacher_probs))


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by −scale (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def gradient_reversal(x: Tensor, scale: float) -> Tensor:
    """Gradient reversal: y = x forward, ∂L/∂x = −scale · ∂L/∂y backward.

    Whatever lies before it (CTKD's temperature) is trained to *increase* the loss that the rest
    minimises, with strength ``scale`` (λ).
    """
    return _GradientReversal.apply(x, scale)


def ctkd_lambda(epoch: float, warm_epochs: float = 10.0, lambda_max: float = 1.0, lambda_min: float = 0.0) -> float:
    """CTKD's curriculum for the gradient-reversal strength (Li et al., AAAI 2023), after ``epoch`` epochs.

        λ(e) = λ_min + ½·(λ_max − λ_min)·(1 + cos((1 + min(e, E)/E)·π)),  E = ``warm_epochs``

    A half cosine rising from λ_min at e = 0 to λ_max at e = E, then held: the temperature starts
    out barely adversarial (easy distillation) and grows into a full adversary. The paper uses
    λ_min = 0, λ_max = 1, E = 10. ``epoch`` may be fractional; E = 0 gives λ_max from the start.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warm_epochs < 0:
        raise ValueError(f"warm_epochs must be >= 0, got {warm_epochs}")
    if warm_epochs == 0:
        return lambda_max
    progress = min(epoch, warm_epochs) / warm_epochs
    return lambda_min + 0.5 * (lambda_max - lambda_min) * (1.0 + math.cos((1.0 + progress) * math.pi))


class LearnableTemperature(nn.Module):
    """CTKD's global temperature: one learnable scalar θ, τ = τ_min + (τ_max − τ_min)·σ(θ).

    The sigmoid keeps τ inside (τ_min, τ_max), (1, 21) by default as in the authors' release, without a
    hard clamp that would stop its gradient at the bounds. θ starts at 1 as in the authors' release
    (τ ≈ 15.6), unless ``initial_temperature`` is given. ``forward(lambda_)`` returns τ with its
    gradient reversed and scaled by λ (:func:`gradient_reversal`, λ from :func:`ctkd_lambda`), so an
    optimiser stepping θ together with the student makes τ *maximise* the distillation loss.
    Optimise ``parameters()`` with the student's; this module is the only stateful thing here.
    """

    def __init__(self, min_temperature: float = 1.0, max_temperature: float = 21.0,
                 initial_temperature: float | None = None) -> None:
        super().__init__()
        if not 0 < min_temperature < max_temperature:
            raise ValueError(f"need 0 < min_temperature < max_temperature, got {min_temperature} and "
                             f"{max_temperature}")
        self.min_temperature, self.max_temperature = min_temperature, max_temperature
        theta = 1.0
        if initial_temperature is not None:
            if not min_temperature < initial_temperature < max_temperature:
                raise ValueError(f"initial_temperature must lie strictly between {min_temperature} and "
                                 f"{max_temperature}, got {initial_temperature}")
            fraction = (initial_temperature - min_temperature) / (max_temperature - min_temperature)
            theta = math.log(fraction / (1.0 - fraction))
        self.theta = nn.Parameter(torch.tensor(theta))

    def forward(self, lambda_: float) -> Tensor:
        theta = gradient_reversal(self.theta, lambda_)
        return self.min_temperature + (self.max_temperature - self.min_temperature) * torch.sigmoid(theta)


def hint_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNets hint loss: ½ · mean over examples and hint elements of (r(v_g(x)) − u_h(x))², shapes equal.

        L = ½ · (1/(N·D)) Σ_x Σ_e (r(v_g(x))_e − u_h(x)_e)²,  D = elements of one example's hint

    ``student_features`` is the regressor's output r(v_g(x)), already shaped like the hint: N×D
    vectors or feature maps of any rank. Romero et al. write the squared norm ½‖u_h − r(v_g)‖²;
    averaging over the D elements as well (as :func:`logit_matching_loss` averages over classes)
    keeps the loss and its gradient (r − u_h)/(N·D) on one scale whatever the hint layer's width
    and spatial size, so one ``hint_weight`` and learning rate suit any layer.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"hint shapes differ: student (after regressor) {tuple(student_features.shape)} "
            f"vs teacher {tuple(teacher_features.shape)}"
        )
    diff = _at_least_float32(student_features) - _at_least_float32(teacher_features.detach())
    return 0.5 * diff.pow(2).mean()


_MAP_RANKS = {3: "N×C×L", 4: "N×C×H×W", 5: "N×C×D×H×W"}  # feature maps with 1, 2 or 3 spatial dimensions


def _check_feature_maps(first: Tensor, second: Tensor, what: str) -> None:
    """Two feature maps of one of the ranks in ``_MAP_RANKS``, and of the same rank."""
    if first.dim() not in _MAP_RANKS or first.dim() != second.dim():
        raise ValueError(
            f"{what} needs two feature maps of the same rank, {', '.join(_MAP_RANKS.values())}; got shapes "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )


def _positions_by_channels(fmap: Tensor) -> Tensor:
    """An N×C×(spatial) map as N×S×C (S = number of positions), as a view wherever its layout allows.

    Channels-last maps (the layout the Trainer prefers for conv nets on CPU) are N×S×C in memory
    already; any other layout is viewed as the flattened map, transposed.
    """
    n, c = fmap.shape[:2]
    channels_last = fmap.movedim(1, -1)
    if channels_last.is_contiguous():
        return channels_last.reshape(n, -1, c)
    return fmap.flatten(2).transpose(1, 2)


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """FSP ("flow of solution procedure") matrix of Yim et al. 2017, one per example.

    G_ij = Σ_s F1[i, s] · F2[j, s] / S, summed over all S spatial positions s, for feature maps F1
    (N×m×…) and F2 (N×n×…) of the same rank: N×C×L (1-D), N×C×H×W (2-D, the paper's) or N×C×D×H×W
    (3-D). The map with the larger spatial size is max-pooled down to the smaller one first
    (:func:`pool_to_common_size`); the sizes must then divide evenly. Returns N×m×n.
    """
    _check_feature_maps(first, second, "FSP")
    first, second = pool_to_common_size(first, second)
    dtype = torch.promote_types(torch.promote_types(first.dtype, second.dtype), torch.float32)  # half → float32
    return _SpatialProduct.apply(_positions_by_channels(first.to(dtype)), _positions_by_channels(second.to(dtype)))


class _SpatialProduct(torch.autograd.Function):
    """G = aᵀ·b / S for a (N×S×m) and b (N×S×n): the FSP product, summed over the S positions.

    Autograd's own ``bmm`` backward returns the gradient of a transposed operand transposed, so the
    gradient of a channels-last feature map arrived in NCHW order and the max-pooling and
    convolution layers before it copied it back on every step. Here
    each gradient is computed directly in its input's memory layout.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        with torch.autocast(a.device.type, enabled=False):  # G in a's precision (float32 or wider), also under AMP
            return torch.bmm(a.transpose(1, 2), b).div_(a.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype) / a.shape[1]
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:  # ∂L/∂a = b·gradᵀ, N×S×m
            grad_a = (torch.bmm(b, grad.transpose(1, 2)) if a.stride(2) == 1
                      else torch.bmm(grad, b.transpose(1, 2)).transpose(1, 2))
        if ctx.needs_input_grad[1]:  # ∂L/∂b = a·grad, N×S×n
            grad_b = (torch.bmm(a, grad) if b.stride(2) == 1
                      else torch.bmm(grad.transpose(1, 2), a.transpose(1, 2)).transpose(1, 2))
        return grad_a, grad_b


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}  # by number of spatial dimensions


def pool_to_common_size(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """Max-pool two feature maps of the same rank to their common spatial size (FSP, hints).

    Along each spatial dimension the common size is the smaller of the two, and the larger map is
    max-pooled by the whole factor between them (non-overlapping windows), so 8×6 and 4×12 both
    become 4×6. Maps of 1, 2 or 3 spatial dimensions (N×C×L, N×C×H×W, N×C×D×H×W); channels are left
    as they are. Raises ``ValueError`` naming the sizes when a larger size is not a whole multiple
    of the smaller.
    """
    _check_feature_maps(first, second, "pool_to_common_size")
    size1, size2 = tuple(first.shape[2:]), tuple(second.shape[2:])
    if size1 == size2:
        return first, second
    target = tuple(min(a, b) for a, b in zip(size1, size2))
    return _max_pool_to(first, target), _max_pool_to(second, target)


def _max_pool_to(fmap: Tensor, target: tuple[int, ...]) -> Tensor:
    size = tuple(fmap.shape[2:])
    if size == target:
        return fmap
    if any(s % t for s, t in zip(size, target)):
        raise ValueError(
            f"cannot max-pool a {'×'.join(map(str, size))} feature map to {'×'.join(map(str, target))}: "
            "along each dimension the larger size must be a multiple of the smaller"
        )
    kernel = tuple(s // t for s, t in zip(size, target))
    return _MAX_POOL[len(size)](fmap, kernel_size=kernel, stride=kernel)


def fsp_loss(
    student_matrices: list[Tensor], teacher_matrices: list[Tensor], weights: list[float]
) -> Tensor:
    """L_FSP = (1/N) Σ_x Σ_i λ_i ‖G_i^T(x) − G_i^S(x)‖²₂ over the chosen layer pairs."""
    if not (len(student_matrices) == len(teacher_matrices) == len(weights)):
        raise ValueError(
            f"fsp_loss needs one weight per pair: got {len(student_matrices)} student, "
            f"{len(teacher_matrices)} teacher matrices and {len(weights)} weights"
        )
    total = student_matrices[0].new_zeros((), dtype=torch.float32)
    for g_s, g_t, lam in zip(student_matrices, teacher_matrices, weights):
        if g_s.shape != g_t.shape:
            raise ValueError(f"FSP matrix shapes differ: student {tuple(g_s.shape)}, teacher {tuple(g_t.shape)}")
        total = total + lam * (g_t.detach().float() - g_s.float()).pow(2).flatten(1).sum(dim=1).mean()
    return total
