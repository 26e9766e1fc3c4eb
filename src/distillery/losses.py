"""Pure loss functions, one per formula.

Every function here takes tensors and returns a tensor; none holds state, knows about models or
reads a config. Methods (``distillery.methods``) combine them; users may call them directly from
their own training loops.

Weight convention used throughout distillery (Hinton et al. 2015, with both weights explicit):

    L = ce_weight · CE(y, softmax(z_s)) + kd_weight · T² · KL(q_t(T) ‖ q_s(T))

``kd_weight`` weights the soft (teacher) term, ``ce_weight`` the hard-label term. Hinton's α is
``kd_weight`` with ``ce_weight = 1 − α``; the "α·CE + distillation" convention some codebases use
is just the other assignment. Neither weight is implied by the other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

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


def hint_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNets hint loss: ½ · mean over examples of ‖u_h(x) − r(v_g(x))‖², shapes equal.

    ``student_features`` is the regressor's output r(v_g(x)), already shaped like the hint.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"hint shapes differ: student (after regressor) {tuple(student_features.shape)} "
            f"vs teacher {tuple(teacher_features.shape)}"
        )
    diff = student_features.float() - teacher_features.detach().float()
    return 0.5 * diff.pow(2).flatten(1).sum(dim=1).mean()


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """FSP ("flow of solution procedure") matrix of Yim et al. 2017, one per example.

    G_ij = Σ_{s,t} F1[s,t,i] · F2[s,t,j] / (h·w) for feature maps F1 (N×m×h×w) and F2 (N×n×h'×w').
    The map with the larger spatial size is max-pooled down to the smaller one first; the sizes
    must then divide evenly. Returns N×m×n.
    """
    if first.dim() != 4 or second.dim() != 4:
        raise ValueError(
            f"FSP needs N×C×H×W feature maps, got shapes {tuple(first.shape)} and {tuple(second.shape)}"
        )
    first, second = pool_to_common_size(first, second)
    n, m, h, w = first.shape
    dtype = torch.promote_types(torch.promote_types(first.dtype, second.dtype), torch.float32)  # half → float32
    first, second = first.to(dtype), second.to(dtype)
    # As N×hw×C spatial-by-channel views: free for channels-last maps (the layout the Trainer
    # prefers on CPU), a transposed view of the flattened map otherwise.
    if all(f.is_contiguous(memory_format=torch.channels_last) for f in (first, second)):
        f1 = first.permute(0, 2, 3, 1).reshape(n, h * w, m)
        f2 = second.permute(0, 2, 3, 1).reshape(n, h * w, second.shape[1])
    else:
        f1 = first.flatten(2).transpose(1, 2)
        f2 = second.flatten(2).transpose(1, 2)
    return _SpatialProduct.apply(f1, f2)


class _SpatialProduct(torch.autograd.Function):
    """G = aᵀ·b / S for a (N×S×m) and b (N×S×n): the FSP product, summed over the S positions.

    Autograd's own ``bmm`` backward returns the gradient of a transposed operand transposed, so the
    gradient of a channels-last feature map arrived in NCHW order and the max-pooling and
    convolution layers before it copied it back (~4 % of an FSP stage-1 step of a ResNet-8). Here
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


def pool_to_common_size(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """Max-pool the spatially larger of two N×C×H×W maps down to the other's size (FSP, hints).

    Raises ``ValueError`` when the larger size is not a whole multiple of the smaller.
    """
    size1, size2 = first.shape[-2:], second.shape[-2:]
    if size1 == size2:
        return first, second
    target = (min(size1[0], size2[0]), min(size1[1], size2[1]))
    pooled = []
    for fmap in (first, second):
        h, w = fmap.shape[-2:]
        if (h, w) == target:
            pooled.append(fmap)
            continue
        if h % target[0] or w % target[1]:
            raise ValueError(
                f"cannot max-pool a {h}×{w} feature map to {target[0]}×{target[1]}: "
                "the larger size must be a multiple of the smaller"
            )
        kernel = (h // target[0], w // target[1])
        pooled.append(F.max_pool2d(fmap, kernel_size=kernel, stride=kernel))
    return pooled[0], pooled[1]


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
